"""Copying one file into a snapshot (or linking the previous snapshot's copy of it)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.snapshot.layout import BUFFER
from pipeline.snapshot.tree import mode_text, read_xattrs

_CHUNK = 64 << 20  # a stop request is seen by a copy in progress at least this often
_FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h


@dataclass(frozen=True)
class Copied:
    sha256: str
    info: os.stat_result  # the source as it was after its (last) copy
    size: int  # the bytes copied
    settled: bool  # the source did not change while it was copied
    xattrs: dict[str, str] | None


class Copier:
    """Copies one file, then hashes the copy: the hash in the manifest is that of the bytes stored.

    The copy is a clone (FICLONE: shared extents, copy-on-write) where the filesystem
    can, else an in-kernel copy (copy_file_range), else a read/write loop through
    `write`. Each way stops being tried once the filesystem has refused it.
    """

    _UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF)

    def __init__(self, reflink: bool, write: Callable[[int, memoryview], int] = os.write) -> None:
        self.reflink = reflink
        self.kernel_copy = write is os.write
        self.write = write
        self.stop = threading.Event()  # set when the snapshot is abandoned: copies in progress end early
        self._local = threading.local()
        self._lock = threading.Lock()
        self.cloned = 0

    def _buffer(self) -> bytearray:
        buf: bytearray | None = getattr(self._local, "buffer", None)
        if buf is None:
            buf = self._local.buffer = bytearray(BUFFER)
        return buf

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
                    self._transfer(fi, fo, before.st_size)
                    after = os.fstat(fi)
                    settled = (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
                        after.st_size,
                        after.st_mtime_ns,
                        after.st_ctime_ns,
                    )
                    if settled:
                        break
                size = os.fstat(fo).st_size
                digest = self._hash(fo)
                xattrs = read_xattrs(fi)
                if owner:
                    os.fchown(fo, after.st_uid, after.st_gid)
                os.fchmod(fo, stat.S_IMODE(after.st_mode))
                os.utime(fo, ns=(after.st_atime_ns, after.st_mtime_ns))
            finally:
                os.close(fo)
        finally:
            os.close(fi)
        return Copied(digest, after, size, settled, xattrs)

    @staticmethod
    def _rewind(fi: int, fo: int) -> None:
        os.lseek(fi, 0, os.SEEK_SET)
        os.lseek(fo, 0, os.SEEK_SET)
        os.ftruncate(fo, 0)

    def _transfer(self, fi: int, fo: int, size: int) -> None:
        """Copy the first `size` bytes (the size when the copy began: a growing file cannot keep it going)."""
        if self.reflink:
            try:
                fcntl.ioctl(fo, _FICLONE, fi)
            except OSError as error:
                if error.errno not in self._UNSUPPORTED:
                    raise
                self.reflink = False  # this filesystem cannot; stop asking
            else:
                with self._lock:
                    self.cloned += 1
                return
        if self.kernel_copy:
            try:
                left = size
                while left > 0:
                    n = os.copy_file_range(fi, fo, min(left, _CHUNK))
                    if not n:
                        break  # it shrank
                    left -= n
                    self._check_stop()
                return
            except OSError as error:
                if error.errno not in self._UNSUPPORTED:
                    raise
                self.kernel_copy = False
                self._rewind(fi, fo)
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
            while chunk:
                written = self.write(fo, chunk)
                chunk = chunk[written:]

    def _hash(self, fd: int) -> str:
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


class Abandoned(Exception):
    """A copy ended early because its snapshot was abandoned (its partial folder is being removed)."""


def link_previous(previous_copy: str, dst: str, fields: tuple[Any, ...]) -> bool:
    """Hard-link the previous snapshot's copy if it is still as recorded; False to copy instead."""
    size, mode, _uid, _gid, mtime_ns = fields[:5]
    try:
        info = os.lstat(previous_copy)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode) or (info.st_size, info.st_mtime_ns, mode_text(info)) != (size, mtime_ns, mode):
        return False
    try:
        os.link(previous_copy, dst)
    except OSError as error:
        if error.errno in (errno.EMLINK, errno.EXDEV, errno.EPERM):
            return False
        raise
    return True
