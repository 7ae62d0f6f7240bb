"""Restart after a crash inside an intake: every point a SIGKILL can leave is finished or undone.

The states below are the ones the intake can leave on disk when the daemon dies
(it writes them in this order): a file moved into intake/ and not yet hashed,
a copy cut short, a file placed in spool/<id>/ or rejected/<id>-<name> by a
transaction that never committed, an intake folder left empty after its run
was created. Each is laid out here exactly, then the real daemon starts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.journal import Journal
from tests.conftest import Site, wait_for


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def intake_folder(site: Site, token: str) -> Path:
    folder = site.state / "intake" / token
    folder.mkdir(parents=True)
    return folder


def earlier_runs(site: Site, count: int) -> None:
    """A journal holding `count` finished runs (rejected junk), as an earlier daemon left it."""
    journal = Journal(site.state / "journal.db")
    for number in range(count):
        journal.add_run(f"old{number}.bin", spool=site.state / "spool", arrived=1.0, outcome="rejected", error="old")
    journal.close()


def finished_runs(site: Site, count: int) -> list[dict[str, object]]:
    return list(
        wait_for(
            lambda: (h := site.history()) and len(h) == count and all(r["outcome"] for r in h) and h,
            timeout=60,
            what=f"{count} finished runs",
        )
    )


def test_files_left_in_intake_are_hashed_and_screened_again_at_start(site: Site) -> None:
    # Given a file moved into intake but not hashed, and one whose copy was cut short
    first = intake_folder(site, "1000-11.0")
    (first / "first.bin").write_bytes(b"moved in, never hashed")
    second = intake_folder(site, "2000-12.0")
    (second / "second.bin").write_bytes(b"the original bytes")
    (second / "second.bin.copy").write_bytes(b"the orig")
    empty = intake_folder(site, "3000-13.0")  # its run was created, the folder not yet removed
    # When the daemon starts
    site.start_daemon()
    runs = sorted(finished_runs(site, 2), key=lambda run: int(str(run["id"])))
    # Then each became one run, in arrival order, hashed from its bytes; nothing is left in intake
    assert [(run["archive"], run["sha256"]) for run in runs] == [
        ("first.bin", sha(b"moved in, never hashed")),
        ("second.bin", sha(b"the original bytes")),
    ]
    assert [run["arrived"] for run in runs] == [1000 / 1e9, 2000 / 1e9]
    assert not empty.exists()
    assert list((site.state / "intake").iterdir()) == []


def test_a_link_or_fifo_left_in_intake_is_refused_at_start(site: Site) -> None:
    os.symlink("/dev/zero", intake_folder(site, "1000-1.0") / "gts.1.tgz")
    os.mkfifo(intake_folder(site, "2000-2.0") / "gts.2.tgz")
    site.start_daemon()
    errors = sorted(str(run["error"]) for run in finished_runs(site, 2))
    assert errors == [
        "gts.1.tgz is a symbolic link to /dev/zero; only regular files are taken",
        "gts.2.tgz is a named pipe (FIFO); only regular files are taken",
    ]


def test_a_file_placed_by_a_transaction_that_never_committed_is_screened_again(site: Site) -> None:
    # Given runs 1-3 in the journal, and files under id 4 that no run owns (the daemon died before the commit)
    earlier_runs(site, 3)
    orphan = site.state / "spool" / "4"
    orphan.mkdir(parents=True)
    (orphan / "spooled.bin").write_bytes(b"placed, never committed")
    rejected = site.state / "rejected"
    rejected.mkdir(parents=True)
    (rejected / "4-refused.tgz").write_bytes(b"set aside, never committed")
    (rejected / "4-refused.tgz.reason").write_text("a reason that was never recorded\n")
    # (the state a reader meets for the instant of every commit: status shows them, they are never invisible)
    screening = site.status()["screening"]
    assert sorted((item["name"], item["run"]) for item in screening) == [("refused.tgz", 4), ("spooled.bin", 4)]
    # When the daemon starts
    site.start_daemon()
    runs = finished_runs(site, 5)
    assert site.status()["screening"] == []
    # Then both are runs now, with their bytes, under ids the journal knows
    new = {str(run["archive"]): run for run in runs if int(str(run["id"])) > 3}
    assert set(new) == {"spooled.bin", "refused.tgz"}
    assert new["spooled.bin"]["sha256"] == sha(b"placed, never committed")
    assert new["refused.tgz"]["sha256"] == sha(b"set aside, never committed")
    for run in new.values():
        assert Path(str(run["path"])).exists()
    assert not (rejected / "4-refused.tgz.reason").exists() or "never recorded" not in (
        rejected / "4-refused.tgz.reason"
    ).read_text()


def test_a_lost_journal_over_earlier_runs_stops_the_daemon_then_a_fresh_one_never_reuses_their_ids(
    site: Site,
) -> None:
    # Given no journal but spool folders of runs 1 and 2 (the journal was lost, not a crash mid-intake)
    for number in (1, 2):
        folder = site.state / "spool" / str(number)
        folder.mkdir(parents=True)
        (folder / f"gts.1.{number}.tgz").write_bytes(b"an earlier run's archive")
    # When the daemon starts, Then it refuses (exit 5), naming the evidence, and touches nothing
    refused = site.start_daemon(wait=False)
    assert refused.proc.wait(timeout=60) == 5
    assert "2 spooled archives" in refused.output()
    assert (site.state / "spool" / "1" / "gts.1.1.tgz").read_bytes() == b"an earlier run's archive"
    # When the operator starts afresh on purpose
    site.start_daemon(args=("--fresh-journal", "journal lost with the old disk"))
    site.drop(b"a new file", "new.bin")
    runs = finished_runs(site, 1)
    # Then nothing of the earlier runs was taken again, and the new run's id comes after theirs
    assert [(run["id"], run["archive"]) for run in runs] == [(3, "new.bin")]
    for number in (1, 2):
        assert (site.state / "spool" / str(number) / f"gts.1.{number}.tgz").exists()
