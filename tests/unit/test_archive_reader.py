"""The gzip reader at member and chunk edges: an archive reads the same wherever its head member ends.

Where the head's gzip member ends relative to the reader's chunks depends on
the signature's bytes, so a reader that mishandles one position makes some
signed archives unreadable by luck. These tests put the end of the head member
before, at and after chunk edges, at compression levels 0 and 9, with small
chunks (to hit many edges cheaply) and with the real 1 MiB chunk.
"""

from __future__ import annotations

import gzip
import io
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.archive.format import CHUNK
from pipeline.archive.reader import Inflater
from pipeline.errors import ArchiveRejected, StepAborted


def member_near(target: int, level: int, seed: int, compressible: int) -> tuple[bytes, bytes]:
    """Some content and its gzip member, the member as close to `target` bytes as the content allows."""
    rng = random.Random(seed)
    text = b"".join(b"manifest line %d\n" % rng.randrange(50) for _ in range(compressible // 16 + 1))[:compressible]
    noise_length = max(0, target - 30 - (len(text) // 3 if level else len(text)))
    noise = rng.randbytes(4 * target + 64)
    for _ in range(30):
        content = text + noise[:noise_length]
        member = gzip.compress(content, compresslevel=level, mtime=0)
        missing = target - len(member)
        if missing == 0 or noise_length + missing < 0:
            break
        noise_length += missing
    return content, member


def read_members(data: bytes, chunk: int, checkpoint: Callable[[], None] = lambda: None) -> list[bytes]:
    """Every gzip member's content, read through the reader with `chunk`-sized reads."""
    inflater = Inflater(io.BytesIO(data), limit=len(data), chunk=chunk, checkpoint=checkpoint)
    members = []
    while inflater.next_member():
        parts = []
        while part := inflater.read(chunk):
            parts.append(part)
        members.append(b"".join(parts))
    assert inflater.at_end()
    return members


class StepCounter:
    """A checkpoint that fails the test when the reader takes more steps than its input and output allow."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.steps = 0

    def __call__(self) -> None:
        self.steps += 1
        if self.steps > self.bound:
            raise AssertionError(f"the reader took more than {self.bound} steps: it spins")


@settings(max_examples=400, deadline=None)
@given(
    chunk=st.sampled_from([64, 100, 512, 4096]),
    edge=st.integers(1, 6),
    offset=st.integers(-40, 40),
    level=st.sampled_from([0, 9]),
    compressible=st.integers(0, 6000),
    seed=st.integers(0, 2**32),
)
def test_two_members_read_back_whatever_the_head_ends_near_a_chunk_edge(
    chunk: int, edge: int, offset: int, level: int, compressible: int, seed: int
) -> None:
    # Given a head member that ends just before, at or just after a chunk edge, then a payload member
    head_content, head = member_near(max(24, edge * chunk + offset), level, seed, compressible)
    payload_content = random.Random(seed).randbytes(777) * 9
    payload = gzip.compress(payload_content, compresslevel=level, mtime=0)
    data = head + payload
    counter = StepCounter(bound=len(data) + len(head_content) + len(payload_content) + 8)

    # When both are read with that chunk size
    members = read_members(data, chunk, counter)

    # Then each member reads back exactly, in a number of steps bounded by its bytes
    assert members == [head_content, payload_content]


@pytest.mark.parametrize("level", [0, 9])
@pytest.mark.parametrize("offset", [-1, 0, 1, 13])
@pytest.mark.parametrize("edge", [1, 2])
def test_the_real_chunk_size_reads_a_head_ending_at_each_edge(level: int, offset: int, edge: int) -> None:
    # Given a head member of about `edge` MiB that ends `offset` bytes from the edge of the 1 MiB chunk
    head_content, head = member_near(edge * CHUNK + offset, level, seed=edge * 100 + offset, compressible=300_000)
    payload_content = bytes(range(256)) * 5000
    data = head + gzip.compress(payload_content, compresslevel=6, mtime=0)

    # When it is read with the real chunk size, then both members read back exactly
    assert read_members(data, CHUNK) == [head_content, payload_content]


def test_the_reader_checkpoints_inside_its_loop() -> None:
    # Given a long gzip member and a checkpoint that stops the step after a few calls
    data = gzip.compress(random.Random(1).randbytes(8 * 2**20), compresslevel=1, mtime=0)
    calls: list[int] = []

    def stop_soon() -> None:
        calls.append(1)
        if len(calls) > 3:
            raise StepAborted("validate was stopped: shutdown", resumable=True)

    # When it is read, then the checkpoint's stop goes through the reader
    with pytest.raises(StepAborted):
        read_members(data, CHUNK, stop_soon)
    assert len(calls) == 4


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (gzip.compress(b"x" * 5000, mtime=0)[:-9], "the gzip stream ends without its end marker"),
        (gzip.compress(b"x" * 5000, mtime=0)[:30], "the gzip stream ends without its end marker"),
        (b"\x1f\x8b\x08\x00" + bytes(6) + b"\xff\xff\xff\xff", "corrupt gzip stream near byte"),
        (gzip.compress(b"x", mtime=0) + b"\x1f\x8b", "the gzip stream ends without its end marker"),
        (gzip.compress(b"x", mtime=0) + b"garbage!", "corrupt gzip stream near byte"),
    ],
    ids=["no trailer", "cut in the data", "reserved block type", "a second member cut short", "junk after"],
)
def test_broken_gzip_streams_are_one_line_rejections(data: bytes, expect: str) -> None:
    with pytest.raises(ArchiveRejected) as rejection:
        read_members(data, 64)
    assert expect in str(rejection.value)
    assert "\n" not in str(rejection.value)
