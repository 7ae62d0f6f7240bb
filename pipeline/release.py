"""The platform's release layout: `root/releases/<version>/` and the `current` symlink."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import DropgateError
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
        target = link.readlink()
    except OSError:
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
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, root))
    tmp.replace(link)
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


def prune_releases(root: Path, keep: int, protect: Iterable[Path | None] = ()) -> list[str]:
    """Remove the oldest releases beyond the `keep` newest; never one in `protect`.

    Only folders named as versions are considered (anything else is not ours to
    remove). A release is first renamed out of `releases/` so that a removal
    cut short never leaves a half-deleted folder that looks like a release.
    Returns the versions removed, oldest first.
    """
    keep_paths = {p.resolve() for p in protect if p is not None}
    live = current_release(root)
    if live is not None:
        keep_paths.add(live)
    found: list[tuple[Version, Path]] = []
    try:
        entries = list(releases_dir(root).iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            continue
        try:
            found.append((Version.parse(entry.name), entry))
        except ValueError:
            continue
    found.sort(key=lambda item: item[0], reverse=True)
    removed: list[str] = []
    for _version, path in reversed(found[keep:]):
        if path.resolve() in keep_paths:
            continue
        trash = root / ".staging" / f".pruned-{path.name}-{os.getpid()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        path.rename(trash)
        shutil.rmtree(trash)
        removed.append(path.name)
    return removed


def _copy_tree(source: Path, target: Path) -> None:
    """Copy an installation with its links, modes, times and (as root) owners."""
    shutil.copytree(source, target, symlinks=True, copy_function=shutil.copy2)
    if os.geteuid() != 0:
        return
    for folder, dirs, files in os.walk(source):
        relative = Path(folder).relative_to(source)
        for name in (".", *dirs, *files):
            src = Path(folder) / name
            info = src.lstat()
            os.lchown(target / relative / name, info.st_uid, info.st_gid)


def adopt_release(root: Path, source: Path, version: str, *, copy: bool) -> Path:
    """Make an existing installation `source` the first release `version` and point `current` at it.

    Moving renames the folder (or copies then removes it across filesystems) and
    leaves a symlink at the old place pointing to `current`, so that what
    referred to the old path follows updates; copying leaves the original alone.
    """
    source = source.absolute()
    root = root.absolute()
    Version.parse(version)
    if not source.is_dir() or source.is_symlink():
        raise DropgateError(f"cannot adopt {source}: not a folder")
    if root == source or source in root.parents:
        raise DropgateError(f"cannot adopt {source}: it contains platform.root {root}; adopt a folder beside it")
    live = current_release(root)
    if live is not None:
        raise DropgateError(f"{root} already has a current release ({live.name}); nothing adopted")
    target = release_dir(root, version)
    if target.exists():
        raise DropgateError(f"cannot adopt {source} as {version}: {target} already exists")
    releases_dir(root).mkdir(parents=True, exist_ok=True)
    partial = root / ".staging" / f".adopt-{os.getpid()}"
    partial.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            source.rename(target)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise DropgateError(f"cannot move {source} to {target}: {error.strerror}") from error
            _copy_tree(source, partial)
            partial.rename(target)
            shutil.rmtree(source)
        source.symlink_to(root / "current")
    else:
        try:
            _copy_tree(source, partial)
        except OSError as error:
            shutil.rmtree(partial, ignore_errors=True)
            raise DropgateError(f"cannot copy {source} to {target}: {error}") from error
        partial.rename(target)
    switch_current(root, target)
    return target


def _adopted_version(source: Path, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    try:
        return (source / "VERSION").read_text(encoding="utf-8").strip()
    except OSError:
        return None


def cmd_init(args: argparse.Namespace) -> int:
    """`dropgate init [--adopt DIR] [--version V] [--copy]`: the folders, and optionally the first release."""
    from pipeline.config import config_path, load_config  # here: `status` reads releases without the schema

    config = load_config(config_path(args.config))
    root = config.platform.root
    source = Path(args.adopt) if args.adopt else None
    version = None
    if source is not None:
        version = _adopted_version(source, args.adopt_version)
        if version is None:
            print(f"dropgate: say which version {source} is: --version V (it has no VERSION file)", file=sys.stderr)
            return 2
        try:
            Version.parse(version)
        except ValueError as error:
            print(f"dropgate: cannot adopt {source}: {error}", file=sys.stderr)
            return 2
    folders = [
        config.paths.inbox,
        config.paths.state,
        config.paths.backups,
        releases_dir(root),
        root / ".staging",
        config.maintenance.flag_file.parent,
    ]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        print(f"folder  {folder}")
    if source is not None and version is not None:
        target = adopt_release(root, source, version, copy=args.copy)
        how = "copied" if args.copy else "moved"
        print(f"adopted {source} ({how}) as release {version}: {target}")
        print(f"current → {target}")
        if not args.copy:
            print(f"{source} is now a link to {root / 'current'}")
        else:
            print(f"point the web server and the services at {root / 'current'}")
    elif current_release(root) is None:
        print("no current release yet: adopt the installed platform with `dropgate init --adopt DIR --version V`")
    else:
        print(f"current → {current_release(root)}")
    return 0
