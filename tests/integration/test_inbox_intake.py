"""The intake in this process, on a real filesystem and journal: the moments a daemon test cannot aim at.

A swap exactly between the look and the rename, the order in which a batch of
taken files becomes runs, a file that is hashed while the daemon stops. The
runner is not started: the runs are looked at in the journal.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from pipeline.config import Config, parse_config
from pipeline.inbox.files import DIR_FLAGS, open_entry
from pipeline.inbox.intake import Intake
from pipeline.inbox.order import start_order
from pipeline.journal import Journal
from tests.conftest import wait_for


class Setup:
    def __init__(self, root: Path, **extra: object) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.inbox.mkdir()
        raw = {"paths": {"inbox": "inbox", "state": "state"}, "platform": {"product": "gts", "root": "p"}, **extra}
        self.config: Config = parse_config(raw, base=root)
        self.journal = Journal(root / "state" / "journal.db")
        self.published: list[int] = []
        self.woken = threading.Event()
        self.intake = Intake(self.config, self.journal, on_published=self.published.append, wake=self.woken.set)
        self.intake.open()
        self.inbox_fd = os.open(self.inbox, DIR_FLAGS)

    def take(self, name: str, batch: int = 1) -> bool:
        fd = open_entry(name, self.inbox_fd)
        return self.intake.take(name, self.inbox_fd, fd, os.fstat(fd), batch, announced=None)

    def publish_all(self, count: int) -> None:
        def done() -> bool:
            self.intake.publish()
            return len(self.published) >= count

        wait_for(done, what=f"{count} runs")

    def close(self) -> None:
        self.intake.stop()
        os.close(self.inbox_fd)
        self.journal.close()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    made = Setup(tmp_path)
    yield made  # type: ignore[misc]
    made.close()


def test_a_file_swapped_in_between_the_look_and_the_rename_is_refused_not_run(setup: Setup) -> None:
    # Given a file the intake looked at (open, fstat)
    (setup.inbox / "gts.1.0.tgz").write_bytes(b"the file that was checked")
    fd = open_entry("gts.1.0.tgz", setup.inbox_fd)
    info = os.fstat(fd)
    # When the uploader replaces the name just before the rename
    (setup.inbox / ".other").write_bytes(b"something else")
    os.rename(setup.inbox / ".other", setup.inbox / "gts.1.0.tgz")
    assert setup.intake.take("gts.1.0.tgz", setup.inbox_fd, fd, info, 1, announced=None)
    setup.publish_all(1)
    # Then what was moved is refused and kept, and nothing of it runs
    run = setup.journal.run(setup.published[0])
    assert run is not None and run.outcome == "rejected"
    assert run.error == (
        "gts.1.0.tgz was replaced by another file while it was being taken; nothing of it is run"
    )
    assert Path(run.path).read_bytes() == b"something else"
    assert setup.journal.queued() == []


def test_a_swapped_in_link_is_described_as_a_link(setup: Setup) -> None:
    (setup.inbox / "gts.1.1.tgz").write_bytes(b"checked")
    fd = open_entry("gts.1.1.tgz", setup.inbox_fd)
    info = os.fstat(fd)
    os.symlink("/dev/zero", setup.inbox / ".link")
    os.rename(setup.inbox / ".link", setup.inbox / "gts.1.1.tgz")
    setup.intake.take("gts.1.1.tgz", setup.inbox_fd, fd, info, 1, announced=None)
    setup.publish_all(1)
    run = setup.journal.run(setup.published[0])
    assert run is not None
    assert run.error == (
        "gts.1.1.tgz is a symbolic link to /dev/zero; only regular files are taken"
        " (it replaced the file that was being taken)"
    )


def test_runs_taken_together_start_in_version_order_with_their_hash_and_mode(setup: Setup) -> None:
    names = ["gts.1.2.100.tgz", "gts.1.2.99.tgz", "gts.1.2.101.tgz"]
    for name in names:
        (setup.inbox / name).write_bytes(name.encode() * 1000)
    for name in names:
        assert setup.take(name)
    setup.publish_all(3)
    queued = setup.journal.queued()
    assert [run.archive for run in start_order(queued)] == ["gts.1.2.99.tgz", "gts.1.2.100.tgz", "gts.1.2.101.tgz"]
    for run in queued:
        assert run.sha256 == hashlib.sha256(run.archive.encode() * 1000).hexdigest()
        assert Path(run.path).read_bytes() == run.archive.encode() * 1000
        assert Path(run.path).stat().st_mode & 0o777 == 0o640


def test_a_later_batch_waits_for_an_earlier_one_still_being_hashed(tmp_path: Path) -> None:
    setup = Setup(tmp_path, limits={"max_archive_bytes": 64 * 2**30})
    try:
        with open(setup.inbox / "big.bin", "wb") as handle:
            handle.truncate(32 * 2**30)
        (setup.inbox / "small.bin").write_bytes(b"small")
        assert setup.take("big.bin", batch=1)
        assert setup.take("small.bin", batch=2)
        # When the small one is hashed (the big one takes many seconds more)
        wait_for(setup.woken.is_set, what="the small file to be hashed")
        setup.intake.publish()
        # Then its run is not created before the big one's
        assert setup.published == []
        assert setup.journal.runs() == []
        # and stopping cancels the hashing: both stay in intake, for the next start to finish
        setup.intake.stop()
        left = sorted(path.name for path in (tmp_path / "state" / "intake").glob("*/*"))
        assert left == ["big.bin", "small.bin"]
    finally:
        os.close(setup.inbox_fd)
        setup.journal.close()
