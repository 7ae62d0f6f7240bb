"""The files an update adds, changes and removes, against the current release on disk."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FileChange:
    """One file the update adds, changes or removes (sizes in bytes; None where there is no such side)."""

    path: str
    kind: str  # added, changed, removed
    size: int | None
    old_size: int | None
    what: str = ""  # for a change: "content", "mode" or "content, mode"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "old_size": self.old_size, "what": self.what}


@dataclass
class FileChanges:
    added: list[FileChange] = field(default_factory=list)
    changed: list[FileChange] = field(default_factory=list)
    removed: list[FileChange] = field(default_factory=list)
    unchanged: int = 0

    @property
    def growth(self) -> int:
        """Bytes the new release has more (or fewer) than the current one."""
        plus = sum(c.size or 0 for c in self.added + self.changed)
        minus = sum(c.old_size or 0 for c in self.removed + self.changed)
        return plus - minus

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": [c.to_dict() for c in self.added],
            "changed": [c.to_dict() for c in self.changed],
            "removed": [c.to_dict() for c in self.removed],
            "unchanged": self.unchanged,
            "growth_bytes": self.growth,
        }


def release_files(release: Path) -> dict[str, os.stat_result]:
    """The regular files of a release folder, by path relative to it (symlinks are not followed)."""
    found: dict[str, os.stat_result] = {}
    pending = [release]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                pending.append(Path(entry.path))
            else:
                found[Path(entry.path).relative_to(release).as_posix()] = info
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_mode(value: Any) -> int | None:
    """A manifest's mode: `0644` as text (the archive's manifest) or a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            return None
    return None


def _content_differs(release: Path | None, path: str, info: os.stat_result, size: int, sha256: Any) -> bool:
    if release is None or not stat.S_ISREG(info.st_mode) or info.st_size != size:
        return True
    return bool(sha256) and file_sha256(release / path) != sha256


def compare_release(current: Path | None, files: Mapping[str, Mapping[str, Any]]) -> FileChanges:
    """The manifest's files against the current release on disk.

    A file is hashed only when its size is the same as the manifest's (a
    different size is a change already), so a large release is compared quickly.
    """
    have = release_files(current) if current is not None else {}
    changes = FileChanges()
    for path in sorted(files):
        entry = files[path]
        size = int(entry.get("size", 0))
        info = have.get(path)
        if info is None:
            changes.added.append(FileChange(path, "added", size, None))
            continue
        what = []
        if _content_differs(current, path, info, size, entry.get("sha256")):
            what.append("content")
        mode = file_mode(entry.get("mode"))
        if mode is not None and stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) != mode:
            what.append("mode")
        if what:
            changes.changed.append(FileChange(path, "changed", size, info.st_size, ", ".join(what)))
        else:
            changes.unchanged += 1
    for path in sorted(set(have) - set(files)):
        changes.removed.append(FileChange(path, "removed", None, have[path].st_size))
    return changes
