"""The platform's release layout: `root/releases/<version>/` and the `current` symlink."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.versions import Version


def releases_dir(root: Path) -> Path:
    return root / "releases"


def release_dir(root: Path, version: str) -> Path:
    return releases_dir(root) / version


def staging_dir(root: Path, run_id: int) -> Path:
    """Where `validate` extracts run `run_id`'s payload (same filesystem as releases/)."""
    return root / ".staging" / str(run_id)


def current_release(root: Path) -> Path | None:
    """The release folder `current` points to, or None when there is none."""
    link = root / "current"
    try:
        target = os.readlink(link)
    except (FileNotFoundError, OSError):
        return None
    return (link.parent / target).resolve()


def installed_version(root: Path) -> str | None:
    """The version of the live release (the name of the folder `current` points to)."""
    current = current_release(root)
    return current.name if current is not None else None


def switch_current(root: Path, target: Path) -> None:
    """Point `current` at `target` atomically: a new link renamed over the old one."""
    link = root / "current"
    tmp = root / f".current.{os.getpid()}.tmp"
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(os.path.relpath(target, root), tmp)
    os.replace(tmp, link)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plan_downtime(from_version: str | None, to_version: str, manifest_downtime: bool | None) -> tuple[bool, str]:
    """SPEC 5.4: downtime when the archive says so or when major or minor changes."""
    if manifest_downtime is True:
        return True, "the archive requires downtime"
    if manifest_downtime is False:
        return False, "the archive says no downtime is needed"
    if from_version is None:
        return True, "no installed version to compare with"
    old, new = Version.parse(from_version), Version.parse(to_version)
    if old.release[:2] != new.release[:2]:
        return True, f"{from_version} → {to_version} changes the major or minor version"
    return False, f"{from_version} → {to_version} is a patch, applied live"
