"""The inbox, end to end: the real daemon, the real watchdog observer, files written by this test.

Every file here is not a valid archive, so each ends `rejected` — which never
blocks the gate — and the tests can watch what the inbox takes, when, and in
what order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.conftest import Site, wait_for


def test_a_file_written_slowly_in_chunks_is_not_taken_before_it_is_complete(site: Site) -> None:
    # Given a running daemon with a short settle time
    site.start_daemon()
    chunk = b"x" * 65536
    target = site.inbox / "gts.2.0.0.tgz"
    # When a writer holds the file open and writes it slowly, pausing longer than the settle time
    with open(target, "wb") as upload:
        for _ in range(6):
            upload.write(chunk)
            upload.flush()
            time.sleep(0.5)  # the pause of a slow uplink: the file must be left alone meanwhile
            assert site.history() == [], "a file still open for writing was taken"
            assert target.exists()
    # Then once it is closed it is taken, whole
    runs = wait_for(site.history, what="the closed file to be taken")
    assert len(runs) == 1
    assert runs[0]["archive"] == "gts.2.0.0.tgz"
    assert runs[0]["size"] == 6 * len(chunk)
    assert not target.exists()


def test_a_part_file_renamed_when_complete_is_taken_once(site: Site) -> None:
    site.start_daemon()
    part = site.inbox / ".gts.2.0.0.tgz.part"
    part.write_bytes(b"not yet" * 1000)
    # The .part name is never taken, however long it sits
    time.sleep(1.0)  # several settle periods: the ignore rule, not timing, must keep it
    assert site.history() == []
    os.rename(part, site.inbox / "gts.2.0.0.tgz")
    site.wait_outcome(1)
    time.sleep(1.0)  # more settle periods and a poll: no second run may appear
    runs = site.history()
    assert [run["archive"] for run in runs] == ["gts.2.0.0.tgz"]


def test_two_hundred_files_dropped_at_once_all_end_as_runs_in_order(site: Site) -> None:
    # Given a running daemon
    site.start_daemon()
    names = [f"gts.9.{i:03d}.tgz" for i in range(200)]
    # When 200 files are dropped one after the other, as fast as the disk takes them
    for name in names:
        site.drop(f"payload of {name}".encode(), name)

    # Then every one becomes a run with an outcome, in the order they arrived, none lost
    def all_done() -> list[dict[str, object]] | None:
        runs = site.history()
        return runs if len(runs) == 200 and all(run["outcome"] for run in runs) else None

    runs = wait_for(all_done, timeout=240, what="200 runs to finish")
    by_id = sorted(runs, key=lambda run: int(str(run["id"])))
    assert [run["archive"] for run in by_id] == names
    assert {run["outcome"] for run in runs} == {"rejected"}
    assert list(site.inbox.iterdir()) == []
    assert len(list((site.state / "rejected").glob("*.tgz"))) == 200


def test_files_dropped_while_the_daemon_was_down_are_found_at_start(site: Site) -> None:
    site.drop(b"dropped at night", "gts.3.0.0.tgz")
    site.start_daemon()
    run = site.wait_outcome(1)
    assert run["archive"] == "gts.3.0.0.tgz"


def test_a_non_archive_is_rejected_moved_aside_with_its_reason_and_the_daemon_goes_on(site: Site) -> None:
    # Given a running daemon
    daemon = site.start_daemon()
    # When a file that is not an update archive is dropped
    site.drop(b"hello, I am a spreadsheet\n", "report.xlsx")
    run = site.wait_outcome(1)
    # Then it is rejected with a reason, kept aside (not deleted) with that reason beside it
    assert run["outcome"] == "rejected"
    assert run["error"]
    kept = site.state / "rejected" / "1-report.xlsx"
    assert kept.read_bytes() == b"hello, I am a spreadsheet\n"
    assert (site.state / "rejected" / "1-report.xlsx.reason").read_text().strip() == run["error"]
    assert run["path"] == str(kept)
    # and the gate stays open, the daemon running, and `show` tells the operator the cause
    status = site.status()
    assert status["gate"] == "idle"
    assert daemon.alive()
    shown = site.cli("show", "1")
    assert run["error"] in shown.stdout


def test_dropping_the_same_rejected_bytes_again_is_refused_as_a_repeat(site: Site) -> None:
    site.keypair()  # the site can judge archives (without its trust key, a rejection is the site's fault)
    site.start_daemon()
    site.drop(b"same bytes", "gts.4.0.0.tgz")
    first = site.wait_outcome(1)
    assert first["outcome"] == "rejected"
    site.drop(b"same bytes", "gts.4.0.0.tgz")
    second = site.wait_outcome(2)
    assert second["outcome"] == "rejected"
    assert "was already rejected as run 1" in second["error"]
    assert "dropgate retry 1" in second["error"]


def test_a_symlink_or_folder_dropped_in_the_inbox_is_refused_without_being_followed(site: Site, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    site.start_daemon()
    os.symlink(secret, site.inbox / "gts.5.0.0.tgz")
    run = site.wait_outcome(1)
    assert run["outcome"] == "rejected"
    assert "is a symbolic link" in run["error"]
    assert secret.read_text() == "do not read me"
    (site.inbox / "gts.6.0.0.tgz").mkdir()
    run = site.wait_outcome(2)
    assert run["error"] == "gts.6.0.0.tgz is a folder; only regular files are taken"
