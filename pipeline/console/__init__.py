"""The administrators' console in the browser: sign in, import, check, review and consent, follow, act.

Its own listener (`console.listen`), served by uvicorn on a thread of the
daemon; every action goes through the daemon's control dispatch.
"""

from __future__ import annotations

from pipeline.console.server import ConsoleServer

__all__ = ["ConsoleServer"]
