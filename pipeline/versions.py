"""Versions compared as versions: 3.9 < 3.10 < 3.10.1; pre-releases before their release."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

_VERSION = re.compile(r"^(?P<release>\d+(?:\.\d+)*)(?:[-~.]?(?P<tag>[A-Za-z][A-Za-z0-9.]*))?$")


@total_ordering
@dataclass(frozen=True)
class Version:
    text: str
    release: tuple[int, ...]
    tag: tuple[tuple[int, int | str], ...]  # empty: a final release, sorts after any tag

    @classmethod
    def parse(cls, text: str) -> Version:
        match = _VERSION.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not a version like 3.19.274 or 3.20.0-rc1")
        release = tuple(int(part) for part in match.group("release").split("."))
        tag_text = match.group("tag") or ""
        tag = tuple(
            (0, int(part)) if part.isdigit() else (1, part.lower())
            for part in re.findall(r"\d+|[A-Za-z]+", tag_text)
        )
        return cls(text, release, tag)

    def _key(self) -> tuple[object, ...]:
        release = self.release
        while len(release) > 1 and release[-1] == 0:
            release = release[:-1]
        return (release, 0 if self.tag else 1, self.tag)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text
