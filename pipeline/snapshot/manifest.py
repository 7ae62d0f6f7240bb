"""The manifest: reading it, writing it, and the previous snapshot's files as the next snapshot consults them."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from json.decoder import scanstring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from pipeline.errors import SnapshotError
from pipeline.snapshot.catalog import read_summary
from pipeline.snapshot.layout import BUFFER, DATA, FORMAT, MANIFEST, SUMMARY
from pipeline.snapshot.tree import file_sha256, mode_text


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


def iter_manifest_lines(dest: Path) -> Iterator[tuple[int, str]]:
    """The entry lines of `dest/manifest.jsonl` as written (numbered from 2), after checking its header.

    SnapshotError if it is missing or not a manifest; `parse_line` reads one.
    """
    path = dest / MANIFEST
    try:
        with open(path, encoding="utf-8") as handle:
            try:
                header = json.loads(handle.readline() or "null")
            except ValueError as error:
                raise SnapshotError(f"{path}: the manifest is damaged ({error})") from error
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise SnapshotError(f"{path}: not a {FORMAT} manifest")
            yield from enumerate(handle, start=2)
    except FileNotFoundError:
        raise SnapshotError(f"{dest}: the snapshot has no manifest") from None


def parse_line(dest: Path, number: int, line: str) -> dict[str, Any]:
    """One entry line of the manifest of `dest`; SnapshotError naming the line if it is damaged."""
    try:
        entry = json.loads(line)
        entry["root"], entry["path"], entry["type"]  # every entry has them
    except (ValueError, KeyError, TypeError) as error:
        raise SnapshotError(f"{dest / MANIFEST}: line {number} is damaged ({error})") from error
    return dict(entry)


def file_line_fields(info: os.stat_result) -> str:
    """What a file's manifest line holds after its path, as this version writes it, up to its mtime."""
    return (
        f',"type":"file","size":{info.st_size},"mode":"{mode_text(info)}","uid":{info.st_uid},'
        f'"gid":{info.st_gid},"mtime_ns":{info.st_mtime_ns},'
    )


def read_manifest(dest: Path) -> Manifest:
    """Read all of `dest/manifest.jsonl`; SnapshotError if it is missing or not a manifest."""
    lines = iter_manifest(dest)
    header = next(lines)
    return Manifest(header, list(lines))


# A file whose ctime is this close to (or after) the start of the snapshot that copied it may have
# been written again within the same tick of the filesystem's clock: its ctime would not show it.
# Such a file is hashed and compared by the next snapshot and by a restore, never trusted on its stat.
RACY_NS = 2_000_000_000


def encode_entry(entry: dict[str, Any]) -> str:
    """One manifest line (compact JSON, ASCII only, newline-terminated)."""
    return json.dumps(entry, separators=(",", ":")) + "\n"


def walk_key(rel: str) -> tuple[str, str]:
    """Where the entry `rel` comes in the walk (`tree.walk_tree`): its folder, then its name.

    The walk lists each folder's entries by name and visits folders depth first in
    name order, so the folder compares as its sequence of names: joined by NUL,
    which sorts before any character a name can hold.
    """
    folder, _, name = rel.rpartition("/")
    return folder.replace("/", "\0"), name


def racy_from_ns(header: dict[str, Any]) -> int:
    """Files whose recorded ctime is at or after this (nanoseconds) are not trusted unread (see RACY_NS)."""
    return int(float(header["created"]) * 1e9) - RACY_NS


class Match:
    """A live file as the previous snapshot recorded it: unchanged, or `racy` (hash it to be sure)."""

    __slots__ = ("_entry", "_live", "line", "racy")

    def __init__(self, line: str, racy: bool, live: os.stat_result, entry: dict[str, Any] | None = None) -> None:
        self.line = line  # its manifest line, as written then
        self.racy = racy
        self._live = live  # the live file's lstat, which has the recorded size, mtime and mode
        self._entry = entry

    @property
    def entry(self) -> dict[str, Any]:
        """The recorded entry (parsed when first asked: most shared files never need it)."""
        if self._entry is None:
            self._entry = json.loads(self.line)
        return self._entry

    @property
    def expected(self) -> tuple[int, int, int]:
        """The mode, size and mtime (ns) a copy must have to hold the recorded file (the live file's: they match)."""
        live = self._live
        return live.st_mode, live.st_size, live.st_mtime_ns

    def holds(self, copy: os.stat_result) -> bool:
        """Whether a copy whose lstat is `copy` is a regular file with the recorded size, mtime and mode."""
        return (copy.st_mode, copy.st_size, copy.st_mtime_ns) == self.expected


