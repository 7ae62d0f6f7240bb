"""One look at an inbox file: open it once, safely, and learn everything through that descriptor.

An uploader may swap a name for a symbolic link, a FIFO, a device or a hard
link between two looks, so a path in the inbox is opened at most once, with
`O_NOFOLLOW | O_NONBLOCK` (a link is refused by the kernel, a FIFO never
blocks), and what follows — kind, size, announced length, the writer check,
hashing, the move's verification — goes through the descriptor (`fstat`,
`pread`, `fcntl`), never through the name again.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import fnmatch
import logging
import os
import re
import signal
import stat as stat_module
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.quickconfig import SiteConfig as Config


log = logging.getLogger("dropgate")

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
HEAD_BYTES = 64 * 2**10  # how much of a file's start may hold its announced length

# The head of an update archive (docs/archive-format.md): a gzip member whose tar
# stream starts with `manifest.json`, whose JSON starts with {"length": N. This
# duplicates the start of pipeline.archive's reader on purpose: the inbox reads
# it from bytes it already holds (one descriptor), the archive reads files.
_GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = 512
_MANIFEST = b"manifest.json"
_ANNOUNCED = re.compile(rb'\{\s*"length"\s*:\s*(\d{1,20})\s*[,}]')
_OCTAL = re.compile(rb"[0-7]+")

_KINDS = {
    stat_module.S_IFDIR: "a folder",
    stat_module.S_IFLNK: "a symbolic link",
    stat_module.S_IFIFO: "a named pipe (FIFO)",
    stat_module.S_IFSOCK: "a socket",
    stat_module.S_IFCHR: "a character device",
    stat_module.S_IFBLK: "a block device",
    stat_module.S_IFREG: "a regular file",
}


def is_ignored(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def printable(text: str) -> str:
    """`text` safe to print on one line: control, invalid and non-printable characters escaped."""
    out = []
    for char in text:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def name_refusal(name: str) -> str | None:
    """Why a file name cannot be an archive's, before anything is read: bytes that are not UTF-8.

    The journal, the status page and the JSON output hold names as text; such a
    name could not be recorded as it is, and never matches `<product>.<version>.tgz`.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"{printable(name)}: the file name is not valid UTF-8; an archive is named <product>.<version>.tgz"
    return None


def recorded_name(name: str) -> str:
    """`name` as the journal can hold it: itself, or escaped when it holds bytes that are not UTF-8."""
    return name if name_refusal(name) is None else printable(name)


def kind_of(mode: int) -> str:
    """What a stat mode says the entry is, as a sentence's object ("a named pipe (FIFO)")."""
    return _KINDS.get(stat_module.S_IFMT(mode), "an unknown kind of file")


def announced_length_of(head: bytes) -> int | None:
    """The full length an archive announces in its first bytes, or None if it does not start like one.

    Never raises for bad input: the value is not authenticated, it only tells an
    upload in progress from a finished one; `validate` checks it for real.
    """
    if not head.startswith(_GZIP_MAGIC):
        return None
    try:
        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, _BLOCK + 64)
    except zlib.error:
        return None
    if len(out) < _BLOCK or not _tar_header_names_manifest(out[:_BLOCK]):
        return None
    match = _ANNOUNCED.match(out[_BLOCK:])
    return int(match.group(1)) if match else None


def _tar_header_names_manifest(block: bytes) -> bool:
    stored = _OCTAL.search(block[148:156])
    if stored is None:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    if int(stored.group(), 8) not in (unsigned, signed):
        return False
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name == _MANIFEST and block[156:157] in (b"0", b"\0")


def read_head(fd: int) -> bytes:
    """The first bytes of an open file (at most HEAD_BYTES), by offset: the descriptor's position is not used."""
    return os.pread(fd, HEAD_BYTES, 0)


def open_entry(name: str, dir_fd: int) -> int:
    """Open `name` in the folder `dir_fd` for reading, once: a link fails (ELOOP), a FIFO does not block."""
    return os.open(name, OPEN_FLAGS, dir_fd=dir_fd)


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# -- the writer check ---------------------------------------------------------------
class Lease(enum.Enum):
    HELD = "held"  # no process has the file open for writing, and none can open it until it is dropped
    WRITTEN = "written"  # some process has it open for writing
    UNAVAILABLE = "unavailable"  # this filesystem or this process cannot take leases: the check cannot be made


_unavailable_logged: set[int] = set()


def take_lease(fd: int) -> Lease:
    """A read lease on the open file: the kernel grants it only while no process has the file open for writing.

    Cost: one fcntl(2), whatever the number of processes on the host (the kernel
    keeps a count of writers per inode; no process list is read). While it is
    held, another process opening the file for writing waits until it is dropped
    (up to /proc/sys/fs/lease-break-time) and the kernel signals the holder: the
    signal is set to SIGURG, whose default action is to ignore it, so a break
    notifies no one and kills nothing (SIGIO, the default, would end the daemon).
    Leases need the file's owner or CAP_LEASE (deploy/systemd/dropgate.service
    keeps it); when they are unavailable the caller falls back to what needs no
    check at all (see intake: the file is copied).
    """
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EBUSY):
            return Lease.WRITTEN
        if error.errno not in _unavailable_logged:
            _unavailable_logged.add(error.errno or 0)
            log.warning(
                "inbox: cannot take a read lease (%s): whether another process still writes an upload is not "
                "known; such files are copied when taken (give the daemon CAP_LEASE)",
                os.strerror(error.errno or 0),
            )
        return Lease.UNAVAILABLE
    return Lease.HELD


def drop_lease(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def is_written(fd: int) -> bool | None:
    """Whether some process has the open file open for writing (None: cannot tell)."""
    lease = take_lease(fd)
    if lease is Lease.HELD:
        drop_lease(fd)
        return False
    return lease is Lease.WRITTEN or None


# -- `status` while the daemon is down ------------------------------------------------
def list_uploads(config: Config) -> list[dict[str, Any]]:
    """Files in the inbox shorter than they announce (for `status` when the daemon is down).

    Each entry is opened once, like the daemon does (no link followed, no FIFO
    waited on); an inbox this user may not read shows no uploads.
    """
    uploads = []
    try:
        dir_fd = os.open(config.paths.inbox, DIR_FLAGS)
    except OSError:
        return []
    try:
        names = sorted(os.listdir(dir_fd))
        for name in names:
            if is_ignored(name, config.inbox.ignore):
                continue
            try:
                fd = open_entry(name, dir_fd)
            except OSError:
                continue
            try:
                info = os.fstat(fd)
                if not stat_module.S_ISREG(info.st_mode):
                    continue
                total = announced_length_of(read_head(fd))
            except OSError:
                continue
            finally:
                os.close(fd)
            if total is not None and info.st_size < total:
                uploads.append({"name": name, "bytes": info.st_size, "total": total})
    except OSError:
        return uploads
    finally:
        os.close(dir_fd)
    return uploads
