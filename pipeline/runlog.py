"""The plain-text log of one run: one timestamped line per event or output line."""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path


class RunLog:
    """Append-only, line-buffered, safe to write from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        with self._lock:
            if not self._file.closed:
                self._file.write(f"{stamp} {line}\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


def tail(path: Path, lines: int = 40) -> list[str]:
    """The last `lines` lines of a run log (empty if there is none yet)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
    except FileNotFoundError:
        return []
