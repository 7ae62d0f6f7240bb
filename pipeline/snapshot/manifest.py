"""The manifest: reading it, and the previous snapshot's files as the next snapshot consults them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SnapshotError
from pipeline.snapshot.catalog import read_summary
from pipeline.snapshot.layout import DATA, FORMAT, MANIFEST
from pipeline.snapshot.tree import mode_text


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


FILE_KEYS = ("size", "mode", "uid", "gid", "mtime_ns", "src_dev", "src_ino", "src_ctime_ns", "sha256", "xattrs")


@dataclass
class Previous:
    """The previous snapshot's files, by source and path, to decide what is unchanged.

    Each file is kept as a tuple in `FILE_KEYS` order (a dict per file would cost
    several times the memory on large trees).
    """

    run: int | None
    path: Path | None
    files: dict[str, dict[str, tuple[Any, ...]]]  # source -> path -> fields
    roots: dict[str, str]  # source -> its folder in the previous snapshot
    dumps: dict[str, int]

    @classmethod
    def load(cls, previous: Path | None) -> Previous:
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
                files[entry["path"]] = tuple(entry.get(key) for key in FILE_KEYS)
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
            and mode == mode_text(info)
        )
        return fields if same else None

    def copy_of(self, source: str, rel: str) -> str:
        return f"{self.roots[source]}/{rel}"
