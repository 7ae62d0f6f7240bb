"""Versions are compared as versions, not as text."""

from __future__ import annotations

import itertools
import re

import pytest

from pipeline.versions import Version

ASCENDING = [
    "1.0",
    "3.9",
    "3.10.0-alpha",
    "3.10.0-alpha2",
    "3.10.0-beta1",
    "3.10.0-rc1",
    "3.10.0-rc2",
    "3.10.0-rc10",
    "3.10",
    "3.10.1",
    "3.10.2",
    "3.10.10",
    "3.19.273",
    "3.19.274",
    "3.20.0.dev1",
    "3.20.0",
    "10.0",
]


@pytest.mark.parametrize(("lower", "higher"), list(itertools.pairwise(ASCENDING)))
def test_each_version_sorts_before_the_next(lower: str, higher: str) -> None:
    assert Version.parse(lower) < Version.parse(higher)
    assert Version.parse(higher) > Version.parse(lower)
    assert Version.parse(lower) != Version.parse(higher)


def test_sorting_a_shuffled_list_gives_version_order() -> None:
    shuffled = sorted(ASCENDING, key=lambda text: text[::-1])
    assert [v.text for v in sorted(Version.parse(t) for t in shuffled)] == ASCENDING


def test_text_order_is_not_version_order() -> None:
    assert "3.9" > "3.10"  # the trap this module exists for
    assert Version.parse("3.9") < Version.parse("3.10")


@pytest.mark.parametrize(
    ("left", "right"), [("3.10", "3.10.0"), ("3.10.0", "3.10.0.0"), ("3.09", "3.9"), ("3.20.0-RC1", "3.20.0-rc1")]
)
def test_equal_versions_written_differently(left: str, right: str) -> None:
    assert Version.parse(left) == Version.parse(right)
    assert hash(Version.parse(left)) == hash(Version.parse(right))


def test_separators_of_a_tag_are_equivalent() -> None:
    assert Version.parse("3.20.0-rc1") == Version.parse("3.20.0~rc1") == Version.parse("3.20.0rc1")


@pytest.mark.parametrize(
    "text", ["", "v3.19", "3..19", "3.19-", "latest", "3.19/../x", "-1.0", "3.19 274", "3.19.274+build"]
)
def test_malformed_versions_are_refused_with_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape("is not a version like 3.19.274")):
        Version.parse(text)


def test_str_is_the_text_as_written() -> None:
    assert str(Version.parse("3.19.274")) == "3.19.274"
