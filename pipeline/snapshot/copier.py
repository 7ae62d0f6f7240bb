"""Copying one file into a snapshot (or linking the previous snapshot's copy of it), hashing what is stored.

The bytes are hashed as they are copied: each buffer read from the live file is
written to the copy and hashed, so the manifest holds the hash of exactly the
bytes stored, and nothing is read twice. A large file is hashed by a second
thread while the first copies the next buffer (`hashlib` and file I/O release
the GIL: two cores work at once). Where the filesystem can clone (FICLONE:
shared extents, copy-on-write) the clone is free and the copy is then read once
to hash it. A copy that needs no hash (a restore) is made in the kernel
(copy_file_range).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import queue
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.snapshot.layout import BUFFER
from pipeline.snapshot.tree import read_xattrs

_CHUNK = 64 << 20  # a stop request is seen by a copy in progress at least this often
_FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
# Files at least this large are hashed by a second thread while they are copied: one such file would
# keep its worker busy long after the others are done. Below it the workers already keep the cores busy,
# and one more thread per file only adds contention (measured on 2 cores, tmpfs and ext4).
_PIPELINED = 64 << 20
_HASH_BUFFERS = 4  # buffers in flight between the copying and the hashing thread


@dataclass(frozen=True)
class Copied:
    sha256: str | None  # None when the copy was made without hashing
    info: os.stat_result  # the source as it was after its (last) copy
    stored: os.stat_result  # the copy, once its mode, owner and times were set
    settled: bool  # the source did not change while it was copied
    xattrs: dict[str, str] | None

    @property
    def size(self) -> int:
        """The bytes copied."""
        return self.stored.st_size

    def stored_as_copied(self, owner: bool) -> bool:
        """Whether the copy has the source's mode and mtime (and owner, if set), as its manifest line says."""
        stored, info = self.stored, self.info
        return (
            stored.st_mode == info.st_mode
            and stored.st_mtime_ns == info.st_mtime_ns
            and (not owner or (stored.st_uid, stored.st_gid) == (info.st_uid, info.st_gid))
        )


class Abandoned(Exception):
    """A copy ended early because its snapshot was abandoned (its partial folder is being removed)."""


_END, _RESET = "end", "reset"


