"""The manifest's files and folders, held compactly and found by path in constant time.

A release of 200,000 files is read on a site whose daemon must stay small, so
the entries are not 200,000 Python objects: paths sit back to back in one
byte string, sizes, modes and digests in flat columns, and two open-addressing
indexes (`hash` is salted per process, so no archive can aim at collisions)
find an entry by its exact path, or by its folded form (NFKC, case folded:
the names a case-insensitive or normalizing filesystem would take as one).

The columns live in anonymous memory maps sized for the most entries the
manifest can hold (`capacity`, from its size and the site's limits): a page
costs memory only once written, and nothing is copied as the table fills, so
the daemon's resident memory is what the entries need, about the path's
length plus 80 bytes each, without the fragments a growing array leaves.
"""

from __future__ import annotations

import mmap
import unicodedata
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

FILE, FOLDER = 0, 1
_Typecode = Literal["B", "H", "Q", "q", "i"]
_DIGEST = 32
_INITIAL = 64


def folded(path: str) -> str:
    """The form under which two names are one name on a case-insensitive or normalizing filesystem."""
    if path.isascii():
        return path.lower()  # NFKC leaves ASCII as it is; its case folding is lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", path).casefold())


@dataclass(frozen=True)
class FileEntry:
    """One payload file as the manifest describes it."""

    size: int
    sha256: str
    mode: int  # permission bits only, e.g. 0o644


class _Column:
    """A typed column in an anonymous memory map: zero until written; grows (by copying) only past its capacity."""

    def __init__(self, typecode: _Typecode, capacity: int) -> None:
        self._typecode = typecode
        self._itemsize = array(typecode).itemsize
        self._map = mmap.mmap(-1, max(1, capacity) * self._itemsize)
        self.view = memoryview(self._map).cast(typecode)

    def __len__(self) -> int:
        return len(self.view)

    def grow(self, capacity: int) -> None:
        old_map, old_view = self._map, self.view
        self._map = mmap.mmap(-1, capacity * self._itemsize)
        self.view = memoryview(self._map).cast(self._typecode)
        used = len(old_view) * self._itemsize
        self._map[:used] = old_map[:used]
        old_view.release()
        old_map.close()

    def raw(self, start: int, end: int) -> bytes:
        """Items start..end as bytes (for a byte column: the bytes themselves)."""
        return bytes(self._map[start * self._itemsize : end * self._itemsize])

    def write(self, start: int, data: bytes) -> None:
        self._map[start * self._itemsize : start * self._itemsize + len(data)] = data


def _slots_for(entries: int) -> int:
    """A power of two at least twice `entries`: the indexes stay at most half full, so probes stay short."""
    slots = 8
    while slots < 2 * entries:
        slots *= 2
    return slots


