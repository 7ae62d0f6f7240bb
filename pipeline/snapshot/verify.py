"""Verifying a snapshot against its manifest."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import stat
from collections.abc import Mapping
from json.decoder import scanstring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from pipeline.errors import SnapshotError
from pipeline.snapshot.layout import BUFFER, DATA, DUMPS, MANIFEST, SUMMARY
from pipeline.snapshot.manifest import Placed, file_line_fields, iter_manifest, iter_manifest_lines, parse_line
from pipeline.snapshot.progress import Checkpoint, Progress, Throttle, no_checkpoint, no_progress
from pipeline.snapshot.tree import file_sha256, kind_of, mode_text


def verify_snapshot(
    dest: Path,
    *,
    hashes: bool = True,
    placed: Placed | None = None,
    checkpoint: Checkpoint = no_checkpoint,
    progress: Progress = no_progress,
    limit: int = 50,
) -> list[str]:
    """Check the snapshot at `dest` against its manifest; the problems found (empty: verified).

    Every entry must be there with its type, size, mode and mtime, and nothing else;
    every file's SHA-256 is recomputed unless `hashes` is false (the check right after
    taking a snapshot, whose hashes were just computed from its own copies).
    The manifest must match the checksum the summary holds, when there is one.
    `placed`: the entries the snapshot that wrote this very manifest checked where they
    landed (counted, not looked at again).
    """
    problems: list[str] = []
    expected_bytes = 0
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        summary = json.loads((dest / SUMMARY).read_text(encoding="utf-8"))
        expected_bytes = int(summary["bytes"]) + sum(summary.get("dumps", {}).values()) if hashes else 0
        if summary["manifest_sha256"] != file_sha256(dest / MANIFEST):
            problems.append(f"{dest / MANIFEST}: changed since the snapshot was taken (checksum differs)")
    throttle = Throttle(progress, expected_bytes)
    buffer = bytearray(BUFFER)
    # folder (relative to dest) -> how many entries the manifest lists in it
    listed: dict[str, int] = dict(placed.folders) if placed is not None else {}
    suspects: set[str] = set()  # folders with a listed entry missing: their names are compared one by one
    base = str(dest)
    try:
        for number, line in iter_manifest_lines(dest):
            checkpoint()
            if len(problems) >= limit:
                problems.append("… more problems not listed")
                break
            if placed is not None and number in placed:
                continue
            if not hashes:
                name = _file_as_written(base, line)
                if name is not None:  # a file whose copy has every field its line says: nothing to parse
                    folder = name.rpartition("/")[0]
                    listed[folder] = listed.get(folder, 0) + 1
                    continue
            entry = parse_line(dest, number, line)
            rel = entry["path"]
            if entry["type"] == "dump":
                name = f"{DUMPS}/{rel}"
            else:
                name = f"{DATA}/{entry['root']}" if rel == "." else f"{DATA}/{entry['root']}/{rel}"
            folder = name.rpartition("/")[0]
            listed[folder] = listed.get(folder, 0) + 1
            path = f"{base}/{name}"
            problem = _check_entry(path, entry)
            if problem is None and hashes and entry["type"] in ("file", "dump"):
                try:
                    if file_sha256(path, buffer) != entry["sha256"]:
                        problem = f"{path}: content differs from the manifest (SHA-256 mismatch)"
                except OSError as error:
                    problem = f"{path}: cannot be read ({error.strerror})"
                throttle.add(entry["size"])
            if problem is not None:
                problems.append(problem)
                suspects.add(folder)
    except SnapshotError as error:
        problems.append(str(error))
        return problems
    if len(problems) < limit:
        problems.extend(_extra_entries(dest, listed, suspects))
    throttle.add(0, force=True)
    return problems[: limit + 1]


_ROOT = '{"root":"'


def _file_as_written(base: str, line: str) -> str | None:
    """The snapshot-relative name of a file whose line (as this version writes it) matches its copy's lstat
    (type, size, mode, owner, mtime); None when it must be parsed and checked field by field."""
    if not line.startswith(_ROOT) or not line.endswith("}\n"):
        return None
    try:
        root, end = scanstring(line, len(_ROOT))
        if not line.startswith(',"path":"', end):
            return None
        rel, end = scanstring(line, end + 9)
    except ValueError:
        return None
    if not line.startswith(',"type":"file",', end):
        return None
    name = f"{DATA}/{root}" if rel == "." else f"{DATA}/{root}/{rel}"
    try:
        info = os.lstat(f"{base}/{name}")
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or not line.startswith(file_line_fields(info), end):
        return None
    return name


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
    if kind_of(info) != kind:
        return f"{path}: is a {kind_of(info) or 'special file'}, the manifest says {kind}"
    if kind == "file" and info.st_size != entry["size"]:
        return f"{path}: {info.st_size:,} bytes, the manifest says {entry['size']:,}"
    if entry["type"] == "dump":
        return None
    if kind != "symlink" and mode_text(info) != entry["mode"]:
        return f"{path}: mode {mode_text(info)}, the manifest says {entry['mode']}"
    if kind == "file" and info.st_mtime_ns != entry["mtime_ns"]:
        return f"{path}: modified after the snapshot (mtime differs from the manifest)"
    if kind == "symlink" and os.readlink(path) != entry["target"]:
        return f"{path}: points to {os.readlink(path)!r}, the manifest says {entry['target']!r}"
    return None


def _extra_entries(dest: Path, listed: Mapping[str, int], suspects: set[str]) -> list[str]:
    """What the snapshot holds beyond its manifest, named.

    Each folder's entries are counted (a listing, no stat) against the number the
    manifest lists there; only a folder whose count differs, or where a listed entry
    was missing, has its names compared, from a second reading of the manifest.
    """
    differing: dict[str, list[str]] = {}
    if (dest / DUMPS).is_dir() and DUMPS not in listed:
        return [f"{dest / DUMPS}: not in the manifest"]
    pending = [base for base in (DATA, DUMPS) if base in listed or (dest / base).is_dir()]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(dest / folder) as scan:
                entries = list(scan)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for child in entries:
            if child.is_dir(follow_symlinks=False):
                pending.append(f"{folder}/{child.name}")
        if len(entries) != listed.get(folder, 0) or folder in suspects:
            differing[folder] = [child.name for child in entries]
    if not differing:
        return []
    names: dict[str, set[str]] = {folder: set() for folder in differing}
    for entry in itertools.islice(iter_manifest(dest), 1, None):
        rel = entry["path"]
        name = f"{DUMPS}/{rel}" if entry["type"] == "dump" else f"{DATA}/{entry['root']}/{rel}".removesuffix("/.")
        folder, _, base = name.rpartition("/")
        if folder in names:
            names[folder].add(base)
    return sorted(
        f"{dest / folder / name}: not in the manifest"
        for folder, present in differing.items()
        for name in present
        if name not in names[folder]
    )
