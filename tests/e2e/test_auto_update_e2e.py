"""Updates that arrive by themselves, end to end: the real daemon fetching from a real HTTPS server.

The nightly schedule of the daemon under test, and of the CLI that shows it, reads
its clock from a file (the documented test hook DROPGATE_TEST_SCHEDULE_CLOCK,
pipeline/autoupdate.py): the test moves it to a midnight two days ahead instead of
waiting for midnight. Everything
else is real: TLS with a test CA, Range requests, SIGKILL, the CLI, the
control socket, the journal across restarts. The waiting steps use the
system clock: the window test waits for a real window to open.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pipeline.autoupdate import CLOCK_HOOK
from pipeline.schedule import DAYS
from pipeline.signing import TrustStore, load_signing_key
from tests.conftest import Site, wait_for
from tests.vendor_server import VendorServer, entry_for, publish


class Night:
    """A site whose auto_update points at a real HTTPS vendor server, with a schedule clock the test sets."""

    def __init__(self, site: Site, root: Path) -> None:
        self.site = site
        self.served = root / "vendor"
        self.served.mkdir()
        ca = trustme.CA()
        ca_pem = root / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_pem))
        self.server = VendorServer(self.served, ca).start()
        self.clock_file = root / "schedule-clock"
        # Two days after the real next midnight (UTC): a command that read the system clock instead of
        # the schedule's would show another next check, whatever the time of day the suite runs at.
        self.midnight = float((int(time.time()) // 86400 + 3) * 86400)
        self.set_clock(self.midnight - 30)
        site.write_config(auto_update={
            "enabled": True, "feed": self.server.url("feed.json"), "ca_file": str(ca_pem), "timezone": "UTC",
        })

    def set_clock(self, moment: float) -> None:
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(f"{moment}\n")
        os.replace(tmp, self.clock_file)

    def offer(self, *versions: str, **manifest: object) -> list[Path]:
        private, _ = self.site.keypair()
        key = load_signing_key(private)
        keys = TrustStore({key.key_id: key.public})
        archives = []
        for version in versions:
            archive = self.site.pack(version, **manifest)
            target = self.served / archive.name
            target.write_bytes(archive.read_bytes())
            archives.append(target)
        publish(self.served, key, [entry_for(a, keys) for a in archives], sequence=1, now=time.time() - 3600)
        return archives

    def start_daemon(self) -> object:
        # No proxy from the test's environment: the server is on loopback.
        return self.site.start_daemon(env={CLOCK_HOOK: str(self.clock_file), "HTTPS_PROXY": "", "https_proxy": ""})


@pytest.fixture
def night(site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Night]:
    sandbox = Night(site, tmp_path)
    # The CLI reads the same clock as the daemon: `status` and `feed` show the daemon's own schedule.
    monkeypatch.setenv(CLOCK_HOOK, str(sandbox.clock_file))
    yield sandbox
    sandbox.server.stop()


def test_a_normal_night_fetches_runs_and_succeeds(site: Site, night: Night) -> None:
    # Given a feed offering the next patch, and a daemon started before midnight
    night.offer("1.0.1", notes="Fixes the nightly export.")
    night.start_daemon()
    status = site.status()
    assert status["auto_update"]["enabled"] is True
    assert status["auto_update"]["next_check"] == night.midnight
    assert site.metric("dropgate_auto_update_enabled") == 1.0
    assert site.metric("dropgate_feed_last_check_timestamp_seconds") == 0.0
    assert night.server.log == []
    # When midnight comes
    night.set_clock(night.midnight + 1)
    # Then the archive is fetched, goes through the gate like any drop, and the update succeeds
    run = site.wait_outcome(1, timeout=120)
    assert (run["archive"], run["outcome"]) == ("gts.1.0.1.tgz", "succeeded"), run["error"]
    assert site.status()["installed_version"] == "1.0.1"
    assert [(r.path, r.status) for r in night.server.log] == [("feed.json", 200), ("gts.1.0.1.tgz", 200)]
    assert site.metric("dropgate_feed_last_check_success") == 1.0
    assert site.metric("dropgate_feed_last_check_timestamp_seconds") == night.midnight + 1
    assert site.metric("dropgate_feed_available_version_info", 'version="1.0.1"') == 1.0
    last = site.status()["auto_update"]["last_check"]
    assert last["result"] == "ok" and last["fetched"] == "gts.1.0.1.tgz"
    assert site.show(1)["notes"] == "Fixes the nightly export."
    text = site.cli("status").stdout
    assert "auto-update: ON (configuration default); schedule '0 0 * * *' UTC" in text
    assert "last check:" in text and "fetched gts.1.0.1.tgz" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{site.port}/", timeout=5) as page:
        assert 'id="auto-update"' in page.read().decode()


def test_a_daemon_killed_mid_download_resumes_after_restart_and_never_takes_the_part(
    site: Site, night: Night
) -> None:
    # Given an archive of a few MiB that the server sends slowly
    (archive,) = night.offer("1.0.1", files={"blob.bin": os.urandom(4 << 20)})
    night.server.faults.rate[archive.name] = 256 << 10
    daemon = night.start_daemon()
    night.set_clock(night.midnight + 1)
    part = site.inbox / f"{archive.name}.part"
    wait_for(lambda: part.exists() and part.stat().st_size > 512 << 10, timeout=60, what="the download to start")
    # When the daemon is killed in the middle of the download
    daemon.kill()  # type: ignore[attr-defined]
    kept = part.stat().st_size
    assert 0 < kept < archive.stat().st_size
    assert site.history() == []  # the .part was not taken
    # and started again (the server is fast now)
    night.server.faults.rate.clear()
    night.start_daemon()
    # Then the download resumes from the .part, and the whole archive is updated from
    run = site.wait_outcome(1, timeout=120)
    assert (run["archive"], run["outcome"]) == ("gts.1.0.1.tgz", "succeeded"), run["error"]
    assert [r.range for r in night.server.requests(archive.name)] == [None, f"bytes={kept}-"]
    assert [r["archive"] for r in site.history()] == ["gts.1.0.1.tgz"]
    assert not part.exists()


def test_auto_update_off_takes_effect_at_once_and_survives_a_restart(site: Site, night: Night) -> None:
    night.offer("1.0.1")
    daemon = night.start_daemon()
    # When an operator switches automatic updates off
    result = site.cli("auto-update", "off")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "automatic updates are OFF"
    # Then the metric and status say so at once, with who did it
    assert site.metric("dropgate_auto_update_enabled") == 0.0
    switched = site.status()["auto_update"]
    assert switched["enabled"] is False and switched["set_by"].startswith("root (pid ")
    assert switched["next_check"] is None
    # and midnight passes without a fetch, across a restart (auto_update.enabled: true is only the default)
    night.set_clock(night.midnight + 1)
    assert daemon.stop() == 0  # type: ignore[attr-defined]
    night.start_daemon()
    assert site.status()["auto_update"]["enabled"] is False
    assert site.metric("dropgate_auto_update_enabled") == 0.0
    assert "auto-update: OFF (set by root (pid" in site.cli("status").stdout
    assert night.server.log == []
    # Switched on again, it fetches at the next scheduled time, not at once
    result = site.cli("auto-update", "on")
    assert result.returncode == 0, result.stderr
    next_night = night.midnight + 86400
    assert result.stdout.strip().startswith("automatic updates are ON; next check ")
    assert site.status()["auto_update"]["next_check"] == next_night
    night.set_clock(next_night + 1)
    assert site.wait_outcome(1, timeout=120)["outcome"] == "succeeded"


def test_auto_update_on_needs_a_feed(site: Site) -> None:
    site.start_daemon()
    result = site.cli("auto-update", "on")
    assert result.returncode == 1
    assert "auto_update.feed is not set in" in result.stderr and "there is no feed to check" in result.stderr


def test_reject_refuses_a_run_waiting_for_approval_and_the_same_bytes_are_a_repeat(site: Site) -> None:
    # Given a run waiting for its approval, whose release notes are shown before anyone approves
    site.write_config(policy={"require_approval": True})
    site.start_daemon()
    archive = site.pack("1.0.1", notes="Changes the invoice numbering.")
    site.drop(archive)
    site.wait_step(1, "approval")
    assert "Changes the invoice numbering." in site.cli("show", "1").stdout
    assert site.status()["run"]["notes"] == "Changes the invoice numbering."
    # When an operator rejects it
    result = site.cli("reject", "1", "--note", "not during the audit")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("run 1 rejected; its archive is set aside in ")
    # Then it ends rejected by that operator with the note, its archive kept aside with the reason
    run = site.wait_outcome(1)
    assert run["outcome"] == "rejected"
    assert run["error"].startswith("rejected by the operator root (pid ")
    assert run["error"].endswith("): not during the audit")
    aside = site.state / "rejected" / "1-gts.1.0.1.tgz"
    assert aside.read_bytes() == archive.read_bytes()
    assert "not during the audit" in aside.with_name(aside.name + ".reason").read_text()
    assert any("rejected by root (pid" in e["message"] for e in site.show(1)["events"])
    # and the same bytes dropped again are refused as a repeat, like any rejection
    site.drop(archive)
    again = site.wait_outcome(2)
    assert again["outcome"] == "rejected" and "was already rejected as run 1" in again["error"]


def test_reject_refuses_a_run_that_is_not_waiting(site: Site) -> None:
    site.start_daemon()
    site.drop(site.pack("1.0.1"))
    assert site.wait_outcome(1, timeout=120)["outcome"] == "succeeded"
    result = site.cli("reject", "1", "--note", "too late")
    assert result.returncode == 1
    assert "run 1 is not waiting in approval or window (it is succeeded)" in result.stderr
    assert site.cli("reject", "9", "--note", "x").stderr.strip() == "dropgate: there is no run 9"


def test_a_run_waits_for_a_closed_window_then_goes_when_it_opens(site: Site) -> None:
    # Given a window that opens at a whole minute 80 to 140 s away (time for the run to reach it), for every update
    now = dt.datetime.now(dt.UTC)
    start = (now + dt.timedelta(seconds=140)).replace(second=0, microsecond=0)
    end = start + dt.timedelta(minutes=15)
    window = f"{DAYS[start.weekday()]} {start:%H:%M}-{DAYS[end.weekday()]} {end:%H:%M}"
    site.write_config(policy={"windows": [window], "windows_for": "all", "timezone": "UTC"})
    site.start_daemon()
    site.drop(site.pack("1.0.1"))
    # When the run is validated before the window opens, it waits, and says until when
    site.wait_step(1, "window")
    status = site.status()
    assert status["window"]["open"] is False and status["window"]["next_open"] == start.timestamp()
    assert site.metric("dropgate_window_next_open_timestamp_seconds") == start.timestamp()
    assert f"closed; the next opens {start:%Y-%m-%d %H:%M}:00 UTC" in site.cli("status").stdout
    # Then it goes on once the window is open, and succeeds
    run = site.wait_outcome(1, timeout=300)
    assert run["outcome"] == "succeeded", run["error"]
    messages = [e["message"] for e in site.show(1)["events"]]
    assert any(m.startswith(f"waiting for a window ({window}, UTC): no window is open") for m in messages)
    assert any(m.startswith("maintenance window open") for m in messages)
    step = next(t for t in site.show(1)["steps"] if t["step"] == "window")
    assert step["finished"] >= start.timestamp()
    assert wait_for(lambda: site.metric("dropgate_window_next_open_timestamp_seconds") == 0.0, what="open: 0")


def test_status_json_keeps_its_keys_and_adds_the_nightly_job_and_windows(site: Site) -> None:
    site.write_config(policy={"windows": ["Sat 22:00-Sun 04:00"], "timezone": "Europe/Paris"})
    site.start_daemon()
    result = site.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert {"gate", "run", "queued", "uploading", "installed_version"} <= set(status)
    assert status["auto_update"]["enabled"] is False and status["auto_update"]["next_check"] is None
    assert status["window"]["windows"] == ["Sat 22:00-Sun 04:00"]
    assert status["window"]["timezone"] == "Europe/Paris"
