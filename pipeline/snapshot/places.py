"""What holds its place among a snapshot's manifest lines while it is copied or linked.

The manifest lists entries in walk order, but files are copied on a pool of
threads (`InFlight`: one large file, or the small files of a folder) and, in a
large later snapshot, unchanged files are linked by the helper process
(`Linking`: the unchanged files of one folder, see `linker`). Each batch waits in
the walk's window until its results are in; `take._fill` then writes its lines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pipeline.snapshot.copier import Copied, Copier, link_previous
from pipeline.snapshot.manifest import Match, encode_entry
from pipeline.snapshot.tree import file_sha256


@dataclass
class Copy:
    """One file to copy (or, if racy, to compare first): its manifest entry so far and where it goes."""

    entry: dict[str, Any]
    src: str
    dst: str
    previous_copy: str | None  # racy: the previous copy, linked if the live bytes are those it holds
    match: Match | None
    size: int  # the size the walk saw
    renamed: bool  # the data path had another folder name in the previous snapshot


@dataclass
class InFlight:
    """Files copied together on the pool (one large file, or small ones of a folder): they hold their
    place among the manifest lines. Not submitted while it may still grow."""

    files: list[Copy]
    bytes: int
    future: Future[list[Copied | OSError | None]] | None = None


@dataclass(slots=True)
class Linking:
    """Unchanged files of one folder, linked by the helper process (`linker`): they hold their place among
    the manifest lines. Not submitted while the walk may still add files of the folder."""

    root: str  # the data path's name in this snapshot
    renamed: bool
    source: str  # the live data path, and where its copy goes
    base: str
    folder: str  # relative to the data path ("": its top)
    files: list[tuple[str, int, Match]]  # name, size, previous record
    future: Future[list[int]] | None = None

    def path(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name


BATCH_FILES, BATCH_BYTES = 64, 4 << 20  # small files copied by one task (the pool's cost is per task)
LINK_BATCH = 512  # unchanged files of a folder sent to the link helper in one message


def copy_files(copier: Copier, files: Sequence[Copy], owner: bool) -> list[Copied | OSError | None]:
    """Copy each file (or link it, if racy and unchanged); per file the copy, None (linked) or its error."""
    results: list[Copied | OSError | None] = []
    for item in files:
        try:
            if item.match is not None:
                results.append(share_if_same(copier, item, owner))
            else:
                results.append(copier.copy(item.src, item.dst, owner))
        except OSError as error:
            results.append(error)
    return results


def share_if_same(copier: Copier, item: Copy, owner: bool) -> Copied | None:
    """A racy file: link the previous copy if the live bytes still hash to what it holds, else copy."""
    assert item.match is not None and item.previous_copy is not None
    src, dst, entry, previous_copy = item.src, item.dst, item.match.entry, item.previous_copy
    same = file_sha256(src) == entry.get("sha256")
    info = os.lstat(src)
    unchanged = (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino) == (
        entry.get("size"),
        entry.get("mtime_ns"),
        entry.get("src_ctime_ns"),
        entry.get("src_ino"),
    )
    if same and unchanged and link_previous(previous_copy, dst, item.match.holds):
        return None
    return copier.copy(src, dst, owner)


def shared_line(match: Match, root: str, *, renamed: bool) -> str:
    """The manifest line of a shared file: the previous one as it was (re-encoded if the root was renamed)."""
    if not renamed and match.line.endswith("\n"):
        return match.line
    return encode_entry({**match.entry, "root": root})