class _Hasher:
    """A second thread hashing, in order, the buffers one copying thread has written.

    The copying thread takes a free buffer, reads into it, writes it out and hands
    it over; the hasher gives it back once hashed. `finish` waits for the last one.
    """

    def __init__(self) -> None:
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[bytearray, int] | str | None] = queue.SimpleQueue()
        self._digests: queue.SimpleQueue[str] = queue.SimpleQueue()
        for _ in range(_HASH_BUFFERS):
            self.free.put(bytearray(BUFFER))
        self._thread = threading.Thread(target=self._run, name="snapshot-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        digest = hashlib.sha256()
        while True:
            item = self._full.get()
            if item is None:
                return
            if isinstance(item, str):
                self._digests.put(digest.hexdigest() if item == _END else "")
                digest = hashlib.sha256()
                continue
            buf, n = item
            digest.update(memoryview(buf)[:n])
            self.free.put(buf)

    def hash(self, buf: bytearray, n: int) -> None:
        self._full.put((buf, n))

    def finish(self) -> str:
        """The hash of everything handed over since the last finish or reset."""
        self._full.put(_END)
        return self._digests.get()

    def reset(self) -> None:
        """Drop what was handed over (a copy starting again, or failing); waits until every buffer is free."""
        self._full.put(_RESET)
        self._digests.get()

    def close(self) -> None:
        self._full.put(None)
        self._thread.join()


class Copier:
    """Copies files for a snapshot (hashing them) or a restore (not hashing them).

    Each way of copying stops being tried once the filesystem has refused it.
    `write` is the one call that writes file content while hashing (tests inject
    failures through it); `close` ends the hashing threads.
    """

    _UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF)

    def __init__(
        self,
        reflink: bool,
        write: Callable[[int, memoryview], int] = os.write,
        *,
        hashing: bool = True,
        checkpoint: Callable[[], None] | None = None,
    ) -> None:
        self.reflink = reflink
        self.checkpoint = checkpoint  # also asked between chunks: a huge file does not hold off a shutdown
        self.hashing = hashing
        self.kernel_copy = write is os.write
        self.write = write
        self.stop = threading.Event()  # set when the snapshot is abandoned: copies in progress end early
        self._local = threading.local()
        self._lock = threading.Lock()
        self._hashers: list[_Hasher] = []
        self.cloned = 0

    def _buffer(self) -> bytearray:
        buf: bytearray | None = getattr(self._local, "buffer", None)
        if buf is None:
            buf = self._local.buffer = bytearray(BUFFER)
        return buf

    def _hasher(self) -> _Hasher:
        hasher: _Hasher | None = getattr(self._local, "hasher", None)
        if hasher is None:
            hasher = self._local.hasher = _Hasher()
            with self._lock:
                self._hashers.append(hasher)
        return hasher

    def close(self) -> None:
        """End the hashing threads (after the last copy)."""
        with self._lock:
            hashers, self._hashers = self._hashers, []
        for hasher in hashers:
            hasher.close()

    def copy(self, src: str, dst: str, owner: bool) -> Copied:
        """Copy `src` to the new file `dst` with its mode, owner and times.

        A file that changes while it is copied (the platform is in service) is copied
        again; after three tries the last copy stands, `settled` false: its size and
        hash are those of the bytes copied, and the next snapshot copies it again.
        """
        flags = os.O_RDONLY | os.O_NOFOLLOW
        try:
            fi = os.open(src, flags | os.O_NOATIME)
        except PermissionError:
            fi = os.open(src, flags)
        try:
            fo = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                for attempt in range(3):
                    if attempt:
                        self._rewind(fi, fo)
                    before = os.fstat(fi)
                    digest = self._transfer(fi, fo, before.st_size)
                    after = os.fstat(fi)
                    settled = (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
                        after.st_size,
                        after.st_mtime_ns,
                        after.st_ctime_ns,
                    )
                    if settled:
                        break
                xattrs = read_xattrs(fi)
                if owner:
                    os.fchown(fo, after.st_uid, after.st_gid)
                os.fchmod(fo, stat.S_IMODE(after.st_mode))
                os.utime(fo, ns=(after.st_atime_ns, after.st_mtime_ns))
                stored = os.fstat(fo)
            finally:
                os.close(fo)
        finally:
            os.close(fi)
        return Copied(digest, after, stored, settled, xattrs)

    @staticmethod
    def _rewind(fi: int, fo: int) -> None:
        os.lseek(fi, 0, os.SEEK_SET)
        os.lseek(fo, 0, os.SEEK_SET)
        os.ftruncate(fo, 0)

    def _transfer(self, fi: int, fo: int, size: int) -> str | None:
        """Copy the first `size` bytes (the size when the copy began: a growing file cannot keep it going).

        Returns the SHA-256 of the bytes stored (None when not hashing).
        """
        if self.reflink and self._clone(fi, fo):
            return self._hash_file(fo) if self.hashing else None
        if not self.hashing:
            if self.kernel_copy and self._kernel_copy(fi, fo, size):
                return None
            self._copy_through(fi, fo, size, None)
            return None
        if size >= _PIPELINED and (os.cpu_count() or 1) > 1:
            return self._copy_pipelined(fi, fo, size)
        digest = hashlib.sha256()
        self._copy_through(fi, fo, size, digest)
        return digest.hexdigest()

    def _clone(self, fi: int, fo: int) -> bool:
        try:
            fcntl.ioctl(fo, _FICLONE, fi)
        except OSError as error:
            if error.errno not in self._UNSUPPORTED:
                raise
            self.reflink = False  # this filesystem cannot; stop asking
            return False
        with self._lock:
            self.cloned += 1
        return True

    def _kernel_copy(self, fi: int, fo: int, size: int) -> bool:
        try:
            left = size
            while left > 0:
                n = os.copy_file_range(fi, fo, min(left, _CHUNK))
                if not n:
                    break  # it shrank
                left -= n
                self._check_stop()
            return True
        except OSError as error:
            if error.errno not in self._UNSUPPORTED:
                raise
            self.kernel_copy = False
            self._rewind(fi, fo)
            return False

    def _copy_through(self, fi: int, fo: int, size: int, digest: Any) -> None:
        """Read a buffer, hash it (if `digest`), write it; on one thread (small files)."""
        buf = self._buffer()
        view = memoryview(buf)
        done = 0
        while done < size:
            n = os.readv(fi, [view[: min(BUFFER, size - done)]])
            if not n:
                return  # it shrank
            done += n
            if done % _CHUNK < n:
                self._check_stop()
            chunk = view[:n]
            if digest is not None:
                digest.update(chunk)
            self._write_all(fo, chunk)

    def _copy_pipelined(self, fi: int, fo: int, size: int) -> str:
        """Read and write on this thread while the hasher hashes the buffers already written."""
        hasher = self._hasher()
        done = 0
        held: bytearray | None = None  # a buffer taken from the hasher and not handed back yet
        try:
            while done < size:
                held = hasher.free.get()
                view = memoryview(held)
                n = os.readv(fi, [view[: min(BUFFER, size - done)]])
                if not n:
                    break  # it shrank
                self._write_all(fo, view[:n])
                hasher.hash(held, n)
                held = None
                done += n
                if done % _CHUNK < n:
                    self._check_stop()
        except BaseException:
            if held is not None:
                hasher.free.put(held)
            hasher.reset()
            raise
        if held is not None:
            hasher.free.put(held)
        return hasher.finish()

    def _write_all(self, fo: int, chunk: memoryview) -> None:
        while chunk:
            written = self.write(fo, chunk)
            chunk = chunk[written:]

    def _hash_file(self, fd: int) -> str:
        digest = hashlib.sha256()
        buf = self._buffer()
        view = memoryview(buf)
        os.lseek(fd, 0, os.SEEK_SET)
        done = 0
        while True:
            n = os.readv(fd, [buf])
            if not n:
                return digest.hexdigest()
            done += n
            if done % _CHUNK < n:
                self._check_stop()
            digest.update(view[:n])

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Abandoned
        if self.checkpoint is not None:
            self.checkpoint()


