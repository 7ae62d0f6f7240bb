"""Snapshots of the platform's data: take, verify, restore, estimate, prune, list.

A snapshot is a folder `<backups>/<run id>/`:

    snapshot.json     the summary, written last: its presence means complete and verified
    manifest.jsonl    a header line, then one JSON line per folder, file, symlink, hard link and dump
    data/<name>/...   a copy of each data path (`name` is the path's base name, made unique)
    dumps/<name>      the output of each dump command

Manifest lines (`mode` is octal text, times are nanoseconds):

    {"format": "dropgate-snapshot/1", "run": 7, "created": 1795..., "previous": 6,
     "roots": [{"name": "uploads", "source": "/srv/gts/uploads"}]}
    {"root": "uploads", "path": ".", "type": "dir", "mode": "0750", "uid": 990, "gid": 990, "mtime_ns": ...}
    {"root": "uploads", "path": "a/b.pdf", "type": "file", "size": 5120, "mode": "0640", "uid": 990,
     "gid": 990, "mtime_ns": ..., "sha256": "...", "src_dev": ..., "src_ino": ..., "src_ctime_ns": ...}
    {"root": "uploads", "path": "latest", "type": "symlink", "target": "a/b.pdf", ...}
    {"root": "uploads", "path": "a/c.pdf", "type": "hardlink", "target": "a/b.pdf"}
    {"root": "dumps", "path": "db.sql", "type": "dump", "size": ..., "sha256": "..."}

`src_*` identify the live file the copy was read from: while the live file is
still that inode with that ctime, it has not changed since.

Snapshots after the first share every unchanged file with the previous one by
hard link (between snapshots only, never with the live data), so their cost
follows what changed. A file is unchanged when its size, mtime, mode and owner
are those recorded in the previous manifest *and* it is still the same inode
with the same ctime (a write, chmod or utime always moves ctime), and the
previous snapshot's copy still has the recorded size, mtime and mode. New files
are cloned (FICLONE) where the filesystem can, else copied in the kernel
(copy_file_range); the copy is then read once to hash it, so the manifest holds
the hash of the bytes stored. A snapshot is built in `<backups>/.<run id>.partial/`
and renamed into place only once it is complete, checked against its manifest
and synced to disk; any failure removes the partial folder.

Restoring copies out of the snapshot (never links to it): files whose inode and
ctime are still those recorded were not touched since the snapshot and are
left alone; everything else is rewritten atomically (temporary name, then
rename), extra entries are removed, names of one file are linked again, and
modes, owners and mtimes are set back.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import NoSpace, SnapshotError

FORMAT = "dropgate-snapshot/1"
SUMMARY = "snapshot.json"
MANIFEST = "manifest.jsonl"
DATA = "data"
DUMPS = "dumps"

_BUFFER = 1 << 20
_CHUNK = 64 << 20  # a stop request is seen by a copy in progress at least this often
_BLOCK = 4096
_FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
_RESTORE_PREFIX = ".dropgate-restore-"  # + pid: short, so that a name at the length limit still fits
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

Checkpoint = Callable[[], None]
Progress = Callable[[int, int], None]  # (bytes done, bytes expected)
DumpWriter = Callable[[Path], None]  # writes one dump to the given file


def _no_checkpoint() -> None:
    return None


def _no_progress(done: int, expected: int) -> None:
    return None


# -- sizes and names -------------------------------------------------------


def format_bytes(count: float) -> str:
    """`1.9 GiB`, `12.0 MiB`, `512 B`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover


