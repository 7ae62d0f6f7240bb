"""The inbox: notice dropped files, wait until their upload is complete, take them, make them runs.

`watcher` notices and judges files (events, rescans, the settle rule), `files`
opens each one once and answers through its descriptor, `intake` screens a
taken file completely before its run exists (`hashing` hashes or copies it on
worker threads, `leftovers` settles at start-up what a previous daemon left),
`order` says in which order waiting runs start, `arrival` renames a finished import or download
in without replacing anything. `Inbox` is imported when first asked for, so that the
read-only commands (`status`) do not load watchdog.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.inbox.files import announced_length_of, is_ignored, list_uploads, printable
from pipeline.inbox.order import start_order

if TYPE_CHECKING:
    from pipeline.inbox.watcher import Inbox

__all__ = ["Inbox", "announced_length_of", "is_ignored", "list_uploads", "printable", "start_order"]


def __getattr__(name: str) -> Any:
    if name == "Inbox":
        from pipeline.inbox.watcher import Inbox

        return Inbox
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
