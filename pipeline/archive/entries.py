"""The manifest's files and folders, held compactly and found by path in constant time.

A release of 200,000 files is read on a site whose daemon must stay small, so
the entries are not 200,000 Python objects: paths sit back to back in one
byte string, sizes, modes and digests in flat arrays, and two open-addressing
indexes (`hash` is salted per process, so no archive can aim at collisions)
find an entry by its exact path, or by its folded form (NFKC, case folded:
the names a case-insensitive or normalizing filesystem would take as one).
About the path's length plus 80 bytes per entry.
"""

from __future__ import annotations

import unicodedata
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

FILE, FOLDER = 0, 1
_DIGEST = 32


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


class Entries:
    """Files and folders in the order the manifest lists them; see the module's docstring."""

    def __init__(self) -> None:
        self._names = bytearray()  # UTF-8 paths back to back
        self._ends = array("Q")  # where each path ends in _names
        self._kinds = bytearray()
        self._modes = array("H")
        self._sizes = array("Q")
        self._digests = bytearray()  # 32 bytes per entry, zeros for folders
        self._folded_hashes = array("q")
        self._exact = array("i", bytes(4 * 8))  # entry index + 1, 0 for a free slot
        self._folded = array("i", bytes(4 * 8))
        self.seen = bytearray()  # set by the payload check as each member arrives
        self.files = 0
        self.total_size = 0
        self.largest: int | None = None  # the index of the largest file

    def __len__(self) -> int:
        return len(self._kinds)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entries):
            return NotImplemented
        return (self._names, self._ends, self._kinds, self._modes, self._sizes, self._digests) == (
            other._names,
            other._ends,
            other._kinds,
            other._modes,
            other._sizes,
            other._digests,
        )

    __hash__ = None  # type: ignore[assignment]

    # -- one entry --------------------------------------------------------------
    def name(self, index: int) -> str:
        return self._encoded(index).decode("utf-8")

    def _encoded(self, index: int) -> bytes:
        start = self._ends[index - 1] if index else 0
        return bytes(self._names[start : self._ends[index]])

    def kind(self, index: int) -> int:
        return self._kinds[index]

    def file(self, index: int) -> FileEntry:
        digest = self._digests[index * _DIGEST : (index + 1) * _DIGEST].hex()
        return FileEntry(self._sizes[index], digest, self._modes[index])

    def size(self, index: int) -> int:
        return self._sizes[index]

    def mode(self, index: int) -> int:
        return self._modes[index]

    def sha256(self, index: int) -> bytes:
        return bytes(self._digests[index * _DIGEST : (index + 1) * _DIGEST])

    def indexes(self, kind: int) -> Iterator[int]:
        return (index for index, found in enumerate(self._kinds) if found == kind)

    # -- finding ---------------------------------------------------------------
    def find(self, path: str | bytes) -> int:
        """The index of the entry named exactly `path`, or -1."""
        name = path.encode("utf-8") if isinstance(path, str) else path
        table = self._exact
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
        table = self._folded
        mask = len(table) - 1
        slot = wanted & mask
        while table[slot]:
            index = table[slot] - 1
            if self._folded_hashes[index] == wanted and folded(self.name(index)) == form:
                return index
            slot = (slot + 1) & mask
        return -1

    # -- adding ----------------------------------------------------------------
    def add(self, path: str, kind: int, size: int = 0, sha256: bytes = bytes(_DIGEST), mode: int = 0) -> int:
        """Append an entry (the caller has checked that no entry has its name or folded name)."""
        index = len(self._kinds)
        name = path.encode("utf-8")
        self._names += name
        self._ends.append(len(self._names))
        self._kinds.append(kind)
        self._modes.append(mode)
        self._sizes.append(size)
        self._digests += sha256
        self._folded_hashes.append(hash(folded(path)))
        self.seen.append(0)
        if kind == FILE:
            self.files += 1
            self.total_size += size
            if self.largest is None or size > self._sizes[self.largest]:
                self.largest = index
        if 2 * (index + 1) > len(self._exact):  # at most half full: probes stay short
            slots = 2 * len(self._exact)
            self._exact = self._rebuilt(slots, lambda i: hash(self._encoded(i)))
            self._folded = self._rebuilt(slots, self._folded_hashes.__getitem__)
        else:
            self._place(self._exact, hash(name), index)
            self._place(self._folded, self._folded_hashes[index], index)
        return index

    @staticmethod
    def _place(table: array[int], key: int, index: int) -> None:
        mask = len(table) - 1
        slot = key & mask
        while table[slot]:
            slot = (slot + 1) & mask
        table[slot] = index + 1

    def _rebuilt(self, slots: int, key_of: Callable[[int], int]) -> array[int]:
        table = array("i", bytes(4 * slots))
        for index in range(len(self._kinds)):
            self._place(table, key_of(index), index)
        return table
