"""Restoring: putting the data paths back exactly as a snapshot holds them."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SnapshotError
from pipeline.snapshot.copier import Copier
from pipeline.snapshot.layout import DATA
from pipeline.snapshot.manifest import racy_from_ns, read_manifest
from pipeline.snapshot.progress import Checkpoint, Progress, Throttle, no_checkpoint, no_progress
from pipeline.snapshot.tree import (
    apply_meta,
    can_chown,
    file_sha256,
    kind_of,
    mode_text,
    restore_xattrs,
    sync_filesystem,
    walk_tree,
)
from pipeline.snapshot.verify import verify_snapshot

_RESTORE_PREFIX = ".dropgate-restore-"  # + pid: short, so that a name at the length limit still fits


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
    checkpoint: Checkpoint = no_checkpoint,
    progress: Progress = no_progress,
) -> RestoreReport:
    """Put every data path back exactly as the snapshot at `dest` holds it.

    Verifies the whole snapshot first (SnapshotError and nothing touched if it fails).
    `targets` maps a recorded source path to where it is restored (default: in place).
    Unchanged files (same inode and ctime as recorded; racy ones also the same hash) are kept; the rest are copied
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
    owner = can_chown()
    by_root: dict[str, list[dict[str, Any]]] = {}
    for entry in manifest.entries:
        by_root.setdefault(entry["root"], []).append(entry)
    expected = sum(e["size"] for e in manifest.entries if e["type"] == "file")
    throttle = Throttle(progress, expected)
    totals = [0, 0, 0, 0]
    for root in manifest.roots:
        source = root["source"]
        target = Path(targets[source]) if targets and source in targets else Path(source)
        entries = by_root.get(root["name"], [])
        counts = _restore_root(
            dest / DATA / root["name"],
            target,
            entries,
            owner=owner,
            checkpoint=checkpoint,
            throttle=throttle,
            racy_from=racy_from_ns(manifest.header),
        )
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
        if durable:
            sync_filesystem(target if target.is_dir() else target.parent)
    throttle.add(0, force=True)
    return RestoreReport(*totals)


def _restore_root(
    copy_root: Path,
    target: Path,
    entries: list[dict[str, Any]],
    *,
    owner: bool,
    checkpoint: Checkpoint,
    throttle: Throttle,
    racy_from: int,
) -> tuple[int, int, int, int]:
    wanted = {entry["path"]: entry for entry in entries}
    removed = restored = kept = copied_bytes = 0
    # 1. Remove what the snapshot does not have (or has as another type), deepest first.
    if os.path.lexists(target):
        live = list(walk_tree(target))
        for rel, info in reversed(live):
            checkpoint()
            entry = wanted.get(rel)
            if (entry is not None and entry["type"] == kind_of(info)) or kind_of(info) is None:
                continue  # kept, or a socket/FIFO/device: never data, never touched
            path = target if rel == "." else target / rel
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    # 2. Put back every entry, folders before their content.
    copier = Copier(reflink=True, hashing=False, checkpoint=checkpoint)  # verified already, hashes included
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
            apply_meta(str(path), entry, owner)
            restore_xattrs(str(path), entry)
        elif kind == "hardlink":
            tmp = path.with_name(f"{_RESTORE_PREFIX}{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.link(target / entry["target"], tmp)
            os.replace(tmp, path)
        elif kind == "file":
            if _untouched(path, entry, racy_from):
                kept += 1
            else:
                tmp = path.with_name(f"{_RESTORE_PREFIX}{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                copy = copy_root if rel == "." else copy_root / rel
                path.parent.mkdir(parents=True, exist_ok=True)  # a data path that is one file, its folder gone
                try:
                    copier.copy(str(copy), str(tmp), owner=False)
                except BaseException:  # stopped half-way (a shutdown, a time limit): no stray copy is left
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                    raise
                apply_meta(str(tmp), entry, owner)
                restore_xattrs(str(tmp), entry)
                os.replace(tmp, path)
                restored += 1
                copied_bytes += entry["size"]
            throttle.add(entry["size"])
    for folder, entry in reversed(folders):
        restore_xattrs(folder, entry)
        apply_meta(folder, entry, owner)
    return restored, kept, removed, copied_bytes


def _untouched(path: Path, entry: Mapping[str, Any], racy_from: int) -> bool:
    """The live file is still the very inode the snapshot read, unmodified since (ctime unmoved).

    A racy file (its ctime too close to the snapshot's start to prove anything, see
    `manifest.RACY_NS`) must also still hash to what the snapshot holds.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    same = (
        stat.S_ISREG(info.st_mode)
        and info.st_ino == entry.get("src_ino")
        and info.st_dev == entry.get("src_dev")
        and info.st_ctime_ns == entry.get("src_ctime_ns")
        and info.st_size == entry["size"]
        and info.st_mtime_ns == entry["mtime_ns"]
        and mode_text(info) == entry["mode"]
    )
    if not same or info.st_ctime_ns < racy_from:
        return same
    try:
        return file_sha256(path) == entry.get("sha256")
    except OSError:
        return False


def _replace_with_symlink(path: Path, target: str) -> None:
    tmp = path.with_name(f"{_RESTORE_PREFIX}{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)