def _blocks(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def root_names(sources: Sequence[Path]) -> list[str]:
    """The folder name of each data path under `data/`: its base name, made unique."""
    names: list[str] = []
    for source in sources:
        base = source.name or "root"
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _mode(info: os.stat_result) -> str:
    return f"{stat.S_IMODE(info.st_mode):04o}"


# -- walking ---------------------------------------------------------------


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under `root` (folders before their content, names sorted), with its lstat.

    `root` itself comes first as ".". Entries that vanish meanwhile are skipped.
    """
    info = os.lstat(root)
    yield ".", info
    if not stat.S_ISDIR(info.st_mode):
        return
    pending: list[str] = [""]
    while pending:
        rel = pending.pop()
        folder = os.path.join(root, rel) if rel else str(root)
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except FileNotFoundError:
            continue
        subfolders = []
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                child_info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield child, child_info
            if stat.S_ISDIR(child_info.st_mode):
                subfolders.append(child)
        pending.extend(reversed(subfolders))


def _kind(info: os.stat_result) -> str | None:
    if stat.S_ISREG(info.st_mode):
        return "file"
    if stat.S_ISDIR(info.st_mode):
        return "dir"
    if stat.S_ISLNK(info.st_mode):
        return "symlink"
    return None  # sockets, FIFOs, devices: not data


# -- manifests -------------------------------------------------------------


@dataclass
class Manifest:
    """A snapshot's manifest: the header and its entries."""

    header: dict[str, Any]
    entries: list[dict[str, Any]]

    @property
    def roots(self) -> list[dict[str, str]]:
        return list(self.header.get("roots", []))


def iter_manifest(dest: Path) -> Iterator[dict[str, Any]]:
    """The header of `dest/manifest.jsonl`, then its entries one by one (a tree of any size in little memory).

    SnapshotError if it is missing, not a manifest, or damaged.
    """
    path = dest / MANIFEST
    try:
        with open(path, encoding="utf-8") as handle:
            header = json.loads(handle.readline() or "null")
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise SnapshotError(f"{path}: not a {FORMAT} manifest")
            yield header
            for number, line in enumerate(handle, start=2):
                try:
                    entry = json.loads(line)
                    entry["root"], entry["path"], entry["type"]  # every entry has them
                except (ValueError, KeyError, TypeError) as error:
                    raise SnapshotError(f"{path}: line {number} is damaged ({error})") from error
                yield entry
    except FileNotFoundError:
        raise SnapshotError(f"{dest}: the snapshot has no manifest") from None
    except ValueError as error:
        raise SnapshotError(f"{path}: the manifest is damaged ({error})") from error


def read_manifest(dest: Path) -> Manifest:
    """Read all of `dest/manifest.jsonl`; SnapshotError if it is missing or not a manifest."""
    lines = iter_manifest(dest)
    header = next(lines)
    return Manifest(header, list(lines))


def _file_sha256(path: Path | str, buffer: bytearray | None = None) -> str:
    digest = hashlib.sha256()
    buf = buffer if buffer is not None else bytearray(_BUFFER)
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


# -- summaries and listing -------------------------------------------------


@dataclass(frozen=True)
class SnapshotInfo:
    """What `snapshot.json` says about one snapshot."""

    run: int
    path: Path
    created: float
    finished: float
    sources: tuple[str, ...]
    files: int
    dirs: int
    bytes: int
    new_files: int
    new_bytes: int
    shared_files: int
    previous: int | None
    dumps: Mapping[str, int] = field(default_factory=dict)
    verified_at: float | None = None
    verify_problems: tuple[str, ...] = ()
    changing_files: int = 0  # changed while copied (copies may be torn: databases need a dump)
    vanished_files: int = 0  # removed by the platform between the walk and their copy

    @property
    def verified(self) -> bool:
        return self.verified_at is not None and not self.verify_problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "path": str(self.path),
            "created": self.created,
            "finished": self.finished,
            "sources": list(self.sources),
            "files": self.files,
            "dirs": self.dirs,
            "bytes": self.bytes,
            "new_files": self.new_files,
            "new_bytes": self.new_bytes,
            "shared_files": self.shared_files,
            "previous": self.previous,
            "dumps": dict(self.dumps),
            "verified": self.verified,
            "verified_at": self.verified_at,
            "verify_problems": list(self.verify_problems),
            "changing_files": self.changing_files,
            "vanished_files": self.vanished_files,
        }


