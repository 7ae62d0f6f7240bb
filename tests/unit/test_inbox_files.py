"""One look at an inbox file: safe opening, the announced length from bytes, the writer check by lease."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.config import parse_config
from pipeline.inbox.files import (
    Lease,
    announced_length_of,
    drop_lease,
    is_written,
    list_uploads,
    open_entry,
    printable,
    take_lease,
)


def archive_head(length: int, *, name: str = "manifest.json", level: int = 6, pad: int = 0) -> bytes:
    """The start of an archive as the format describes it: gzip → tar → manifest.json starting {"length": N."""
    manifest = json.dumps({"length": length, "format": 1}).encode() + b" " * pad
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return gzip.compress(buffer.getvalue(), compresslevel=level)


@pytest.mark.parametrize("level", [0, 1, 9])
@pytest.mark.parametrize("length", [0, 1, 512, 10**12, 10**19])
def test_the_announced_length_is_read_from_the_first_bytes(level: int, length: int) -> None:
    assert announced_length_of(archive_head(length, level=level)) == length


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"\x1f\x8b",
        b"PK\x03\x04 a zip file",
        gzip.compress(b"not a tar stream at all" * 100),
        archive_head(5, name="other.json"),
        archive_head(5)[:30],  # cut inside the first tar header
    ],
)
def test_anything_else_announces_nothing_and_never_raises(head: bytes) -> None:
    assert announced_length_of(head) is None


def test_a_corrupt_checksum_announces_nothing() -> None:
    raw = bytearray(gzip.decompress(archive_head(77)))
    raw[0:1] = b"X"
    assert announced_length_of(gzip.compress(bytes(raw))) is None


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("gts.1.2.tgz", "gts.1.2.tgz"),
        ("a\nb", "a\\x0ab"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("back\\slash", "back\\\\slash"),
        (os.fsdecode(b"bad-\xff-byte"), "bad-\\xff-byte"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("café", "café"),
    ],
)
def test_untrusted_names_print_on_one_line(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_a_link_is_never_followed_and_a_fifo_never_blocks(tmp_path: Path) -> None:
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.symlink("/etc/hostname", tmp_path / "link")
        with pytest.raises(OSError) as raised:
            open_entry("link", dir_fd)
        assert raised.value.errno == 40  # ELOOP
        os.mkfifo(tmp_path / "fifo")
        fd = open_entry("fifo", dir_fd)  # returns at once although no one writes the FIFO
        os.close(fd)
    finally:
        os.close(dir_fd)


HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
print("open", flush=True)
sys.stdin.read()
"""


def test_the_lease_is_refused_while_another_process_holds_the_file_open_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "upload.tgz"
    path.write_bytes(b"x" * 1000)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        assert is_written(fd) is False
        writer = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout is not None and writer.stdout.readline() == "open\n"
        assert is_written(fd) is True
        assert take_lease(fd) is Lease.WRITTEN
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=30)
        assert is_written(fd) is False  # the writer closed it
    finally:
        os.close(fd)


def test_a_writer_opening_the_file_while_the_lease_is_held_waits_and_kills_no_one(tmp_path: Path) -> None:
    # A lease break signals the holder; with the default signal (SIGIO) this test process would die.
    path = tmp_path / "upload.tgz"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        assert take_lease(fd) is Lease.HELD
        writer = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                writer.wait(timeout=0.5)  # the writer's open waits for the lease
            drop_lease(fd)
            assert writer.stdout is not None and writer.stdout.readline() == b"open\n"
        finally:
            writer.kill()
            writer.wait(timeout=30)
    finally:
        os.close(fd)


def test_status_while_the_daemon_is_down_lists_uploads_without_following_links_or_blocking(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    head = archive_head(10_000)
    (inbox / "gts.1.0.tgz").write_bytes(head)
    (inbox / "complete.tgz").write_bytes(archive_head(10))  # longer than it announces: not an upload
    os.mkfifo(inbox / "gts.2.0.tgz")
    outside = tmp_path / "outside.tgz"
    outside.write_bytes(archive_head(99_999))
    os.symlink(outside, inbox / "gts.3.0.tgz")
    (inbox / ".gts.4.0.tgz.part").write_bytes(head)
    raw = {"paths": {"inbox": "inbox", "state": "state"}, "platform": {"product": "gts", "root": "p"}}
    config = parse_config(raw, base=tmp_path)
    assert list_uploads(config) == [{"name": "gts.1.0.tgz", "bytes": len(head), "total": 10_000}]
