"""The daemon's heartbeat on disk: a file in the state folder whose mtime the main loop moves.

The metric `dropgate_heartbeat_timestamp_seconds` needs a daemon that answers
HTTP; this file does not: `status` and the control commands read its age
even when the daemon is frozen (SIGSTOP, a hung disk, a deadlock), and tell
"running" from "not responding". Touching it is one utime() a second.
"""

from __future__ import annotations

import os
from pathlib import Path

HEARTBEAT_NAME = "heartbeat"
# The main loop beats every second; this long without a beat means it is not running.
STALE_SECONDS = 15.0


def beat(state: Path) -> None:
    """Move the heartbeat's mtime to now (creating the file the first time); OSError is the caller's."""
    path = state / HEARTBEAT_NAME
    try:
        os.utime(path)
    except FileNotFoundError:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o640))


def last_beat(state: Path) -> float | None:
    """When the main loop last beat (epoch seconds), or None without a heartbeat file."""
    try:
        return os.stat(state / HEARTBEAT_NAME).st_mtime
    except OSError:
        return None