def link_previous(previous_copy: str, dst: str, holds: Callable[[os.stat_result], bool]) -> bool:
    """Hard-link the previous snapshot's copy to `dst` if it is still as recorded; False to copy instead.

    The link is made first and then checked where it landed: its lstat must be a
    regular file that `holds` (the record's size, mtime, mode) accepts, else the
    link is removed. A copy changed in the backups folder is never carried forward,
    and the check is of the very entry the new snapshot holds.
    """
    try:
        os.link(previous_copy, dst)  # link(2): a symbolic link is linked, not followed
    except OSError as error:
        if _refused(error):
            return False
        raise
    if holds(os.lstat(dst)):
        return True
    os.unlink(dst)
    return False


def _refused(error: OSError) -> bool:
    """A link that cannot be made for this file (gone, too many links, another filesystem): copy it instead."""
    return isinstance(error, (FileNotFoundError, NotADirectoryError)) or error.errno in (
        errno.EMLINK,
        errno.EXDEV,
        errno.EPERM,
        errno.ELOOP,  # a folder of the previous snapshot replaced by a link: not followed
    )


class Sharer:
    """`link_previous` for the files the walk shares, by names relative to open folders.

    The walk shares a folder's files one after the other: the previous copy's folder
    and the new one are opened once (without following a link) and each file then
    costs a lookup of its own name, not of its whole path, in the link and in the check.
    """

    _FOLDER = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def __init__(self) -> None:
        self._folders: tuple[str, str] = ("", "")
        self._fds: tuple[int, int] = (-1, -1)

    def link(self, previous_copy: str, dst: str, holds: Callable[[os.stat_result], bool]) -> bool:
        previous_folder, _, previous_name = previous_copy.rpartition("/")
        folder, _, name = dst.rpartition("/")
        if (previous_folder, folder) != self._folders:
            self._open(previous_folder, folder)
        source_fd, fd = self._fds
        if source_fd < 0:
            return False  # the previous snapshot has no such folder
        try:
            os.link(previous_name, name, src_dir_fd=source_fd, dst_dir_fd=fd, follow_symlinks=False)
        except OSError as error:
            if _refused(error):
                return False
            raise
        if holds(os.stat(name, dir_fd=fd, follow_symlinks=False)):
            return True
        os.unlink(name, dir_fd=fd)
        return False

    def _open(self, previous_folder: str, folder: str) -> None:
        self.close()
        fd = os.open(folder, self._FOLDER)
        try:
            source_fd = os.open(previous_folder, self._FOLDER)
        except OSError as error:
            if not _refused(error):
                os.close(fd)
                raise
            source_fd = -1
        self._folders, self._fds = (previous_folder, folder), (source_fd, fd)

    def close(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._folders, self._fds = ("", ""), (-1, -1)