class Placed:
    """The lines of a manifest being written whose entry was checked where it landed, and how many such
    entries each folder holds (the check after taking counts them without looking again).

    One bit per line number: a million lines take 125 KiB.
    """

    __slots__ = ("_bits", "folders")

    def __init__(self) -> None:
        self._bits = bytearray()
        self.folders: dict[str, int] = {}  # snapshot-relative folder -> entries placed in it

    def add(self, number: int, folder: str) -> None:
        byte = number >> 3
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
        self._bits[byte] |= 1 << (number & 7)
        self.folders[folder] = self.folders.get(folder, 0) + 1

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, int) or number < 0:
            return False
        byte = number >> 3
        return byte < len(self._bits) and bool(self._bits[byte] >> (number & 7) & 1)


def _file_fields(info: os.stat_result) -> str:
    """What follows the path in a file's line as this version writes it, up to its hash, for a file whose lstat
    is `info` (an f-string: this runs once per file of every snapshot)."""
    return (
        f',"type":"file","size":{info.st_size},"mode":"{mode_text(info)}","uid":{info.st_uid},"gid":{info.st_gid},'
        f'"mtime_ns":{info.st_mtime_ns},"src_dev":{info.st_dev},"src_ino":{info.st_ino},'
        f'"src_ctime_ns":{info.st_ctime_ns},"sha256":"'
    )


class PreviousFiles:
    """The previous snapshot's files of one data path, read along with the walk of the live data path.

    The previous manifest lists the files of each data path in the order of the walk,
    so both are read side by side, one line at a time: memory stays flat however
    many files there are. A manifest whose lines are not in that order (one written
    by an older version) only costs copies: an entry read past is never matched.
    A line as this version writes it is compared as text (the fields a live file
    must still have, in their order); any other line is parsed and compared field
    by field.
    """

    def __init__(self, manifest: Path | None, name: str = "", racy_from: int = 0) -> None:
        """Read the files of the root `name` from `manifest` (None: there is no previous snapshot)."""
        self._handle = open(manifest, encoding="utf-8") if manifest is not None else None  # noqa: SIM115
        if self._handle is not None:
            self._handle.readline()  # the header
        self._name = name
        self._prefix = '{"root":' + json.dumps(name) + ',"path":"'  # how this writer begins each line of that root
        self._racy_from = racy_from
        self._head = self._next()

    def _next(self) -> tuple[str, int, str] | None:
        """The next file line of this root: its path, where the path ends (0: parse it whole), the line."""
        if self._handle is None:
            return None
        prefix = self._prefix
        for line in self._handle:
            if '"type":"file"' not in line:
                continue
            try:
                if line.startswith(prefix):
                    path, end = scanstring(line, len(prefix))
                    return path, end, line
                entry = json.loads(line)
                if entry["root"] == self._name and entry["type"] == "file" and isinstance(entry["path"], str):
                    return entry["path"], 0, line
            except (ValueError, KeyError, TypeError):
                break  # damaged from here on: nothing more is shared
        return None

    def match(self, rel: str, info: os.stat_result) -> Match | None:
        """The previous record of the live file at `rel` if it has not changed since, else None.

        Call in walk order. Unchanged: the same size, mtime, ctime, inode, device,
        owner and permission bits as recorded (a write, truncate, chmod, chown,
        extended attribute change or replacement always moves ctime or the inode).
        """
        head = self._head
        if head is None:
            return None
        if head[0] != rel:  # the walk passed files that are gone, or came to a new one
            key = walk_key(rel)
            while head is not None and walk_key(head[0]) < key:
                head = self._next()
            self._head = head
            if head is None or head[0] != rel:
                return None
        self._head = self._next()  # each path is asked for once, in walk order
        _path, end, line = head
        racy = info.st_ctime_ns >= self._racy_from
        if end and line.startswith(_file_fields(info), end):
            return Match(line, racy, info)
        try:
            entry = json.loads(line)
        except ValueError:
            return None
        same = (
            entry.get("size") == info.st_size
            and entry.get("mtime_ns") == info.st_mtime_ns
            and entry.get("src_ctime_ns") == info.st_ctime_ns
            and entry.get("src_ino") == info.st_ino
            and entry.get("src_dev") == info.st_dev
            and entry.get("uid") == info.st_uid
            and entry.get("gid") == info.st_gid
            and entry.get("mode") == mode_text(info)
        )
        return Match(line, racy, info, entry) if same else None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