class Entries:
    """Files and folders in the order the manifest lists them; see the module's docstring."""

    def __init__(self, capacity: int = _INITIAL, name_bytes: int = _INITIAL * 64) -> None:
        capacity = max(capacity, 1)
        self._count = 0
        self._name_bytes = 0
        self._names = _Column("B", name_bytes)  # UTF-8 paths back to back
        self._ends = _Column("Q", capacity)  # where each path ends in _names
        self._kinds = _Column("B", capacity)
        self._modes = _Column("H", capacity)
        self._sizes = _Column("Q", capacity)
        self._digests = _Column("B", capacity * _DIGEST)  # zeros for folders
        self._folded_hashes = _Column("q", capacity)
        self._seen = _Column("B", capacity)  # set by the payload check as each member arrives
        self._exact = _Column("i", _slots_for(capacity))  # entry index + 1, 0 for a free slot
        self._folded = _Column("i", _slots_for(capacity))
        self.files = 0
        self.total_size = 0
        self.largest: int | None = None  # the index of the largest file

    def __len__(self) -> int:
        return self._count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entries):
            return NotImplemented
        return [self.name(i) for i in range(len(self))] == [other.name(i) for i in range(len(other))] and all(
            (self.kind(i), self.file(i)) == (other.kind(i), other.file(i)) for i in range(len(self))
        )

    __hash__ = None  # type: ignore[assignment]

    # -- one entry --------------------------------------------------------------
    def name(self, index: int) -> str:
        return self._encoded(index).decode("utf-8")

    def _encoded(self, index: int) -> bytes:
        start = self._ends.view[index - 1] if index else 0
        return self._names.raw(start, self._ends.view[index])

    def kind(self, index: int) -> int:
        return int(self._kinds.view[index])

    def file(self, index: int) -> FileEntry:
        return FileEntry(self._sizes.view[index], self.sha256(index).hex(), self._modes.view[index])

    def size(self, index: int) -> int:
        return int(self._sizes.view[index])

    def mode(self, index: int) -> int:
        return int(self._modes.view[index])

    def sha256(self, index: int) -> bytes:
        return self._digests.raw(index * _DIGEST, (index + 1) * _DIGEST)

    def indexes(self, kind: int) -> Iterator[int]:
        kinds = self._kinds.view
        return (index for index in range(self._count) if kinds[index] == kind)

    # -- the payload pass marks what it met --------------------------------------
    def mark_seen(self, index: int) -> None:
        self._seen.view[index] = 1

    def was_seen(self, index: int) -> bool:
        return bool(self._seen.view[index])

    def forget_seen(self) -> None:
        self._seen.write(0, bytes(self._count))

    def first_unseen(self) -> int:
        """The first entry the payload pass did not meet, or -1."""
        return self._seen.raw(0, self._count).find(0)

    # -- finding ---------------------------------------------------------------
    def find(self, path: str | bytes) -> int:
        """The index of the entry named exactly `path`, or -1."""
        name = path.encode("utf-8") if isinstance(path, str) else path
        table = self._exact.view
        mask = len(table) - 1
        slot = hash(name) & mask
        while table[slot]:
            index = table[slot] - 1
            if self._encoded(index) == name:
                return index
            slot = (slot + 1) & mask
        return -1

    def find_folded(self, path: str) -> int:
        """The index of an entry whose name folds to the same form as `path`, or -1."""
        form = folded(path)
        wanted = hash(form)
        table = self._folded.view
        mask = len(table) - 1
        slot = wanted & mask
        while table[slot]:
            index = table[slot] - 1
            if self._folded_hashes.view[index] == wanted and folded(self.name(index)) == form:
                return index
            slot = (slot + 1) & mask
        return -1

    # -- adding ----------------------------------------------------------------
    def add(self, path: str, kind: int, size: int = 0, sha256: bytes = bytes(_DIGEST), mode: int = 0) -> int:
        """Append an entry (the caller has checked that no entry has its name or folded name)."""
        index = self._count
        name = path.encode("utf-8")
        if index == len(self._kinds):
            self._grow(2 * index)
        if self._name_bytes + len(name) > len(self._names):
            self._names.grow(2 * (self._name_bytes + len(name)))
        self._names.write(self._name_bytes, name)
        self._name_bytes += len(name)
        self._ends.view[index] = self._name_bytes
        self._kinds.view[index] = kind
        self._modes.view[index] = mode
        self._sizes.view[index] = size
        self._digests.write(index * _DIGEST, sha256)
        self._folded_hashes.view[index] = hash(folded(path))
        self._count += 1
        if kind == FILE:
            self.files += 1
            self.total_size += size
            if self.largest is None or size > self._sizes.view[self.largest]:
                self.largest = index
        self._place(self._exact.view, hash(name), index)
        self._place(self._folded.view, self._folded_hashes.view[index], index)
        return index

    def _grow(self, capacity: int) -> None:
        for column in (self._ends, self._kinds, self._modes, self._sizes, self._folded_hashes, self._seen):
            column.grow(capacity)
        self._digests.grow(capacity * _DIGEST)
        self._exact = self._rebuilt(capacity, lambda i: hash(self._encoded(i)))
        self._folded = self._rebuilt(capacity, lambda i: self._folded_hashes.view[i])

    @staticmethod
    def _place(table: memoryview[int], key: int, index: int) -> None:
        mask = len(table) - 1
        slot = key & mask
        while table[slot]:
            slot = (slot + 1) & mask
        table[slot] = index + 1

    def _rebuilt(self, capacity: int, key_of: Callable[[int], int]) -> _Column:
        table = _Column("i", _slots_for(capacity))
        for index in range(self._count):
            self._place(table.view, key_of(index), index)
        return table
