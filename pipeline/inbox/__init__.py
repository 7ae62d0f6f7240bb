"""The inbox: notice dropped files, wait until their upload is complete, take them, make them runs.

`watcher` notices and judges files (events, rescans, the settle rule), `files`
opens each one once and answers through its descriptor, `intake` screens a
taken file completely before its run exists, `order` says in which order
waiting runs start.
"""

from __future__ import annotations

from pipeline.inbox.files import announced_length_of, is_ignored, list_uploads, printable
from pipeline.inbox.order import start_order
from pipeline.inbox.watcher import Inbox

__all__ = ["Inbox", "announced_length_of", "is_ignored", "list_uploads", "printable", "start_order"]
