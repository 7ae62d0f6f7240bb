"""The start order of waiting runs: completion order, and versions of one product in version order."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.inbox.order import name_key, product_version, start_order
from pipeline.versions import Version


@dataclass(frozen=True)
class Waiting:
    id: int
    archive: str
    arrived: float


def names(runs: list[Waiting]) -> list[str]:
    return [run.archive for run in runs]


def test_versions_sort_as_versions_never_as_text() -> None:
    shuffled = ["gts.1.2.100.tgz", "gts.1.2.99.tgz", "gts.1.10.0.tgz", "gts.1.9.tgz", "gts.1.2.100-rc1.tgz"]
    assert sorted(shuffled, key=name_key) == [
        "gts.1.2.99.tgz",
        "gts.1.2.100-rc1.tgz",
        "gts.1.2.100.tgz",
        "gts.1.9.tgz",
        "gts.1.10.0.tgz",
    ]


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("gts.3.19.274.tgz", ("gts", "3.19.274")),
        ("gts.3.20.0-rc1.tgz", ("gts", "3.20.0-rc1")),
        ("gts.tgz", None),
        ("gts.x.tgz", None),
        ("gts.1.2.tar", None),
        ("report.xlsx", None),
        (".tgz", None),
        ("gts.١.٢.tgz", None),  # Arabic-Indic digits are not a version
    ],
)
def test_product_and_version_come_from_the_name_for_ordering_only(name: str, parsed: tuple[str, str] | None) -> None:
    result = product_version(name)
    assert (None if result is None else (result[0], str(result[1]))) == parsed


def test_runs_start_in_the_order_their_uploads_completed() -> None:
    runs = [Waiting(1, "b.bin", 30.0), Waiting(2, "a.bin", 10.0), Waiting(3, "c.bin", 20.0)]
    assert names(start_order(runs)) == ["a.bin", "c.bin", "b.bin"]


def test_ties_go_in_version_order() -> None:
    runs = [Waiting(1, "gts.1.2.100.tgz", 5.0), Waiting(2, "gts.1.2.99.tgz", 5.0)]
    assert names(start_order(runs)) == ["gts.1.2.99.tgz", "gts.1.2.100.tgz"]


def test_archives_of_one_product_waiting_together_take_their_places_in_version_order() -> None:
    # gts 1.3 finished first, then another product's file, then gts 1.2
    runs = [
        Waiting(1, "gts.1.3.tgz", 1.0),
        Waiting(2, "notes.txt", 2.0),
        Waiting(3, "gts.1.2.tgz", 3.0),
        Waiting(4, "tools.2.0.tgz", 4.0),
        Waiting(5, "tools.1.9.tgz", 5.0),
    ]
    assert names(start_order(runs)) == ["gts.1.2.tgz", "notes.txt", "gts.1.3.tgz", "tools.1.9.tgz", "tools.2.0.tgz"]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 120)), min_size=1, max_size=40, unique=True))
def test_any_shuffle_of_one_products_versions_starts_in_version_order(pairs: list[tuple[int, int]]) -> None:
    runs = [
        Waiting(index, f"gts.{major}.{minor}.tgz", float(random.Random(index).randint(0, 5)))
        for index, (major, minor) in enumerate(pairs)
    ]
    ordered = start_order(runs)
    versions = [Version.parse(run.archive[4:-4]) for run in ordered]
    assert versions == sorted(versions)
    assert sorted(run.id for run in ordered) == sorted(run.id for run in runs)
