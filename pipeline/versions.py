"""Versions compared as versions: 3.9 < 3.10 < 3.10.1; pre-releases before their release."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

# ASCII digits and letters only, matched whole: no Unicode digits, no trailing newline.
_VERSION = re.compile(r"(?P<release>[0-9]+(?:\.[0-9]+)*)(?:[-~.]?(?P<tag>[A-Za-z][A-Za-z0-9.]*))?")
MAX_VERSION_CHARACTERS = 64


@total_ordering
@dataclass(frozen=True)
class Version:
    text: str
    release: tuple[int, ...]
    tag: tuple[tuple[int, int | str], ...]  # empty: a final release, sorts after any tag

    @classmethod
    def parse(cls, text: str) -> Version:
        match = _VERSION.fullmatch(text) if len(text) <= MAX_VERSION_CHARACTERS else None
        if not match:
            raise ValueError(f"{text!r} is not a version like 3.19.274 or 3.20.0-rc1")
        release = tuple(int(part) for part in match.group("release").split("."))
        tag_text = match.group("tag") or ""
        tag = tuple(
            (0, int(part)) if part.isdigit() else (1, part.lower()) for part in re.findall(r"\d+|[A-Za-z]+", tag_text)
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


def upgrade_problem(installed: str | None, target: str, minimum: str | None, *, root: object = None) -> str | None:
    """Why `target` cannot be installed over `installed` (SPEC 3), naming both versions; None when it can.

    One rule for `validate` (which rejects) and `prereq`/`preflight` (which report it).
    """
    if installed is None:
        where = f" under {root}" if root is not None else ""
        return (
            f"no release is installed{where} (no `current` link): "
            "run `dropgate init` to adopt the installed platform first"
        )
    new, old = Version.parse(target), Version.parse(installed)
    if new == old:
        return f"version {target} is already installed (installed: {installed})"
    if new < old:
        return f"downgrade refused: the archive's version {target} is older than the installed {installed}"
    if minimum is not None and old < Version.parse(minimum):
        return (
            f"version {target} needs at least {minimum} installed, found {installed}: "
            "install the intermediate updates first"
        )
    return None