def read_summary(dest: Path) -> SnapshotInfo:
    """The summary of the complete snapshot at `dest`; SnapshotError if there is none."""
    try:
        raw = json.loads((dest / SUMMARY).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SnapshotError(f"{dest}: no complete snapshot there") from None
    except ValueError as error:
        raise SnapshotError(f"{dest / SUMMARY}: damaged ({error})") from error
    return SnapshotInfo(
        run=int(raw["run"]),
        path=dest,
        created=float(raw["created"]),
        finished=float(raw["finished"]),
        sources=tuple(raw["sources"]),
        files=int(raw["files"]),
        dirs=int(raw["dirs"]),
        bytes=int(raw["bytes"]),
        new_files=int(raw["new_files"]),
        new_bytes=int(raw["new_bytes"]),
        shared_files=int(raw["shared_files"]),
        previous=raw.get("previous"),
        dumps=dict(raw.get("dumps", {})),
        verified_at=raw.get("verified_at"),
        verify_problems=tuple(raw.get("verify_problems", ())),
        changing_files=int(raw.get("changing_files", 0)),
        vanished_files=int(raw.get("vanished_files", 0)),
    )


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot_dir(backups_dir: Path, run_id: int) -> Path:
    return backups_dir / str(run_id)


def _partial_dir(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.partial")


def list_snapshots(backups_dir: Path) -> list[SnapshotInfo]:
    """The complete snapshots under `backups_dir`, oldest run first (damaged summaries skipped)."""
    found = []
    try:
        names = os.listdir(backups_dir)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            found.append(read_summary(backups_dir / name))
        except (SnapshotError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda info: info.run)


def latest_snapshot(backups_dir: Path, *, before: int | None = None) -> SnapshotInfo | None:
    """The newest complete, verified snapshot (of a run older than `before`, if given)."""
    candidates = [
        info for info in list_snapshots(backups_dir) if info.verified and (before is None or info.run < before)
    ]
    return candidates[-1] if candidates else None


def prune_snapshots(backups_dir: Path, keep: int, protect: Collection[int] = ()) -> list[Path]:
    """Remove complete snapshots beyond the newest `keep`, never one in `protect`; also stale partial ones.

    Returns the folders removed. Shared files live on in the snapshots that keep them.
    """
    removed = []
    snapshots = list_snapshots(backups_dir)
    for info in snapshots[: max(0, len(snapshots) - keep)]:
        if info.run in protect:
            continue
        shutil.rmtree(info.path)
        removed.append(info.path)
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(backups_dir):
            if name.startswith(".") and name.endswith(".partial"):
                shutil.rmtree(backups_dir / name, ignore_errors=True)
                removed.append(backups_dir / name)
    return removed


# -- estimating ------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """What the next snapshot will hold and cost."""

    files: int
    dirs: int
    bytes: int  # every byte of every file in the data paths
    new_files: int  # files that must be written (the rest are shared)
    new_bytes: int
    need_bytes: int  # space to be found on the backups filesystem (blocks, folders, manifest, dumps)
    need_inodes: int


@dataclass
class _Previous:
    """The previous snapshot's files, by source and path, to decide what is unchanged.

    Each file is kept as a tuple in `_FILE_KEYS` order (a dict per file would cost
    several times the memory on large trees).
    """

    run: int | None
    path: Path | None
    files: dict[str, dict[str, tuple[Any, ...]]]  # source -> path -> fields
    roots: dict[str, str]  # source -> its folder in the previous snapshot
    dumps: dict[str, int]

    @classmethod
    def load(cls, previous: Path | None) -> _Previous:
        if previous is None:
            return cls(None, None, {}, {}, {})
        info = read_summary(previous)
        lines = iter_manifest(previous)
        header = next(lines)
        roots = {root["source"]: os.path.join(previous, DATA, root["name"]) for root in header["roots"]}
        by_name: dict[str, dict[str, tuple[Any, ...]]] = {root["name"]: {} for root in header["roots"]}
        for entry in lines:
            files = by_name.get(entry["root"])
            if files is not None and entry["type"] == "file":
                files[entry["path"]] = tuple(entry.get(key) for key in _FILE_KEYS)
        files_by_source = {root["source"]: by_name[root["name"]] for root in header["roots"]}
        return cls(info.run, previous, files_by_source, roots, dict(info.dumps))

    def unchanged(self, source: str, rel: str, info: os.stat_result) -> tuple[Any, ...] | None:
        """The previous fields of the live file at `rel` if it has not changed since, else None."""
        files = self.files.get(source)
        fields = files.get(rel) if files is not None else None
        if fields is None:
            return None
        size, mode, uid, gid, mtime_ns, dev, ino, ctime_ns, _sha256, _xattrs = fields
        same = (
            size == info.st_size
            and mtime_ns == info.st_mtime_ns
            and ino == info.st_ino
            and ctime_ns == info.st_ctime_ns
            and dev == info.st_dev
            and uid == info.st_uid
            and gid == info.st_gid
            and mode == _mode(info)
        )
        return fields if same else None

    def copy_of(self, source: str, rel: str) -> str:
        return f"{self.roots[source]}/{rel}"


def _estimate(sources: Sequence[Path], previous: _Previous, dump_bytes: int) -> Estimate:
    files = dirs = total = new_files = new_bytes = need = 0
    for source in sources:
        inodes: set[tuple[int, int]] = set()
        for rel, info in _walk(source):
            kind = _kind(info)
            if kind == "file" and info.st_nlink > 1:
                if (info.st_dev, info.st_ino) in inodes:
                    files += 1
                    continue
                inodes.add((info.st_dev, info.st_ino))
            if kind == "dir":
                dirs += 1
                need += _BLOCK
            elif kind == "file":
                files += 1
                total += info.st_size
                if previous.unchanged(str(source), rel, info) is None:
                    new_files += 1
                    new_bytes += info.st_size
                    need += _blocks(info.st_size)
            need += 160  # its manifest line
    need += dump_bytes + _BLOCK * 8
    return Estimate(files, dirs, total, new_files, new_bytes, need, new_files + dirs + 16)


def estimate_snapshot(sources: Sequence[Path], previous: Path | None = None, *, dump_bytes: int = 0) -> Estimate:
    """What a snapshot of `sources` taken now would hold, and the space it would need on top of `previous`."""
    return _estimate(sources, _Previous.load(previous), dump_bytes)


@dataclass(frozen=True)
class Space:
    free_bytes: int
    free_inodes: int


def probe_space(path: Path) -> Space:
    """Bytes and inodes available (to an unprivileged writer) on the filesystem of `path`."""
    vfs = os.statvfs(path)
    inodes = vfs.f_favail if vfs.f_files else 2**63  # some filesystems report no inode limit
    return Space(vfs.f_bavail * vfs.f_frsize, inodes)


# -- copying ---------------------------------------------------------------


@dataclass(frozen=True)
class _Copied:
    sha256: str
    info: os.stat_result  # the source as it was after its (last) copy
    size: int  # the bytes copied
    settled: bool  # the source did not change while it was copied
    xattrs: dict[str, str] | None


class _Copier:
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
            buf = self._local.buffer = bytearray(_BUFFER)
        return buf

    def copy(self, src: str, dst: str, owner: bool) -> _Copied:
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
        return _Copied(digest, after, size, settled, xattrs)

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
            n = os.readv(fi, [view[: min(_BUFFER, size - done)]])
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
            raise _Abandoned


class _Abandoned(Exception):
    """A copy ended early because its snapshot was abandoned (its partial folder is being removed)."""


def _apply_meta(path: str, entry: Mapping[str, Any], owner: bool) -> None:
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


def _restore_xattrs(path: str, entry: Mapping[str, Any]) -> None:
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


def _can_chown() -> bool:
    return os.geteuid() == 0


# -- taking ----------------------------------------------------------------


class _Throttle:
    """Calls `progress` at most every 1 % or half second."""

    def __init__(self, progress: Progress, expected: int, now: Callable[[], float] = time.monotonic) -> None:
        self.progress = progress
        self.expected = max(1, expected)
        self.now = now
        self.done = 0
        self._last_done = -1
        self._last_at = 0.0

    def add(self, count: int, *, force: bool = False) -> None:
        self.done += count
        at = self.now()
        if force or self.done - self._last_done >= self.expected / 100 or at - self._last_at >= 0.5:
            self._last_done, self._last_at = self.done, at
            self.progress(min(self.done, self.expected), self.expected)


def take_snapshot(
    sources: Sequence[Path],
    dest: Path,
    previous: Path | None = None,
    *,
    run_id: int,
    dumps: Sequence[tuple[str, DumpWriter]] = (),
    checkpoint: Checkpoint = _no_checkpoint,
    progress: Progress = _no_progress,
    space: Callable[[Path], Space] = probe_space,
    workers: int | None = None,
    reflink: bool = True,
    durable: bool = True,
    write: Callable[[int, memoryview], int] = os.write,
    now: Callable[[], float] = time.time,
) -> SnapshotInfo:
    """Snapshot every path of `sources` (and each dump) into `dest`, verified, sharing unchanged files.

    Checks first that the space is there (NoSpace naming the folder and the missing
    bytes, before anything is written); builds the snapshot in a partial folder that
    any failure removes (a full disk raises NoSpace naming the file being copied;
    `write` is the one call that writes file content, for tests without a small filesystem);
    checks every entry against the manifest (type, size, mode, mtime, links; the hashes
    were computed from the copies themselves, shared files' when they were first
    written); syncs it to disk; renames it into place. A previous snapshot whose
    manifest cannot be read is not used: this one is then a full copy.
    """
    if dest.exists():
        raise SnapshotError(f"{dest} already exists; a snapshot is never overwritten")
    missing_sources = [str(source) for source in sources if not os.path.lexists(source)]
    if missing_sources:
        raise SnapshotError(f"data path {', '.join(missing_sources)} does not exist")
    try:
        prev = _Previous.load(previous)
    except (SnapshotError, KeyError, TypeError):
        prev = _Previous.load(None)
    created = now()
    dump_hint = sum(prev.dumps.values())
    estimate = _estimate(sources, prev, dump_hint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = space(dest.parent)
    if estimate.need_bytes > free.free_bytes:
        missing = estimate.need_bytes - free.free_bytes
        raise NoSpace(
            f"not enough space for the backup in {dest.parent}: {format_bytes(estimate.need_bytes)} needed "
            f"({estimate.new_files:,} files to copy), {format_bytes(free.free_bytes)} free, "
            f"{missing:,} bytes missing",
            path=dest.parent,
            missing=missing,
        )
    if estimate.need_inodes > free.free_inodes:
        raise NoSpace(
            f"not enough inodes for the backup in {dest.parent}: {estimate.need_inodes:,} needed, "
            f"{free.free_inodes:,} free",
            path=dest.parent,
            missing=0,
        )
    partial = _partial_dir(dest)
    if partial.exists():
        shutil.rmtree(partial)  # left by a run that died; never trusted
    partial.mkdir(mode=0o700)
    throttle = _Throttle(progress, estimate.bytes + dump_hint)
    try:
        summary = _fill(
            sources,
            partial=partial,
            prev=prev,
            run_id=run_id,
            created=created,
            dumps=dumps,
            checkpoint=checkpoint,
            throttle=throttle,
            workers=workers,
            reflink=reflink,
            space=space,
            write=write,
        )
        _check_verified(partial, verify_snapshot(partial, hashes=False, checkpoint=checkpoint))
        summary["verified_at"] = now()
        summary["verify_problems"] = []
        summary["finished"] = now()
        _write_json_atomic(partial / SUMMARY, summary)
        if durable:
            _sync_filesystem(partial)
        checkpoint()
        os.rename(partial, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    throttle.add(max(0, throttle.expected - throttle.done), force=True)  # complete, whatever vanished
    return read_summary(dest)


def _check_verified(dest: Path, problems: Sequence[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise SnapshotError(f"the snapshot {dest} failed verification: {problems[0]}{more}")


def _fill(
    sources: Sequence[Path],
    *,
    partial: Path,
    prev: _Previous,
    run_id: int,
    created: float,
    dumps: Sequence[tuple[str, DumpWriter]],
    checkpoint: Checkpoint,
    throttle: _Throttle,
    workers: int | None,
    reflink: bool,
    space: Callable[[Path], Space],
    write: Callable[[int, memoryview], int],
) -> dict[str, Any]:
    """Copy or link every entry into `partial`, write the manifest, run the dumps; return the summary."""
    owner = _can_chown()
    names = root_names(sources)
    copier = _Copier(reflink, write)
    counts = dict.fromkeys(
        ("files", "dirs", "bytes", "new_files", "new_bytes", "shared_files", "changing_files", "vanished_files"), 0
    )
    folders: list[tuple[str, dict[str, Any]]] = []  # folder times are set once their content is in
    pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1), thread_name_prefix="snapshot")
    window: deque[tuple[dict[str, Any], str, Future[_Copied]]] = deque()
    limit = 64
    manifest_path = partial / MANIFEST
    current = ""

    def settle(manifest: Any, block: bool) -> None:
        while window and (block or len(window) >= limit or window[0][2].done()):
            entry, src, future = window.popleft()
            try:
                copied = future.result()
            except FileNotFoundError as error:
                if error.filename != src:
                    raise _translate(error, src, partial, space, throttle) from error
                counts["vanished_files"] += 1  # removed by the platform since the walk saw it
                counts["files"] -= 1
                continue
            except OSError as error:
                raise _translate(error, src, partial, space, throttle) from error
            entry.update(_file_fields(copied.info), size=copied.size, sha256=copied.sha256)
            if copied.xattrs:
                entry["xattrs"] = copied.xattrs
            manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
            counts["new_files"] += 1
            counts["new_bytes"] += copied.size
            counts["bytes"] += copied.size
            counts["changing_files"] += not copied.settled
            throttle.add(copied.size)

    manifest = None
    try:
        manifest = open(manifest_path, "w", encoding="utf-8")  # noqa: SIM115 - closed below, quietly on failure
        header = {
            "format": FORMAT,
            "run": run_id,
            "created": created,
            "previous": prev.run,
            "roots": [{"name": name, "source": str(src)} for name, src in zip(names, sources, strict=True)],
        }
        manifest.write(json.dumps(header, separators=(",", ":")) + "\n")
        (partial / DATA).mkdir()
        for name, source_path in zip(names, sources, strict=True):
            source, base = str(source_path), str(partial / DATA / name)
            inodes: dict[tuple[int, int], str] = {}  # files with several names: the first name seen
            links: list[tuple[str, str, dict[str, Any]]] = []  # made once every file of this path is in
            for rel, info in _walk(source_path):
                checkpoint()
                kind = _kind(info)
                if kind is None:
                    continue
                src = source if rel == "." else f"{source}/{rel}"
                dst = base if rel == "." else f"{base}/{rel}"
                current = src
                entry: dict[str, Any] = {"root": name, "path": rel, "type": kind}
                if kind == "dir":
                    os.mkdir(dst, 0o700)
                    entry.update(_meta_fields(info))
                    xattrs = read_xattrs(src)
                    if xattrs:
                        entry["xattrs"] = xattrs
                    folders.append((dst, entry))
                    counts["dirs"] += 1
                    manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
                elif kind == "symlink":
                    try:
                        target = os.readlink(src)
                    except FileNotFoundError:
                        counts["vanished_files"] += 1
                        continue
                    os.symlink(target, dst)
                    entry.update(_meta_fields(info), target=target)
                    xattrs = read_xattrs(src)
                    if xattrs:
                        entry["xattrs"] = xattrs
                    _apply_meta(dst, entry, owner)
                    manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
                elif info.st_nlink > 1 and (info.st_dev, info.st_ino) in inodes:
                    first = inodes[(info.st_dev, info.st_ino)]
                    entry.update(target=first)
                    entry["type"] = "hardlink"
                    links.append((f"{base}/{first}", dst, entry))
                    counts["files"] += 1
                else:
                    if info.st_nlink > 1:
                        inodes[(info.st_dev, info.st_ino)] = rel
                    counts["files"] += 1
                    shared = prev.unchanged(source, rel, info)
                    if shared is not None and _link_previous(prev.copy_of(source, rel), dst, shared):
                        entry.update((k, v) for k, v in zip(_FILE_KEYS, shared, strict=True) if v is not None)
                        counts["shared_files"] += 1
                        counts["bytes"] += info.st_size
                        throttle.add(info.st_size)
                        manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
                    else:
                        window.append((entry, src, pool.submit(copier.copy, src, dst, owner)))
                settle(manifest, block=False)
            if links:
                settle(manifest, block=True)
                for first_copy, dst, entry in links:
                    current = dst
                    try:
                        os.link(first_copy, dst)
                    except FileNotFoundError:
                        counts["vanished_files"] += 1  # its first name was removed before it was copied
                        counts["files"] -= 1
                        continue
                    manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
        settle(manifest, block=True)
        for dst, entry in reversed(folders):
            _apply_meta(dst, entry, owner)
        current = str(manifest_path)
        manifest.flush()
        dump_sizes = _run_dumps(
            partial, dumps, manifest=manifest, checkpoint=checkpoint, throttle=throttle, space=space
        )
        current = str(manifest_path)
        manifest.flush()
        os.fsync(manifest.fileno())
        manifest.close()
    except OSError as error:
        raise _translate(error, current, partial, space, throttle) from error
    finally:
        copier.stop.set()  # nothing is left to copy on success; on failure, copies in progress end early
        pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(OSError, AttributeError):
            manifest.close()  # type: ignore[union-attr]  # after a failure (a full disk) the buffered lines are lost with the partial folder
    return {
        "format": FORMAT,
        "run": run_id,
        "created": created,
        "previous": prev.run,
        "sources": [str(source) for source in sources],
        **counts,
        "cloned_files": copier.cloned,
        "dumps": dump_sizes,
        "manifest_sha256": _file_sha256(manifest_path),
    }


_FILE_KEYS = ("size", "mode", "uid", "gid", "mtime_ns", "src_dev", "src_ino", "src_ctime_ns", "sha256", "xattrs")


def _meta_fields(info: os.stat_result) -> dict[str, Any]:
    return {"mode": _mode(info), "uid": info.st_uid, "gid": info.st_gid, "mtime_ns": info.st_mtime_ns}


def _file_fields(info: os.stat_result) -> dict[str, Any]:
    return {
        "size": info.st_size,
        **_meta_fields(info),
        "src_dev": info.st_dev,
        "src_ino": info.st_ino,
        "src_ctime_ns": info.st_ctime_ns,
    }


def _link_previous(previous_copy: str, dst: str, fields: tuple[Any, ...]) -> bool:
    """Hard-link the previous snapshot's copy if it is still as recorded; False to copy instead."""
    size, mode, _uid, _gid, mtime_ns = fields[:5]
    try:
        info = os.lstat(previous_copy)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode) or (info.st_size, info.st_mtime_ns, _mode(info)) != (size, mtime_ns, mode):
        return False
    try:
        os.link(previous_copy, dst)
    except OSError as error:
        if error.errno in (errno.EMLINK, errno.EXDEV, errno.EPERM):
            return False
        raise
    return True


def _run_dumps(
    partial: Path,
    dumps: Sequence[tuple[str, DumpWriter]],
    *,
    manifest: Any,
    checkpoint: Checkpoint,
    throttle: _Throttle,
    space: Callable[[Path], Space],
) -> dict[str, int]:
    sizes: dict[str, int] = {}
    if not dumps:
        return sizes
    folder = partial / DUMPS
    folder.mkdir(mode=0o700)
    for name, write in dumps:
        checkpoint()
        target = folder / name
        try:
            write(target)
        except Exception as error:
            written = target.stat().st_size if target.exists() else 0
            if space(partial).free_bytes < _BUFFER:
                raise NoSpace(
                    f"the backup disk filled while writing the dump {name} to {target} "
                    f"({written:,} bytes written, {space(partial).free_bytes:,} free; its full size is unknown)",
                    path=target,
                    missing=0,
                ) from error
            raise
        info = os.stat(target)
        os.chmod(target, 0o600)
        entry = {"root": DUMPS, "path": name, "type": "dump", "size": info.st_size, "sha256": _file_sha256(target)}
        manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
        sizes[name] = info.st_size
        throttle.add(info.st_size)
    return sizes


def _translate(
    error: OSError, where: str, partial: Path, space: Callable[[Path], Space], throttle: _Throttle
) -> SnapshotError:
    """A full disk becomes NoSpace naming the file and the bytes still to write; the rest a one-liner."""
    if error.errno in _NO_SPACE:
        try:
            free = space(partial).free_bytes
        except OSError:
            free = 0
        remaining = max(0, throttle.expected - throttle.done)
        missing = max(1, remaining - free)
        if not remaining:
            return NoSpace(
                f"the backup disk ({partial.parent}) filled while writing {where} "
                f"(every file was copied; {format_bytes(free)} free)",
                path=Path(where),
                missing=missing,
            )
        return NoSpace(
            f"the backup disk ({partial.parent}) filled while copying {where}: about {missing:,} more bytes "
            f"were needed ({format_bytes(remaining)} still to write, {format_bytes(free)} free)",
            path=Path(where),
            missing=missing,
        )
    return SnapshotError(f"backup of {error.filename or where} failed: {error.strerror or error}")


def _sync_filesystem(path: Path) -> None:
    """Flush the filesystem of `path` to disk (syncfs; `sync` where it is unavailable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    except (OSError, AttributeError):
        os.sync()
    finally:
        os.close(fd)


# -- verifying -------------------------------------------------------------


def verify_snapshot(
    dest: Path,
    *,
    hashes: bool = True,
    checkpoint: Checkpoint = _no_checkpoint,
    progress: Progress = _no_progress,
    limit: int = 50,
) -> list[str]:
    """Check the snapshot at `dest` against its manifest; the problems found (empty: verified).

    Every entry must be there with its type, size, mode and mtime, and nothing else;
    every file's SHA-256 is recomputed unless `hashes` is false (the check right after
    taking a snapshot, whose hashes were just computed from its own copies).
    The manifest must match the checksum the summary holds, when there is one.
    """
    problems: list[str] = []
    expected_bytes = 0
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        summary = json.loads((dest / SUMMARY).read_text(encoding="utf-8"))
        expected_bytes = int(summary["bytes"]) + sum(summary.get("dumps", {}).values()) if hashes else 0
        if summary["manifest_sha256"] != _file_sha256(dest / MANIFEST):
            problems.append(f"{dest / MANIFEST}: changed since the snapshot was taken (checksum differs)")
    throttle = _Throttle(progress, expected_bytes)
    buffer = bytearray(_BUFFER)
    listed: set[str] = {MANIFEST, SUMMARY, DATA}
    base = str(dest)
    try:
        for entry in itertools.islice(iter_manifest(dest), 1, None):
            checkpoint()
            if len(problems) >= limit:
                problems.append("… more problems not listed")
                break
            rel = entry["path"]
            if entry["type"] == "dump":
                name = f"{DUMPS}/{rel}"
                listed.add(DUMPS)
            else:
                name = f"{DATA}/{entry['root']}" if rel == "." else f"{DATA}/{entry['root']}/{rel}"
            listed.add(name)
            path = f"{base}/{name}"
            problem = _check_entry(path, entry)
            if problem is None and hashes and entry["type"] in ("file", "dump"):
                try:
                    if _file_sha256(path, buffer) != entry["sha256"]:
                        problem = f"{path}: content differs from the manifest (SHA-256 mismatch)"
                except OSError as error:
                    problem = f"{path}: cannot be read ({error.strerror})"
                throttle.add(entry["size"])
            if problem is not None:
                problems.append(problem)
    except SnapshotError as error:
        problems.append(str(error))
        return problems
    if len(problems) < limit:
        problems.extend(_extra_entries(dest, listed))
    throttle.add(0, force=True)
    return problems[: limit + 1]


def _check_entry(path: str, entry: Mapping[str, Any]) -> str | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{path}: missing from the snapshot"
    if entry["type"] == "hardlink":
        first = f"{path[: len(path) - len(entry['path'])]}{entry['target']}"
        try:
            same = stat.S_ISREG(info.st_mode) and os.lstat(first).st_ino == info.st_ino
        except FileNotFoundError:
            same = False
        return None if same else f"{path}: should be the same file as {first}"
    kind = "file" if entry["type"] == "dump" else entry["type"]
    if _kind(info) != kind:
        return f"{path}: is a {_kind(info) or 'special file'}, the manifest says {kind}"
    if kind == "file" and info.st_size != entry["size"]:
        return f"{path}: {info.st_size:,} bytes, the manifest says {entry['size']:,}"
    if entry["type"] == "dump":
        return None
    if kind != "symlink" and _mode(info) != entry["mode"]:
        return f"{path}: mode {_mode(info)}, the manifest says {entry['mode']}"
    if kind == "file" and info.st_mtime_ns != entry["mtime_ns"]:
        return f"{path}: modified after the snapshot (mtime differs from the manifest)"
    if kind == "symlink" and os.readlink(path) != entry["target"]:
        return f"{path}: points to {os.readlink(path)!r}, the manifest says {entry['target']!r}"
    return None


def _extra_entries(dest: Path, listed: set[str]) -> list[str]:
    extra = []
    for base in (DATA, DUMPS):
        if not (dest / base).is_dir():
            continue
        for rel, _info in _walk(dest / base):
            name = base if rel == "." else f"{base}/{rel}"
            if name not in listed:
                extra.append(f"{dest / name}: not in the manifest")
    return extra


def record_verification(dest: Path, problems: Sequence[str], now: Callable[[], float] = time.time) -> None:
    """Store the outcome of a re-check in the snapshot's summary (`backups` shows it)."""
    raw = json.loads((dest / SUMMARY).read_text(encoding="utf-8"))
    raw["verified_at"] = now()
    raw["verify_problems"] = list(problems)
    _write_json_atomic(dest / SUMMARY, raw)


# -- restoring -------------------------------------------------------------


@dataclass(frozen=True)
class RestoreReport:
    """What a restore did."""

    restored_files: int
    kept_files: int
    removed: int
    bytes: int


def restore_snapshot(
    dest: Path,
    *,
    targets: Mapping[str, Path] | None = None,
    verify: bool = True,
    durable: bool = True,
    checkpoint: Checkpoint = _no_checkpoint,
    progress: Progress = _no_progress,
) -> RestoreReport:
    """Put every data path back exactly as the snapshot at `dest` holds it.

    Verifies the whole snapshot first (SnapshotError and nothing touched if it fails).
    `targets` maps a recorded source path to where it is restored (default: in place).
    Unchanged files (same inode and ctime as recorded) are kept; the rest are copied
    out of the snapshot under a temporary name and renamed over the live one; entries
    the snapshot does not have are removed; modes, owners, mtimes and extended
    attributes are set back; each restored filesystem is synced before returning.
    """
    if verify:
        problems = verify_snapshot(dest, checkpoint=checkpoint)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise SnapshotError(f"the snapshot {dest} failed verification, nothing was restored: {problems[0]}{more}")
    manifest = read_manifest(dest)
    owner = _can_chown()
    by_root: dict[str, list[dict[str, Any]]] = {}
    for entry in manifest.entries:
        by_root.setdefault(entry["root"], []).append(entry)
    expected = sum(e["size"] for e in manifest.entries if e["type"] == "file")
    throttle = _Throttle(progress, expected)
    totals = [0, 0, 0, 0]
    for root in manifest.roots:
        source = root["source"]
        target = Path(targets[source]) if targets and source in targets else Path(source)
        entries = by_root.get(root["name"], [])
        counts = _restore_root(
            dest / DATA / root["name"], target, entries, owner=owner, checkpoint=checkpoint, throttle=throttle
        )
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
        if durable:
            _sync_filesystem(target if target.is_dir() else target.parent)
    throttle.add(0, force=True)
    return RestoreReport(*totals)


def _restore_root(
    copy_root: Path,
    target: Path,
    entries: list[dict[str, Any]],
    *,
    owner: bool,
    checkpoint: Checkpoint,
    throttle: _Throttle,
) -> tuple[int, int, int, int]:
    wanted = {entry["path"]: entry for entry in entries}
    removed = restored = kept = copied_bytes = 0
    # 1. Remove what the snapshot does not have (or has as another type), deepest first.
    if os.path.lexists(target):
        live = list(_walk(target))
        for rel, info in reversed(live):
            checkpoint()
            entry = wanted.get(rel)
            if (entry is not None and entry["type"] == _kind(info)) or _kind(info) is None:
                continue  # kept, or a socket/FIFO/device: never data, never touched
            path = target if rel == "." else target / rel
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    # 2. Put back every entry, folders before their content.
    copier = _Copier(reflink=True)
    folders = []
    for entry in entries:
        checkpoint()
        rel = entry["path"]
        path = target if rel == "." else target / rel
        kind = entry["type"]
        if kind == "dir":
            if not path.is_dir() or path.is_symlink():
                path.mkdir(mode=0o700, parents=rel == ".")
            folders.append((str(path), entry))
        elif kind == "symlink":
            if not (path.is_symlink() and os.readlink(path) == entry["target"]):
                _replace_with_symlink(path, entry["target"])
            _apply_meta(str(path), entry, owner)
            _restore_xattrs(str(path), entry)
        elif kind == "hardlink":
            tmp = path.with_name(f"{_RESTORE_PREFIX}{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.link(target / entry["target"], tmp)
            os.replace(tmp, path)
        elif kind == "file":
            if _untouched(path, entry):
                kept += 1
            else:
                tmp = path.with_name(f"{_RESTORE_PREFIX}{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                copy = copy_root if rel == "." else copy_root / rel
                path.parent.mkdir(parents=True, exist_ok=True)  # a data path that is one file, its folder gone
                copier.copy(str(copy), str(tmp), owner=False)
                _apply_meta(str(tmp), entry, owner)
                _restore_xattrs(str(tmp), entry)
                os.replace(tmp, path)
                restored += 1
                copied_bytes += entry["size"]
            throttle.add(entry["size"])
    for folder, entry in reversed(folders):
        _restore_xattrs(folder, entry)
        _apply_meta(folder, entry, owner)
    return restored, kept, removed, copied_bytes


def _untouched(path: Path, entry: Mapping[str, Any]) -> bool:
    """The live file is still the very inode the snapshot read, unmodified since (ctime unmoved)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISREG(info.st_mode)
        and info.st_ino == entry.get("src_ino")
        and info.st_dev == entry.get("src_dev")
        and info.st_ctime_ns == entry.get("src_ctime_ns")
        and info.st_size == entry["size"]
        and info.st_mtime_ns == entry["mtime_ns"]
        and _mode(info) == entry["mode"]
    )


def _replace_with_symlink(path: Path, target: str) -> None:
    tmp = path.with_name(f"{_RESTORE_PREFIX}{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)
