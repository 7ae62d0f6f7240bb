"""Space: what the next snapshot will need, what the disk has, and a full disk told in bytes."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import NoSpace, SnapshotError
from pipeline.snapshot.layout import BLOCK, format_bytes, root_names
from pipeline.snapshot.manifest import Previous
from pipeline.snapshot.tree import kind_of, walk_tree

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


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


def blocks(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def manifest_line_bytes(root: str, rel: str) -> int:
    """An upper bound of the manifest line of one entry (ASCII JSON: other characters take up to 12 bytes)."""
    name = len(root) + len(rel)
    return 256 + (name if root.isascii() and rel.isascii() else 12 * name)


class Tally:
    """What a snapshot holds and needs, counted entry by entry along the walk (the estimate, or the guard)."""

    def __init__(self, dump_bytes: int) -> None:
        self.dump_bytes = dump_bytes
        self.files = self.dirs = self.bytes = self.new_files = self.new_bytes = 0
        self.need = dump_bytes + BLOCK * 8  # dumps (their size last time), the snapshot's own files

    def entry(self, root: str, rel: str, kind: str, size: int = 0, *, new: bool = False) -> None:
        """One entry of the walk: a `dir`, a `file` (`new`: to be written), a second `name` of a file, ..."""
        self.need += manifest_line_bytes(root, rel)
        if kind == "dir":
            self.dirs += 1
            self.need += BLOCK
        elif kind == "name":
            self.files += 1
        elif kind == "file":
            self.files += 1
            self.bytes += size
            if new:
                self.new_files += 1
                self.new_bytes += size
                self.need += blocks(size)

    @property
    def inodes(self) -> int:
        return self.new_files + self.dirs + 16

    def over(self, free: Space) -> bool:
        return self.need > free.free_bytes or self.inodes > free.free_inodes

    def estimate(self) -> Estimate:
        return Estimate(self.files, self.dirs, self.bytes, self.new_files, self.new_bytes, self.need, self.inodes)


def refusal(estimate: Estimate, free: Space, backups: Path) -> NoSpace | None:
    """NoSpace naming the backups folder and what is missing, if `estimate` does not fit in `free`."""
    if estimate.need_bytes > free.free_bytes:
        missing = estimate.need_bytes - free.free_bytes
        return NoSpace(
            f"not enough space for the backup in {backups}: {format_bytes(estimate.need_bytes)} needed "
            f"({estimate.new_files:,} files to copy), {format_bytes(free.free_bytes)} free, "
            f"{missing:,} bytes missing",
            path=backups,
            missing=missing,
        )
    if estimate.need_inodes > free.free_inodes:
        return NoSpace(
            f"not enough inodes for the backup in {backups}: {estimate.need_inodes:,} needed, "
            f"{free.free_inodes:,} free",
            path=backups,
            missing=0,
        )
    return None


def estimate_with(sources: Sequence[Path], previous: Previous, dump_bytes: int) -> Estimate:
    """Walk `sources` as the snapshot will, counting what it will hold and what must be written.

    A racy file (`Match.racy`) counts as shared: it can only differ from its previous
    copy if it was written again within the same tick of the filesystem's clock.
    """
    tally = Tally(dump_bytes)
    for root, source in zip(root_names(sources), sources, strict=True):
        inodes: set[tuple[int, int]] = set()
        known = previous.files(str(source))
        try:
            for rel, info in walk_tree(source):
                kind = kind_of(info)
                if kind == "file" and info.st_nlink > 1:
                    if (info.st_dev, info.st_ino) in inodes:
                        tally.entry(root, rel, "name")
                        continue
                    inodes.add((info.st_dev, info.st_ino))
                if kind == "file":
                    tally.entry(root, rel, kind, info.st_size, new=known.match(rel, info) is None)
                else:
                    tally.entry(root, rel, kind or "other")
        finally:
            known.close()
    return tally.estimate()


def estimate_snapshot(sources: Sequence[Path], previous: Path | None = None, *, dump_bytes: int = 0) -> Estimate:
    """What a snapshot of `sources` taken now would hold, and the space it would need on top of `previous`.

    A previous snapshot that cannot be used (incomplete, its manifest changed) is left
    out, as the snapshot itself would: everything then counts as written.
    """
    try:
        known = Previous.load(previous)
    except (SnapshotError, KeyError, TypeError, ValueError):
        known = Previous.load(None)
    return estimate_with(sources, known, dump_bytes)


@dataclass(frozen=True)
class Space:
    free_bytes: int
    free_inodes: int


def probe_space(path: Path) -> Space:
    """Bytes and inodes available (to an unprivileged writer) on the filesystem of `path`."""
    vfs = os.statvfs(path)
    inodes = vfs.f_favail if vfs.f_files else 2**63  # some filesystems report no inode limit
    return Space(vfs.f_bavail * vfs.f_frsize, inodes)


def disk_error(
    error: OSError,
    *,
    backups: Path,
    doing: str,
    path: Path | str,
    still_to_write: int,
    space: Callable[[Path], Space],
) -> SnapshotError:
    """A full disk becomes NoSpace naming what was being written and the bytes missing; the rest a one-liner.

    `doing` says what was being written ("copying /srv/data/a.pdf", "writing the
    snapshot's manifest /backups/.7.partial/manifest.jsonl"); `still_to_write` is
    every byte the snapshot had yet to write, this file's included; `path` the file
    (the live file being copied, or the snapshot's own file) the error is about.
    """
    if error.errno not in _NO_SPACE:
        where = error.filename or doing
        return SnapshotError(f"backup failed while {doing}: {where}: {error.strerror or error}")
    try:
        free = space(backups)
    except OSError:
        free = Space(0, 0)
    if free.free_inodes == 0:
        return NoSpace(
            f"the backup disk ({backups}) ran out of inodes (room for new files) while {doing}; "
            f"{format_bytes(free.free_bytes)} free",
            path=Path(path),
            missing=0,
        )
    missing = max(1, still_to_write - free.free_bytes)
    return NoSpace(
        f"the backup disk ({backups}) filled while {doing}: about {missing:,} more bytes were needed "
        f"({format_bytes(still_to_write)} still to write, {format_bytes(free.free_bytes)} free)",
        path=Path(path),
        missing=missing,
    )