@dataclass
class Previous:
    """The previous snapshot, as the next one consults it: where its copies are and how to read its files."""

    run: int | None
    path: Path | None
    names: dict[str, str]  # source -> its folder name under data/ in the previous snapshot
    dumps: dict[str, int]
    racy_from: int = 0
    bytes: int = 0  # what its data paths held
    file_count: int = 0
    _bases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, previous: Path | None) -> Previous:
        """The snapshot at `previous` (None: none). SnapshotError if it is incomplete or its manifest damaged.

        The manifest must have the checksum its summary recorded, so that the lines
        read along the walk are those written when the snapshot was taken.
        """
        if previous is None:
            return cls(None, None, {}, {})
        info = read_summary(previous)
        try:
            recorded = json.loads((previous / SUMMARY).read_text(encoding="utf-8")).get("manifest_sha256")
        except (OSError, ValueError, AttributeError) as error:
            raise SnapshotError(f"{previous / SUMMARY}: cannot be read ({error})") from error
        if recorded != file_sha256(previous / MANIFEST):
            raise SnapshotError(f"{previous / MANIFEST}: changed since the snapshot was taken")
        header = next(iter_manifest(previous))
        names = {root["source"]: root["name"] for root in header["roots"]}
        return cls(info.run, previous, names, dict(info.dumps), racy_from_ns(header), info.bytes, info.files)

    def files(self, source: str) -> PreviousFiles:
        """A reader of the previous files of the data path `source` (close it when done)."""
        name = self.names.get(source)
        if self.path is None or name is None:
            return PreviousFiles(None)
        return PreviousFiles(self.path / MANIFEST, name, self.racy_from)

    def copy_of(self, source: str, rel: str) -> str:
        """Where the previous snapshot holds its copy of `rel` under the data path `source`."""
        base = self._bases.get(source)
        if base is None:
            base = self._bases[source] = os.path.join(self.path or "", DATA, self.names[source])
        return base if rel == "." else f"{base}/{rel}"


class ManifestWriter:
    """The manifest being written: lines in walk order, written out in large pieces, synced at the end.

    It numbers its lines as `iter_manifest_lines` does (the header is line 1), keeps the
    lines whose entry was checked where it landed (`placed`), and hashes
    the bytes it writes: the manifest read back must be exactly those (`check_written`).
    """

    def __init__(self, path: Path, translate: Callable[[OSError, str, Path, int], SnapshotError]) -> None:
        self.path = path
        self._translate = translate
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self._parts: list[str] = []
        self._pending = 0
        self._lines = 0
        self._written = hashlib.sha256()
        self.placed = Placed()

    def add(self, line: str, placed_in: str | None = None) -> None:
        """Append `line`; `placed_in`: the folder of its entry, if that was checked where it landed."""
        self._lines += 1
        if placed_in is not None:
            self.placed.add(self._lines, placed_in)
        self._parts.append(line)
        self._pending += len(line)
        if self._pending >= BUFFER:
            self.flush()

    def check_written(self, on_disk: str) -> None:
        """SnapshotError unless `on_disk` (the SHA-256 of the manifest read back) is that of the bytes written."""
        if on_disk != self._written.hexdigest():
            raise SnapshotError(f"{self.path}: the manifest read back differs from what was written")

    def flush(self) -> None:
        data = memoryview("".join(self._parts).encode("utf-8"))
        self._written.update(data)
        self._parts, self._pending = [], 0
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as error:
            raise self._translate(
                error, f"writing the snapshot's manifest {self.path}", self.path, len(data)
            ) from error

    def close(self) -> None:
        """Write what is left and sync it (the summary's checksum is taken from what is on disk)."""
        self.flush()
        try:
            os.fsync(self._fd)
        except OSError as error:
            raise self._translate(error, f"writing the snapshot's manifest {self.path}", self.path, 0) from error
        self.abandon()

    def abandon(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
