"""The same signed bytes under another name: only the name was judged, never the bytes.

Anyone with an upload account can fetch the vendor's next archive (the feed is
public) and drop it first under another name: `f00001.tgz`, another version,
another product. That copy is rejected for its name. The rule that the same
bytes never run again on their own must not turn this into a lock-out of the
genuine archive: neither while the copy waits in the queue, nor after it was
rejected, nor for the nightly fetch. The genuine name dropped twice still runs
once. Real daemon, real signed archives, real HTTPS vendor server.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import Site, wait_for
from tests.e2e.test_auto_update_e2e import Night

MISNAMED = ["f00001.tgz", "upload.bin", "gts.9.9.9.tgz", "gts.1.0.2-copy.tgz", "other.1.0.2.tgz", "GTS.1.0.2.tgz"]


def held_first_run(site: Site) -> Path:
    """Run 1 (1.0.1) waits in apply on a migration until the returned file is removed; later drops queue."""
    hold = site.root / "hold"
    hold.touch()
    migration = f'#!/bin/sh\nwhile [ -e "{hold}" ]; do sleep 0.1; done\n'
    site.drop(site.pack("1.0.1", files={"migrations/001.sh": migration}, migrations=["migrations/001.sh"]))
    site.wait_step(1, "apply")
    return hold


def drop_copy(site: Site, archive: Path, name: str) -> None:
    """The bytes of `archive` under `name`, renamed into the inbox complete (as sftp clients do)."""
    staged = site.root / f".{name}.copy"
    shutil.copyfile(archive, staged)
    os.rename(staged, site.inbox / name)


def run_named(site: Site, name: str) -> dict[str, object]:
    def found() -> dict[str, object] | None:
        return next((run for run in site.history() if run["archive"] == name), None)

    return dict(wait_for(found, timeout=60, what=f"{name} to become a run"))


def assert_rejected_for_its_name(site: Site, run: dict[str, object], name: str) -> None:
    assert run["outcome"] == "rejected"
    assert name in str(run["error"]) and "the same archive" not in str(run["error"]), run["error"]
    assert site.show(int(str(run["id"])))["fault"] == "name"


@pytest.mark.parametrize("name", MISNAMED)
def test_a_misnamed_copy_queued_first_does_not_swallow_the_genuine_archive(site: Site, name: str) -> None:
    # Given a run in apply, and the bytes of the next update queued behind it under another name first
    site.start_daemon()
    genuine = site.pack("1.0.2")
    hold = held_first_run(site)
    drop_copy(site, genuine, name)
    copy = run_named(site, name)
    site.drop(genuine)
    # When both wait together and the first run finishes
    real = run_named(site, "gts.1.0.2.tgz")
    assert real["outcome"] is None, real["error"]  # queued: not refused as a repeat of the copy
    hold.unlink()
    # Then the genuine archive is installed and the copy is rejected for its name only
    assert site.wait_outcome(int(str(real["id"])), timeout=120)["outcome"] == "succeeded"
    assert_rejected_for_its_name(site, site.wait_outcome(int(str(copy["id"]))), name)
    assert site.status()["installed_version"] == "1.0.2"
    succeeded = [run["archive"] for run in site.history() if run["outcome"] == "succeeded"]
    assert succeeded == ["gts.1.0.2.tgz", "gts.1.0.1.tgz"]
    assert site.metric("dropgate_runs_total", 'outcome="succeeded"') == 2.0
    assert site.metric("dropgate_runs_total", 'outcome="rejected"') == 1.0
    assert site.metric("dropgate_gate", 'dropgate_gate="idle"') == 1.0


@pytest.mark.parametrize("name", ["f00001.tgz", "gts.9.9.9.tgz", "other.1.0.2.tgz"])
def test_bytes_rejected_for_their_name_run_when_dropped_under_their_own(site: Site, name: str) -> None:
    # Given a copy of the next update dropped under another name, rejected
    site.start_daemon()
    genuine = site.pack("1.0.2")
    drop_copy(site, genuine, name)
    assert_rejected_for_its_name(site, site.wait_outcome(1), name)
    # When the genuine archive is dropped afterwards
    site.drop(genuine)
    # Then it is not a refused repeat: it runs and succeeds
    run = site.wait_outcome(2, timeout=120)
    assert run["outcome"] == "succeeded", run["error"]
    assert site.status()["installed_version"] == "1.0.2"


def test_the_genuine_name_dropped_again_while_it_waits_is_refused_and_runs_once(site: Site) -> None:
    # Given the next update queued behind a run in apply
    site.start_daemon()
    genuine = site.pack("1.0.2")
    hold = held_first_run(site)
    site.drop(genuine)
    first = run_named(site, "gts.1.0.2.tgz")
    wait_for(lambda: not (site.inbox / genuine.name).exists(), what="the archive to leave the inbox")
    # When the same bytes under the same name are dropped again while it waits
    site.drop(genuine)
    runs = wait_for(lambda: (h := site.history()) and len(h) == 3 and h, what="the second drop to be recorded")
    again = next(run for run in runs if run["id"] not in (1, first["id"]))
    # Then the second drop is refused at once as the same archive, and the bytes run once
    assert again["outcome"] == "rejected"
    assert f"is already queued as run {first['id']}: it runs once" in str(again["error"])
    hold.unlink()
    assert site.wait_outcome(int(str(first["id"])), timeout=120)["outcome"] == "succeeded"
    assert len([run for run in site.history() if run["outcome"] == "succeeded"]) == 2


@pytest.mark.parametrize("name", ["gts.1.0.1-copy.tgz", "f00001.tgz"])
def test_a_misnamed_copy_of_the_feeds_archive_does_not_stop_the_nightly_fetch(
    site: Site, tmp_path: Path, name: str
) -> None:
    night = Night(site, tmp_path)
    try:
        # Given a feed offering 1.0.1, and its bytes dropped into the inbox under another name and rejected
        archive = night.offer("1.0.1")[0]
        night.start_daemon()
        drop_copy(site, archive, name)
        assert_rejected_for_its_name(site, site.wait_outcome(1), name)
        # Then `dropgate feed` still says 1.0.1 would be fetched
        shown = site.cli("feed", "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["next"] == "1.0.1", shown.stdout
        # And when midnight comes, it is fetched, runs and succeeds
        night.set_clock(night.midnight + 1)
        run = site.wait_outcome(2, timeout=120)
        assert (run["archive"], run["outcome"]) == ("gts.1.0.1.tgz", "succeeded"), run["error"]
        assert [entry.path for entry in night.server.log].count("gts.1.0.1.tgz") == 1
    finally:
        night.server.stop()
