"""Space: what the next snapshot will need, what the disk has, and a full disk told in bytes."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import NoSpace, SnapshotError
from pipeline.snapshot.layout import BLOCK, format_bytes
from pipeline.snapshot.manifest import Previous
from pipeline.snapshot.progress import Throttle
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


def estimate_with(sources: Sequence[Path], previous: Previous, dump_bytes: int) -> Estimate:
    files = dirs = total = new_files = new_bytes = need = 0
    for source in sources:
        inodes: set[tuple[int, int]] = set()
        for rel, info in walk_tree(source):
            kind = kind_of(info)
            if kind == "file" and info.st_nlink > 1:
                if (info.st_dev, info.st_ino) in inodes:
                    files += 1
                    continue
                inodes.add((info.st_dev, info.st_ino))
            if kind == "dir":
                dirs += 1
                need += BLOCK
            elif kind == "file":
                files += 1
                total += info.st_size
                if previous.unchanged(str(source), rel, info) is None:
                    new_files += 1
                    new_bytes += info.st_size
                    need += blocks(info.st_size)
            need += 160  # its manifest line
    need += dump_bytes + BLOCK * 8
    return Estimate(files, dirs, total, new_files, new_bytes, need, new_files + dirs + 16)


def estimate_snapshot(sources: Sequence[Path], previous: Path | None = None, *, dump_bytes: int = 0) -> Estimate:
    """What a snapshot of `sources` taken now would hold, and the space it would need on top of `previous`."""
    return estimate_with(sources, Previous.load(previous), dump_bytes)


@dataclass(frozen=True)
class Space:
    free_bytes: int
    free_inodes: int


def probe_space(path: Path) -> Space:
    """Bytes and inodes available (to an unprivileged writer) on the filesystem of `path`."""
    vfs = os.statvfs(path)
    inodes = vfs.f_favail if vfs.f_files else 2**63  # some filesystems report no inode limit
    return Space(vfs.f_bavail * vfs.f_frsize, inodes)


def translate_os_error(
    error: OSError, where: str, partial: Path, space: Callable[[Path], Space], throttle: Throttle
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
