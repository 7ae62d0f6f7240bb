"""The manifest's reader: the same answer whatever the chunking, refusals before the rest is read, the names policy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.archive.entries import Entries, folded
from pipeline.archive.manifest import Manifest, encode_manifest, read_manifest
from pipeline.archive.names import path_problem
from pipeline.config import Limits
from pipeline.errors import ArchiveRejected
from pipeline.versions import Version
from tests.archive_helpers import manifest_fields

FILES = {f"static/m{index % 7}/f{index}.js": b"x" * index for index in range(40)}
FIELDS = {"length": 123_456, **manifest_fields(FILES, dirs=["static", *(f"static/m{i}" for i in range(7))])}
FIELDS.update(requirements={"min_cpus": 4, "min_memory_gib": 1.5}, notes='Fixes "search" — café\n', downtime=None)


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, position, turn = [], 0, 0
    while position < len(data):
        size = sizes[turn % len(sizes)]
        chunks.append(data[position : position + size])
        position += size
        turn += 1
    return chunks


def read(data: bytes | list[bytes], limits: Limits | None = None) -> Manifest:
    chunks = [data] if isinstance(data, bytes) else data
    return read_manifest(chunks, key_id="vendor", digest="d", limits=limits, size=sum(map(len, chunks)))


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 97), min_size=1, max_size=5), indent=st.sampled_from([None, 0, 1, 4]))
def test_the_same_manifest_reads_the_same_whatever_the_chunk_edges(sizes: list[int], indent: int | None) -> None:
    # Given a manifest written compactly or pretty-printed, cut into chunks at arbitrary edges
    text = json.dumps(FIELDS, indent=indent, ensure_ascii=indent is None).encode()
    if indent is not None:
        text = b'{"length": 123456,' + text[text.index(b"\n", 2) :]  # the announced length stays on the first line

    # When it is read from those chunks, then it is the manifest read in one piece
    assert read(chunked(text, sizes)) == read(text)
    assert read(chunked(text, sizes)).to_fields() == {**FIELDS, "length": 123_456}


def test_too_many_entries_are_refused_before_the_rest_is_read() -> None:
    # Given a manifest whose entries past the tenth are followed by garbage a reader would choke on
    fields = {"length": 10, **manifest_fields({f"f{i}": b"" for i in range(11)})}
    text = encode_manifest(fields)
    cut = text.index(b'"f10"')
    damaged = text[:cut] + b'"f10":{"size":0,"sha256":"' + b"\xff" * 100

    # When it is read with max_members 10, then the limit is named, not the damage after it
    with pytest.raises(ArchiveRejected, match=r"more entries than limits.max_members \(10\)"):
        read(damaged, Limits(max_members=10))
    with pytest.raises(ArchiveRejected, match=r"not valid UTF-8|not closed|text"):
        read(damaged, Limits(max_members=11))


def test_a_file_too_large_is_refused_at_its_entry() -> None:
    fields = {"length": 10, **manifest_fields({"big": b"x" * 100, "small": b"x"})}
    text = encode_manifest(fields)
    damaged = text[: text.index(b'"small"')] + b"garbage"
    with pytest.raises(ArchiveRejected, match=r"file 'big' is 100 bytes, above limits.max_file_bytes \(99\)"):
        read(damaged, Limits(max_file_bytes=99))


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("données/été.txt", None),
        ("文档/说明.txt", None),
        ("हिंदी.txt", None),  # combining marks belong to the letters of many scripts
        ("ﬁle", None),  # NFC keeps the ligature; it folds to "file" (see below)
        ("cafe\u0301.txt", "not in Unicode normal form NFC"),
        ("a\u200bb", "character '\\u200b' is not allowed"),
        ("a\u202eb", "character '\\u202e' is not allowed"),
        ("a\u00a0b", "character '\\xa0' is not allowed"),
        ("a\nb", "character '\\n' is not allowed"),
        ("a：b", "character '：' is not allowed"),
    ],
)
def test_the_names_policy(path: str, problem: str | None) -> None:
    found = path_problem(path)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(
    ("first", "second"),
    [("README", "readme"), ("straße", "STRASSE"), ("ﬁle", "file"), ("Ａ", "a"), ("é", "É"), ("Ⅻ", "xii")],
)
def test_names_one_filesystem_would_merge_are_found(first: str, second: str) -> None:
    entries = Entries()
    entries.add(first, 0)
    assert folded(first) == folded(second)
    assert entries.find_folded(second) == 0
    assert entries.find(second) == -1


def test_the_entries_grow_past_their_first_capacity() -> None:
    entries = Entries(capacity=2, name_bytes=4)
    for index in range(5000):
        entries.add(f"dir/file-{index}", 0, size=index, sha256=bytes([index % 256]) * 32, mode=0o644)
    assert len(entries) == 5000
    assert entries.find("dir/file-4321") == 4321
    assert entries.file(4321).size == 4321
    assert entries.total_size == sum(range(5000))


@pytest.mark.parametrize(
    "text",
    ["3.19.274\n", " 3.19.274", "３.19.274", "3.١٩.274", "3.19.274-β", "1" * 65, "3.19.274\x00", ""],
)
def test_versions_are_ascii_and_matched_whole(text: str) -> None:
    with pytest.raises(ValueError, match="is not a version"):
        Version.parse(text)


def test_a_manifest_round_trips_through_its_own_reader() -> None:
    manifest = read(encode_manifest(FIELDS))
    again: dict[str, Any] = json.loads(json.dumps(manifest.to_dict()))
    assert Manifest.from_dict(again) == manifest
    assert manifest.summary()["file_count"] == len(FILES)
    assert "files" not in manifest.summary()
