"""The intake's worker threads: each taken file is hashed off the watcher's thread.

A file kept as it is (dropgate's own, one name, no writer) is hashed through
its descriptor and must not change meanwhile. Any other is copied into a new
file only dropgate can write, hashed as it is copied, and the copy replaces it
in its intake folder. Stopping cancels the work within one chunk; what was cut
short is finished at the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.inbox.files import DIR_FLAGS, printable

if TYPE_CHECKING:
    from pipeline.inbox.intake import Item

log = logging.getLogger("dropgate")

HASH_CHUNK = 1 << 20
HASH_WORKERS = 2
TAKEN_MODE = 0o640  # the daemon's, readable by the state folder's group (admins), by no uploader
COPY_SUFFIX = ".copy"
NAME_MAX = 255


class _Cancelled(Exception):
    """The daemon is stopping: the item stays in intake/ and is finished at the next start."""


class Hasher:
    """Worker threads that hash (or copy and hash) items; each item is handed back through `on_done`.

    A finished item has `sha256` and `size`, or a `refusal` saying why it cannot run.
    """

    def __init__(self, limit: int, on_done: Callable[[Item], None]) -> None:
        self.limit = limit  # limits.max_archive_bytes: a copy that grows past it is refused
        self.on_done = on_done
        self._jobs: queue.Queue[Item | None] = queue.Queue()
        self._cancel = threading.Event()
        self._workers: list[threading.Thread] = []
        self._dir_fd = -1

    def start(self, dir_fd: int) -> None:
        """Start the workers; `dir_fd` is the intake folder, where each item has its own folder."""
        self._dir_fd = dir_fd
        for number in range(HASH_WORKERS):
            worker = threading.Thread(target=self._work, name=f"dropgate-intake-{number}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def submit(self, item: Item) -> None:
        self._jobs.put(item)

    def stop(self) -> None:
        """Cancel the work (each worker stops within one chunk) and wait a moment for the workers to end."""
        self._cancel.set()
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(timeout=2)

    def running(self) -> bool:
        """Whether a worker is still alive (it may still use an item's descriptor)."""
        return any(worker.is_alive() for worker in self._workers)

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None or self._cancel.is_set():
                return
            try:
                if item.copy:
                    self._copy_and_hash(item)
                else:
                    self._hash(item)
            except _Cancelled:
                return
            except _CopyFailed as error:
                item.refusal = f"{printable(item.name)}: {error.strerror}"
            except OSError as error:
                item.refusal = f"{printable(item.name)} cannot be read: {error.strerror or error}"
            except Exception as error:  # never leave an item half-done: it is refused with the cause
                log.exception("inbox: hashing %s failed", printable(item.name))
                item.refusal = f"{printable(item.name)} could not be hashed: {error!r}"
            self.on_done(item)

    def _hash(self, item: Item) -> None:
        """SHA-256 of the kept file, read through its descriptor; it must not change meanwhile."""
        assert item.fd is not None
        before = os.fstat(item.fd)
        digest = hashlib.sha256()
        offset = 0
        while chunk := self._read(item.fd, offset):
            digest.update(chunk)
            offset += len(chunk)
        after = os.fstat(item.fd)
        if before.st_size != offset or (after.st_size, after.st_mtime_ns) != (offset, before.st_mtime_ns):
            shown = printable(item.name)
            item.refusal = f"{shown} changed while it was read ({before.st_size} → {after.st_size} bytes)"
            return
        item.sha256, item.size = digest.hexdigest(), offset

    def _copy_and_hash(self, item: Item) -> None:
        """Copy the bytes into a new file only dropgate can write, hashing what is copied; the copy replaces it."""
        assert item.fd is not None
        limit = self.limit
        folder_fd = os.open(item.token, DIR_FLAGS, dir_fd=self._dir_fd)
        copy_name = item.name + COPY_SUFFIX if len(os.fsencode(item.name)) + 5 <= NAME_MAX else COPY_SUFFIX
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy_name, dir_fd=folder_fd)
            out = os.open(copy_name, flags, TAKEN_MODE, dir_fd=folder_fd)
            try:
                digest = hashlib.sha256()
                offset = 0
                while chunk := self._read(item.fd, offset):
                    if offset + len(chunk) > limit:
                        item.refusal = (
                            f"{printable(item.name)} grew past limits.max_archive_bytes ({limit}) while it was copied"
                        )
                        break
                    digest.update(chunk)
                    offset += len(chunk)
                    self._write(out, chunk)
                else:
                    os.fsync(out)
            finally:
                os.close(out)
            if item.refusal is not None:
                os.unlink(copy_name, dir_fd=folder_fd)
                return
            os.replace(copy_name, item.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        finally:
            os.close(folder_fd)
        os.close(item.fd)
        item.fd = None
        item.sha256, item.size = digest.hexdigest(), offset

    def _read(self, fd: int, offset: int) -> bytes:
        if self._cancel.is_set():
            raise _Cancelled()
        return os.pread(fd, HASH_CHUNK, offset)

    @staticmethod
    def _write(fd: int, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            try:
                written = os.write(fd, view)
            except OSError as error:
                raise _CopyFailed(error) from error
            view = view[written:]


class _CopyFailed(OSError):
    """Writing the copy failed (a fault of this site, e.g. a full disk), not reading the upload."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.errno, f"it could not be copied into the state folder: {error.strerror}")
