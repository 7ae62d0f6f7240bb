"""The nightly job killed at the hand-over from the download to the inbox.

The download is complete and verified; SIGKILL lands (strace, as in
test_killed_inside_commands.py) when the daemon renames `<name>.part` into the
inbox (the mid-download kill is in test_auto_update_e2e.py). While
the daemon is down, `status` must not call the cut-short check "running"; after
the restart the archive is downloaded once, becomes exactly one run, and succeeds.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import Site, wait_for
from tests.e2e.test_auto_update_e2e import Night
from tests.e2e.test_killed_inside_commands import killed_when_renaming


def test_a_fetch_killed_at_its_hand_over_runs_once_after_the_restart(site: Site, tmp_path: Path) -> None:
    night = Night(site, tmp_path)
    try:
        # Given a feed offering 1.0.1 and a daemon whose nightly check is due
        (archive,) = night.offer("1.0.1", files={"blob.bin": os.urandom(1 << 20)})
        daemon = night.start_daemon()
        # When it is killed as the verified download is renamed into the inbox
        with killed_when_renaming(daemon, str(site.inbox / f"{archive.name}.part")):  # type: ignore[arg-type]
            night.set_clock(night.midnight + 1)
        # Then, while it is down, nothing pretends the check still runs
        text = site.cli("status").stdout
        assert "daemon: NOT RUNNING" in text
        assert "last check:" in text and ": running" not in text, text
        assert "cut short: the daemon stopped" in text
        assert site.history() == []
        # And after the restart the archive is downloaded once, runs once, and succeeds
        night.start_daemon()
        run = site.wait_outcome(1, timeout=120)
        assert (run["archive"], run["outcome"]) == ("gts.1.0.1.tgz", "succeeded"), run["error"]
        wait_for(lambda: site.status()["auto_update"]["last_check"]["result"] == "ok", what="the check to end ok")
        assert [r["archive"] for r in site.history()] == ["gts.1.0.1.tgz"]
        assert [entry.path for entry in night.server.log].count(archive.name) == 1
        assert os.listdir(site.inbox) == [] and site.status()["screening"] == []
        assert site.metric("dropgate_feed_last_check_success") == 1.0
    finally:
        night.server.stop()
