"""What the engine reads and sets on files: the walk, kinds, metadata, extended attributes, hashes, syncs."""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.libc import libc
from pipeline.snapshot.layout import BUFFER

_MODE_TEXT: dict[int, str] = {}


def mode_text(info: os.stat_result) -> str:
    """The permission bits as the manifest writes them: `0644`."""
    text = _MODE_TEXT.get(info.st_mode)
    if text is None:
        text = _MODE_TEXT[info.st_mode] = f"{stat.S_IMODE(info.st_mode):04o}"
    return text


_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # a folder removed, or replaced by a file or a link


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


def walk_tree(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under `root` (folders before their content, names sorted), with its lstat.

    `root` itself comes first as ".". Entries that vanish meanwhile are skipped. Each
    folder is opened without following a symbolic link, and its entries are looked at
    relative to it (no lookup walks the whole path again): a folder replaced by a link
    after it was listed is not followed, its content is skipped as if it had vanished.
    """
    info = os.lstat(root)
    yield ".", info
    if not stat.S_ISDIR(info.st_mode):
        return
    pending: list[str] = [""]
    while pending:
        rel = pending.pop()
        try:
            fd = os.open(os.path.join(root, rel) if rel else root, _FOLDER)
        except OSError as error:
            if error.errno in _GONE:
                continue
            raise
        subfolders = []
        try:
            with os.scandir(fd) as scan:
                entries = sorted(scan, key=_name)
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    child_info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield child, child_info
                if stat.S_ISDIR(child_info.st_mode):
                    subfolders.append(child)
        finally:
            os.close(fd)
        pending.extend(reversed(subfolders))


def kind_of(info: os.stat_result) -> str | None:
    if stat.S_ISREG(info.st_mode):
        return "file"
    if stat.S_ISDIR(info.st_mode):
        return "dir"
    if stat.S_ISLNK(info.st_mode):
        return "symlink"
    return None  # sockets, FIFOs, devices: not data


def meta_fields(info: os.stat_result) -> dict[str, Any]:
    return {"mode": mode_text(info), "uid": info.st_uid, "gid": info.st_gid, "mtime_ns": info.st_mtime_ns}


def file_fields(info: os.stat_result) -> dict[str, Any]:
    return {
        "size": info.st_size,
        **meta_fields(info),
        "src_dev": info.st_dev,
        "src_ino": info.st_ino,
        "src_ctime_ns": info.st_ctime_ns,
    }


def apply_meta(path: str, entry: Mapping[str, Any], owner: bool) -> None:
    """Set owner, mode and mtime of `path` as `entry` records them (symlinks: owner and mtime)."""
    link = entry["type"] == "symlink"
    if owner:
        os.lchown(path, entry["uid"], entry["gid"])
    if not link:
        os.chmod(path, int(entry["mode"], 8))
    os.utime(path, ns=(entry["mtime_ns"], entry["mtime_ns"]), follow_symlinks=not link)


def read_xattrs(target: int | str) -> dict[str, str] | None:
    """The extended attributes (ACLs, SELinux labels, user.*) of an open file or a path (not followed).

    Values are base64; None when there are none or the filesystem has none.
    """
    try:
        if isinstance(target, int):
            names = os.listxattr(target)
            values = {name: os.getxattr(target, name) for name in names}
        else:
            names = os.listxattr(target, follow_symlinks=False)
            values = {name: os.getxattr(target, name, follow_symlinks=False) for name in names}
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.ENODATA):
            return None
        raise
    return {name: base64.b64encode(value).decode() for name, value in sorted(values.items())} or None


def restore_xattrs(path: str, entry: Mapping[str, Any]) -> None:
    """Give `path` exactly the extended attributes `entry` records (removing those it does not)."""
    wanted = {name: base64.b64decode(value) for name, value in (entry.get("xattrs") or {}).items()}
    link = entry["type"] == "symlink"
    try:
        present = set(os.listxattr(path, follow_symlinks=False))
    except OSError as error:
        if error.errno == errno.ENOTSUP and not wanted:
            return
        raise
    for name in present - set(wanted):
        try:
            os.removexattr(path, name, follow_symlinks=False)
        except OSError as error:
            if not (link and error.errno in (errno.EPERM, errno.ENOTSUP)):
                raise
    for name, value in wanted.items():
        if name in present and os.getxattr(path, name, follow_symlinks=False) == value:
            continue
        os.setxattr(path, name, value, follow_symlinks=False)


def can_chown() -> bool:
    return os.geteuid() == 0


def file_sha256(path: Path | str, buffer: bytearray | None = None) -> str:
    digest = hashlib.sha256()
    buf = buffer if buffer is not None else bytearray(BUFFER)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            digest.update(view[:n])
    finally:
        os.close(fd)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Flush the filesystem of `path` to disk (syncfs; `sync` where it is unavailable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc().syncfs(fd) != 0:
            os.sync()
    except (OSError, AttributeError):
        os.sync()
    finally:
        os.close(fd)
