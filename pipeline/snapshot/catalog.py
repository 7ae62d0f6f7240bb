"""The snapshots under the backups folder: summaries, listing, the newest verified one, pruning."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import SnapshotError
from pipeline.snapshot.layout import SUMMARY
from pipeline.snapshot.tree import fsync_dir


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


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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


def record_verification(dest: Path, problems: Sequence[str], now: Callable[[], float] = time.time) -> None:
    """Store the outcome of a re-check in the snapshot's summary (`backups` shows it)."""
    raw = json.loads((dest / SUMMARY).read_text(encoding="utf-8"))
    raw["verified_at"] = now()
    raw["verify_problems"] = list(problems)
    write_json_atomic(dest / SUMMARY, raw)
