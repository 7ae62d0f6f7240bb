"""The order in which waiting runs start: as their uploads completed; versions of one product in version order.

A run's `arrived` is when its upload completed (the file's last status change,
ctime, before dropgate touched it: a rename into the inbox or the end of a
write; unlike mtime an uploader cannot set it). Runs that arrived at the same
moment go in version order; and the archives of one product that wait
together take their product's places in the queue in version order, so
1.2.99 runs before 1.2.100 whichever finished uploading first. Versions are
read from the `<product>.<version>.tgz` name, for ordering only: `validate`
reads the signed manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from pipeline.versions import Version

SUFFIX = ".tgz"


class Waiting(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def archive(self) -> str: ...
    @property
    def arrived(self) -> float: ...


W = TypeVar("W", bound=Waiting)


def product_version(name: str) -> tuple[str, Version] | None:
    """(`gts`, 1.2.100) from `gts.1.2.100.tgz`; None for a name not made that way."""
    if not name.endswith(SUFFIX):
        return None
    product, _, version = name[: -len(SUFFIX)].partition(".")
    if not product or not version.isascii() or not version[:1].isdigit():
        return None
    try:
        return product, Version.parse(version)
    except ValueError:
        return None


def name_key(name: str) -> tuple[object, ...]:
    """Sorts names by product, then version as a version (never as text), then the name itself."""
    parsed = product_version(name)
    if parsed is None:
        return (1, name)
    product, version = parsed
    return (0, product, version, name)


def start_order(runs: Sequence[W]) -> list[W]:
    """`runs` (all waiting) in the order they should start."""
    ordered = sorted(runs, key=lambda run: (run.arrived, name_key(run.archive), run.id))
    slots: dict[str, list[int]] = {}
    for index, run in enumerate(ordered):
        parsed = product_version(run.archive)
        if parsed is not None:
            slots.setdefault(parsed[0], []).append(index)
    result = list(ordered)
    for indexes in slots.values():
        members = sorted((ordered[i] for i in indexes), key=lambda run: (name_key(run.archive), run.arrived, run.id))
        for index, run in zip(indexes, members, strict=True):
            result[index] = run
    return result
