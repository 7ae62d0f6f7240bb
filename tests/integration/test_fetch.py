"""The nightly job against a real HTTPS server on loopback (test CA from trustme), with the real fetcher.

The schedule is driven by the instants the tests pass to `tick(now)`: a night
in Europe/Paris, a DST night, nights missed while the daemon was down. The
server logs every request (path, Range header, status, bytes sent), so the
tests check what was asked for, not only what arrived. Nothing of the HTTP
layer is replaced: the faults are real sockets cut, real slow sends, a real
CONNECT proxy.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import trustme
import yaml
from prometheus_client import CollectorRegistry

from pipeline.autoupdate import AutoUpdater, view
from pipeline.fetcher import Throttle
from pipeline.journal import FeedCheck, Journal
from pipeline.metrics import Metrics
from pipeline.signing import TrustStore, generate_keypair, load_signing_key
from tests.archive_helpers import ArchiveSite
from tests.conftest import ROOT, wait_for
from tests.support import small_tmpfs
from tests.vendor_server import ConnectProxy, VendorServer, entry_for, publish

PARIS = ZoneInfo("Europe/Paris")


def paris(*args: int, fold: int = 0) -> float:
    return dt.datetime(*args, tzinfo=PARIS, fold=fold).timestamp()  # type: ignore[misc]


NIGHT = paris(2026, 11, 30)  # Monday 00:00 in Paris
EVENING = NIGHT - 1  # Sunday 23:59:59


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


class Vendor:
    """A site with 3.19.273 installed whose auto_update points at a real HTTPS vendor server."""

    def __init__(self, root: Path, ca: trustme.CA) -> None:
        self.site = ArchiveSite(root)
        self.served = root / "vendor"
        self.served.mkdir()
        self.ca_pem = root / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_pem))
        self.ca = ca
        self.server = VendorServer(self.served, ca).start()
        self.site.raw_config["auto_update"] = {
            "enabled": True, "feed": self.server.url("feed.json"), "ca_file": str(self.ca_pem),
            "timezone": "Europe/Paris",
        }
        self.inbox = root / "inbox"
        self.state = root / "state"
        self.journal = Journal(self.state / "journal.db")
        self.keys = TrustStore({self.site.key.key_id: self.site.key.public})
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)

    def archive(self, version: str, **manifest: Any) -> Path:
        """A signed archive, put on the server."""
        archive = self.site.pack(version, **manifest)
        shutil.copy(archive, self.served / archive.name)
        return self.served / archive.name

    def offer(self, *archives: Path, sequence: int = 1, now: float = NIGHT - 86400, **options: Any) -> None:
        publish(self.served, options.pop("key", self.site.key), [entry_for(a, self.keys) for a in archives],
                sequence=sequence, now=now, **options)

    def updater(self, start: float = EVENING, **config: Any) -> AutoUpdater:
        for section, values in config.items():
            self.site.raw_config.setdefault(section, {}).update(values)
        return AutoUpdater(self.site.config, self.journal, self.metrics, clock=lambda: start, resume_pause=0.01)

    def checks(self) -> list[FeedCheck]:
        return list(reversed(self.journal.feed_checks(limit=100)))

    def inbox_files(self) -> list[str]:
        return sorted(p.name for p in self.inbox.iterdir())

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@pytest.fixture
def vendor(tmp_path: Path, ca: trustme.CA) -> Iterator[Vendor]:
    sandbox = Vendor(tmp_path, ca)
    yield sandbox
    sandbox.server.stop()
    sandbox.journal.close()


# -- a normal night ----------------------------------------------------------------------------------


def test_a_normal_night_fetches_the_newest_applicable_archive_into_the_inbox(vendor: Vendor) -> None:
    # Given a feed offering an old version, the next patch, an unstable preview and one that needs 3.20
    patch = vendor.archive("3.19.274", notes="Fixes the export.", min_version="3.19.0")
    vendor.offer(vendor.archive("3.18.9"), patch, vendor.archive("3.20.0", channel="unstable"),
                 vendor.archive("3.21.0", min_version="3.20.0"))
    updater = vendor.updater()
    # When the clock reaches midnight in Paris (and not before)
    assert updater.tick(EVENING) is None and vendor.server.log == []
    check = updater.tick(NIGHT)
    # Then the patch is in the inbox, byte for byte, and nothing else is
    assert check is not None and check.result == "ok", check
    size = patch.stat().st_size
    assert check.message == f"feed sequence 1: fetched gts.3.19.274.tgz ({size} bytes) into the inbox"
    assert vendor.inbox_files() == ["gts.3.19.274.tgz"]
    assert (vendor.inbox / patch.name).read_bytes() == patch.read_bytes()
    assert [(r.path, r.range, r.status) for r in vendor.server.log] == [
        ("feed.json", None, 200), ("gts.3.19.274.tgz", None, 200)]
    # and the journal, the view and the metrics say what happened
    assert (check.available, check.fetched, check.notes) == ("3.19.274", "gts.3.19.274.tgz", "Fixes the export.")
    state = view(vendor.site.config, vendor.journal, now=NIGHT + 60, running=True)
    assert state["last_check"]["result"] == "ok" and state["available_version"] == "3.19.274"
    assert state["next_check"] == paris(2026, 12, 1)
    assert vendor.metric("dropgate_auto_update_enabled") == 1
    assert vendor.metric("dropgate_feed_last_check_success") == 1
    assert vendor.metric("dropgate_feed_last_check_timestamp_seconds") == NIGHT
    assert vendor.metric("dropgate_feed_available_version_info", version="3.19.274") == 1
    assert vendor.metric("dropgate_feed_download_bytes") == 0  # nothing in progress any more


def test_after_a_check_nothing_more_is_asked_until_the_next_night(vendor: Vendor) -> None:
    vendor.offer(vendor.archive("3.19.274"))
    updater = vendor.updater()
    assert updater.tick(NIGHT) is not None
    for minutes in range(10, 24 * 60, 10):  # the rest of the day, every ten minutes
        assert updater.tick(NIGHT + minutes * 60) is None
    assert len(vendor.server.requests("feed.json")) == 1
    # the next night, the feed is read again; the archive is already here and is not fetched twice
    check = updater.tick(paris(2026, 12, 1))
    assert check is not None and check.result == "ok"
    assert "nothing to fetch (newest: already in the inbox)" in (check.message or "")
    assert len(vendor.server.requests("gts.3.19.274.tgz")) == 1


def test_nights_missed_while_the_daemon_was_down_are_one_check_at_start_up(vendor: Vendor) -> None:
    # Given a check three nights ago, then the daemon down until 09:00 today
    vendor.offer(vendor.archive("3.19.274"))
    old = vendor.journal.start_feed_check(NIGHT - 3 * 86400)
    vendor.journal.update_feed_check(old, finished=NIGHT - 3 * 86400 + 5, result="ok", message="nothing new")
    updater = vendor.updater(start=NIGHT + 9 * 3600)
    # When it starts, one check runs at once, and no other that day
    assert updater.tick(NIGHT + 9 * 3600) is not None
    for minutes in range(1, 15 * 60, 7):
        assert updater.tick(NIGHT + 9 * 3600 + minutes * 60) is None
    assert [c.started for c in vendor.checks()] == [NIGHT - 3 * 86400, NIGHT + 9 * 3600]
    assert updater.tick(paris(2026, 12, 1)) is not None


def test_the_schedule_runs_once_on_the_autumn_night_in_paris_against_the_real_server(vendor: Vendor) -> None:
    # Given checks at 02:30 in Paris, and the night 2026-10-25 when 02:00-03:00 happens twice
    vendor.offer(vendor.archive("3.19.274"), now=paris(2026, 10, 20))
    saturday = paris(2026, 10, 24, 12)
    updater = vendor.updater(start=saturday, auto_update={"schedule": "30 2 * * *"})
    # When the clock runs from Saturday noon to Monday noon, looked at every five minutes
    for minutes in range(0, 48 * 60, 5):
        updater.tick(saturday + minutes * 60)
    # Then the feed was checked twice: at the first 02:30 on Sunday (CEST), at 02:30 on Monday (CET)
    starts = [c.started for c in vendor.checks()]
    assert starts == [paris(2026, 10, 25, 2, 30, fold=0), paris(2026, 10, 26, 2, 30)]
    assert len(vendor.server.requests("feed.json")) == 2
    assert vendor.checks()[0].result == "ok"


def test_the_spring_forward_night_runs_a_check_scheduled_in_the_missing_hour_when_the_clock_jumps(
    vendor: Vendor,
) -> None:
    vendor.offer(vendor.archive("3.19.274"), now=paris(2027, 3, 20))
    saturday = paris(2027, 3, 27, 12)
    updater = vendor.updater(start=saturday, auto_update={"schedule": "30 2 * * *"})
    for minutes in range(0, 48 * 60, 5):
        updater.tick(saturday + minutes * 60)
    assert [c.started for c in vendor.checks()] == [paris(2027, 3, 28, 3, 0), paris(2027, 3, 29, 2, 30)]


def test_switching_on_does_not_fetch_at_once_but_at_the_next_scheduled_time(vendor: Vendor) -> None:
    vendor.offer(vendor.archive("3.19.274"))
    updater = vendor.updater(start=NIGHT - 5 * 86400, auto_update={"enabled": False})
    assert updater.tick(NIGHT - 4 * 86400) is None  # off: nothing
    updater.clock = lambda: NIGHT - 10 * 3600  # Sunday 14:00: an operator switches it on
    message = updater.set_enabled(True, "alice (pid 9)")
    assert message == "automatic updates are ON; next check 2026-11-30 00:00:00 CET"
    assert updater.tick(NIGHT - 10 * 3600 + 1) is None
    assert updater.tick(NIGHT) is not None
    assert vendor.journal.setting("auto_update.enabled").who == "alice (pid 9)"  # type: ignore[union-attr]


# -- cuts, restarts, resumes ---------------------------------------------------------------------------------


def test_a_connection_dropped_halfway_resumes_from_the_part_with_a_range_request(vendor: Vendor) -> None:
    # Given an archive of 3 MiB whose first download is cut after 1 MiB
    patch = vendor.archive("3.19.274", files={"VERSION": b"3.19.274\n", "big.bin": os.urandom(3 << 20)})
    vendor.offer(patch)
    vendor.server.faults.drop_after[patch.name] = 1 << 20
    # When the night's check runs
    check = vendor.updater().tick(NIGHT)
    # Then the second request asked for the rest only, and the archive arrived whole
    assert check is not None and check.result == "ok", check
    requests = vendor.server.requests(patch.name)
    assert [(r.range, r.status) for r in requests] == [(None, 200), (f"bytes={1 << 20}-", 206)]
    assert requests[0].sent == 1 << 20 and requests[1].sent == patch.stat().st_size - (1 << 20)
    assert (vendor.inbox / patch.name).read_bytes() == patch.read_bytes()
    assert not (vendor.inbox / f"{patch.name}.part").exists()


def test_a_part_left_by_a_daemon_that_died_is_resumed_at_start_up(vendor: Vendor) -> None:
    # Given a daemon that died during last night's download: its check still open, 100 KiB in the .part
    patch = vendor.archive("3.19.274", files={"VERSION": b"3.19.274\n", "big.bin": os.urandom(1 << 20)})
    vendor.offer(patch)
    (vendor.inbox / f"{patch.name}.part").write_bytes(patch.read_bytes()[: 100 << 10])
    left = vendor.journal.start_feed_check(NIGHT)
    vendor.journal.update_feed_check(left, downloading=patch.name, total=patch.stat().st_size)
    # When the daemon starts again in the morning (no check is due then)
    updater = vendor.updater(start=NIGHT + 8 * 3600)
    check = updater.tick(NIGHT + 8 * 3600)
    # Then the download resumed where it stopped, and the old check says it was interrupted
    assert check is not None and check.result == "ok"
    assert [r.range for r in vendor.server.requests(patch.name)] == [f"bytes={100 << 10}-"]
    assert (vendor.inbox / patch.name).read_bytes() == patch.read_bytes()
    assert vendor.checks()[0].result == "stopped" and "interrupted" in (vendor.checks()[0].message or "")


def test_a_part_longer_than_the_archive_is_not_trusted_and_the_download_starts_over(vendor: Vendor) -> None:
    patch = vendor.archive("3.19.274")
    vendor.offer(patch)
    (vendor.inbox / f"{patch.name}.part").write_bytes(b"\0" * (patch.stat().st_size + 10))
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "ok"
    assert [r.range for r in vendor.server.requests(patch.name)] == [None]
    assert (vendor.inbox / patch.name).read_bytes() == patch.read_bytes()


def test_a_server_that_ignores_range_is_downloaded_again_from_the_start(vendor: Vendor) -> None:
    # Given a .part holding garbage where the archive's first bytes should be, and a server without Range
    patch = vendor.archive("3.19.274")
    vendor.offer(patch)
    (vendor.inbox / f"{patch.name}.part").write_bytes(b"\0" * 100)
    vendor.server.faults.ignore_range.add(patch.name)
    # When the check resumes, the server answers 200 with the whole file
    check = vendor.updater().tick(NIGHT)
    # Then the fetcher starts over from byte 0 (the garbage is gone) and the archive is whole
    assert check is not None and check.result == "ok", check
    assert [(r.range, r.status) for r in vendor.server.requests(patch.name)] == [("bytes=100-", 200)]
    assert (vendor.inbox / patch.name).read_bytes() == patch.read_bytes()


def test_garbage_resumed_with_range_fails_the_hash_and_is_moved_aside(vendor: Vendor) -> None:
    # A .part whose start is not the archive's (not ours, or the file changed on the server) cannot pass
    patch = vendor.archive("3.19.274")
    vendor.offer(patch)
    (vendor.inbox / f"{patch.name}.part").write_bytes(b"\0" * 100)
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "failed" and "the signed feed says" in (check.message or "")
    assert vendor.inbox_files() == []
    assert (vendor.state / "fetch" / f"{patch.name}.rejected").read_bytes()[:100] == b"\0" * 100


def test_switching_off_stops_a_download_at_once_and_keeps_the_part(vendor: Vendor) -> None:
    # Given a download that goes slowly
    patch = vendor.archive("3.19.274", files={"VERSION": b"3.19.274\n", "big.bin": os.urandom(1 << 20)})
    vendor.offer(patch)
    vendor.server.faults.rate[patch.name] = 64 * 1024
    updater = vendor.updater()
    result: list[FeedCheck | None] = []
    worker = threading.Thread(target=lambda: result.append(updater.tick(NIGHT)))
    worker.start()
    part = vendor.inbox / f"{patch.name}.part"
    wait_for(lambda: part.exists() and part.stat().st_size > 0, what="the download to start")
    # When an operator switches automatic updates off
    message = updater.set_enabled(False, "bob (pid 5)")
    worker.join(timeout=60)
    # Then the download stopped, its bytes are kept, and it says who stopped it
    assert "the download in progress was stopped" in message
    (check,) = result
    assert check is not None and check.result == "stopped"
    assert "automatic updates were switched off by bob (pid 5)" in (check.message or "")
    assert 0 < part.stat().st_size < patch.stat().st_size
    assert vendor.metric("dropgate_auto_update_enabled") == 0
    # and nothing happens the next night; switched on again, the night after resumes the download
    assert updater.tick(paris(2026, 12, 1)) is None
    kept = part.stat().st_size
    updater.clock = lambda: paris(2026, 12, 1, 9)
    updater.set_enabled(True, "bob (pid 5)")
    vendor.server.faults.rate.clear()
    check = updater.tick(paris(2026, 12, 2))
    assert check is not None and check.result == "ok"
    assert vendor.server.requests(patch.name)[-1].range == f"bytes={kept}-"


# -- what must not be used -------------------------------------------------------------------------------------


def test_a_tampered_archive_is_not_renamed_into_the_inbox_and_is_reported(vendor: Vendor) -> None:
    patch = vendor.archive("3.19.274")
    vendor.offer(patch)
    data = bytearray(patch.read_bytes())
    data[-10] ^= 0xFF
    patch.write_bytes(bytes(data))  # the server now serves other bytes than the feed signed
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "failed"
    assert f"gts.3.19.274.tgz: the downloaded bytes have SHA-256 {hashlib.sha256(data).hexdigest()}" in (
        check.message or "")
    assert vendor.inbox_files() == []
    aside = vendor.state / "fetch" / "gts.3.19.274.tgz.rejected"
    assert aside.read_bytes() == bytes(data)
    assert "the signed feed says" in aside.with_name(aside.name + ".reason").read_text()
    assert vendor.metric("dropgate_feed_last_check_success") == 0


def test_an_archive_whose_signed_head_is_not_what_the_feed_says_is_not_used(vendor: Vendor) -> None:
    # Given a feed entry for 3.19.274 whose bytes (hash and length match) are the signed 3.19.275
    other = vendor.archive("3.19.275")
    publish(vendor.served, vendor.site.key, [entry_for(other, vendor.keys, version="3.19.274")],
            sequence=1, now=NIGHT - 86400)
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "failed"
    assert ("gts.3.19.274.tgz: the feed lists it as gts 3.19.274, its signed manifest says gts 3.19.275"
            in (check.message or ""))
    assert vendor.inbox_files() == []


def test_a_feed_signed_by_an_unknown_key_is_refused_and_nothing_is_downloaded(vendor: Vendor, tmp_path: Path) -> None:
    intruder = load_signing_key(generate_keypair(tmp_path / "intruder")[0])
    vendor.offer(vendor.archive("3.19.274"), key=intruder)
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "failed"
    assert check.message == ("the feed is refused: signed with key 'intruder', which is not trusted here "
                             "(trusted: vendor-2026)")
    assert [r.path for r in vendor.server.log] == ["feed.json"]


def test_an_expired_feed_is_refused_as_a_freeze(vendor: Vendor) -> None:
    vendor.offer(vendor.archive("3.19.274"), now=NIGHT - 10 * 86400, expires_in=7 * 86400)
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "failed"
    assert "it expired at 2026-11-26T23:00:00Z" in (check.message or "")
    assert vendor.inbox_files() == []


def test_a_replayed_older_feed_is_refused_after_a_newer_one_was_seen(vendor: Vendor) -> None:
    # Given a feed of sequence 10 seen last night
    vendor.offer(vendor.archive("3.19.274"), sequence=10)
    updater = vendor.updater()
    assert updater.tick(NIGHT).result == "ok"  # type: ignore[union-attr]
    (vendor.inbox / "gts.3.19.274.tgz").unlink()  # (the operator dealt with it)
    # When tonight the server hands out an older signed feed (sequence 9)
    vendor.offer(vendor.archive("3.19.275"), sequence=9)
    check = updater.tick(paris(2026, 12, 1))
    # Then it is refused, and nothing it lists is fetched
    assert check is not None and check.result == "failed"
    assert "its sequence 9 is older than sequence 10 already seen here" in (check.message or "")
    assert vendor.inbox_files() == []
    # and the same sequence with other contents is refused too
    vendor.offer(vendor.archive("3.19.276"), sequence=10)
    check = updater.tick(paris(2026, 12, 2))
    assert "sequence 10 was already seen here with different contents" in (check.message or "")  # type: ignore[union-attr]


def test_a_feed_for_another_product_is_refused(vendor: Vendor) -> None:
    patch = vendor.archive("3.19.274")
    publish(vendor.served, vendor.site.key, [entry_for(patch, vendor.keys, product="crm")], sequence=1,
            now=NIGHT - 86400, product="crm")
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "failed"
    assert check.message == "the feed is refused: it lists product 'crm', this site runs 'gts'"


def test_a_feed_whose_entry_claims_another_product_is_refused(vendor: Vendor) -> None:
    patch = vendor.archive("3.19.274")
    publish(vendor.served, vendor.site.key, [entry_for(patch, vendor.keys, product="crm")], sequence=1,
            now=NIGHT - 86400)
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "failed"
    assert "entries[0] claims product 'crm' in a feed for 'gts'" in (check.message or "")
    assert [r.path for r in vendor.server.log] == ["feed.json"]


def test_bytes_that_were_rejected_here_are_never_fetched_again(vendor: Vendor) -> None:
    # Given 3.19.275 was rejected here as run 1, and the feed offers it and 3.19.274
    newer, older = vendor.archive("3.19.275"), vendor.archive("3.19.274")
    vendor.offer(older, newer)
    run = vendor.journal.add_run(newer.name, spool=vendor.state / "spool", arrived=NIGHT - 86400)
    vendor.journal.update_run(run, sha256=hashlib.sha256(newer.read_bytes()).hexdigest(), outcome="rejected",
                              finished=NIGHT - 86000)
    # When the night's check runs, Then the older applicable one is fetched, the rejected bytes are not
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "ok"
    assert vendor.inbox_files() == ["gts.3.19.274.tgz"]
    assert vendor.server.requests(newer.name) == []


def test_a_blocked_gate_does_not_stop_the_fetch(vendor: Vendor) -> None:
    vendor.offer(vendor.archive("3.19.274"))
    run = vendor.journal.add_run("gts.3.19.270.tgz", spool=vendor.state / "spool", arrived=1.0)
    vendor.journal.update_run(run, outcome="failed", finished=2.0)
    assert vendor.journal.gate() == "blocked"
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "ok"
    assert vendor.inbox_files() == ["gts.3.19.274.tgz"]


def test_a_server_that_announces_more_bytes_than_the_feed_signed_is_not_read(vendor: Vendor) -> None:
    patch = vendor.archive("3.19.274")
    vendor.offer(patch)
    with open(patch, "ab") as handle:
        handle.write(b"\0" * 4096)  # endless data, in small
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "failed"
    size = patch.stat().st_size
    assert f"the server announces {size} bytes, the signed feed {size - 4096}" in (check.message or "")
    assert vendor.inbox_files() == []


def test_not_enough_space_in_the_inbox_is_said_before_downloading(tmp_path: Path, ca: trustme.CA) -> None:
    sandbox = Vendor(tmp_path / "site", ca)
    try:
        with small_tmpfs(tmp_path / "small", "4m") as small:
            sandbox.site.raw_config["paths"]["inbox"] = str(small)
            sandbox.offer(sandbox.archive("3.19.274"))
            check = sandbox.updater().tick(NIGHT)
            assert check is not None and check.result == "failed"
            assert f"not enough space in {small} for gts.3.19.274.tgz.part" in (check.message or "")
            assert sandbox.server.requests("gts.3.19.274.tgz") == []
    finally:
        sandbox.server.stop()
        sandbox.journal.close()


# -- the network ------------------------------------------------------------------------------------------------


def test_the_server_down_is_reported_and_tried_again_at_the_next_night_not_sooner(
    vendor: Vendor, ca: trustme.CA
) -> None:
    vendor.offer(vendor.archive("3.19.274"))
    port = vendor.server.port
    vendor.server.stop()
    updater = vendor.updater()
    check = updater.tick(NIGHT)
    assert check is not None and check.result == "failed"
    assert check.message is not None and check.message.startswith("127.0.0.1: cannot connect")
    assert vendor.metric("dropgate_feed_last_check_success") == 0
    # every minute of the day after: no new check (no busy loop against a server that is down)
    for minute in range(1, 24 * 60):
        assert updater.tick(NIGHT + minute * 60) is None
    assert len(vendor.checks()) == 1
    # the server is back: the next night fetches
    vendor.server = VendorServer(vendor.served, ca, port=port).start()
    check = updater.tick(paris(2026, 12, 1))
    assert check is not None and check.result == "ok"
    assert vendor.inbox_files() == ["gts.3.19.274.tgz"]


def test_a_certificate_from_a_ca_the_site_does_not_trust_is_refused(vendor: Vendor) -> None:
    vendor.offer(vendor.archive("3.19.274"))
    check = vendor.updater(auto_update={"ca_file": None}).tick(NIGHT)
    assert check is not None and check.result == "failed"
    assert "its TLS certificate is not trusted" in (check.message or "")
    assert "set auto_update.ca_file" in (check.message or "")
    assert vendor.server.log == []  # the handshake failed: no request was ever sent


def test_the_proxy_from_https_proxy_is_used_and_no_proxy_is_honoured(
    vendor: Vendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = ConnectProxy().start()
    try:
        vendor.offer(vendor.archive("3.19.274"))
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        check = vendor.updater().tick(NIGHT)
        assert check is not None and check.result == "ok"
        assert proxy.targets and set(proxy.targets) == {f"127.0.0.1:{vendor.server.port}"}
        assert vendor.inbox_files() == ["gts.3.19.274.tgz"]
        # with NO_PROXY naming the server, the proxy is not asked
        tunnels = len(proxy.targets)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        vendor.updater().tick(paris(2026, 12, 1))
        assert len(proxy.targets) == tunnels
        assert len(vendor.server.requests("feed.json")) == 2
    finally:
        proxy.stop()


def test_redirects_are_followed_to_https_only(vendor: Vendor) -> None:
    patch = vendor.archive("3.19.274")
    shutil.copy(patch, vendor.served / "mirror.tgz")
    vendor.offer(patch)
    vendor.server.faults.redirect[patch.name] = vendor.server.url("mirror.tgz")
    check = vendor.updater().tick(NIGHT)
    assert check is not None and check.result == "ok"
    assert [r.path for r in vendor.server.log] == ["feed.json", patch.name, "mirror.tgz"]
    (vendor.inbox / patch.name).unlink()
    vendor.offer(vendor.archive("3.19.275"), sequence=2)
    vendor.server.faults.redirect["gts.3.19.275.tgz"] = f"http://127.0.0.1:{vendor.server.port}/mirror.tgz"
    check = vendor.updater().tick(paris(2026, 12, 1))
    assert check is not None and check.result == "failed"
    assert "redirected to 'http://127.0.0.1" in (check.message or "") and "which is not an https URL" in (
        check.message or "")


def test_the_bandwidth_limit_paces_the_transfer() -> None:
    # An injected clock and sleep: what the limiter asks for, not how long it took
    moments = iter([0.0, 0.0, 0.25, 0.5])
    slept: list[float] = []
    throttle = Throttle(1 << 20, now=lambda: next(moments), sleep=slept.append)
    throttle.account(1 << 20)  # 1 MiB at once, at 1 MiB/s: one second ahead
    throttle.account(1 << 19)  # half a MiB more by 0.25 s: 1.25 s ahead
    throttle.account(0)
    assert slept == [1.0, 1.25, 1.0]
    unlimited: list[float] = []
    Throttle(0, now=lambda: 0.0, sleep=unlimited.append).account(1 << 30)
    assert unlimited == []


def test_a_bandwidth_limited_download_still_arrives_whole(vendor: Vendor) -> None:
    patch = vendor.archive("3.19.274", files={"VERSION": b"3.19.274\n", "big.bin": os.urandom(64 << 10)})
    vendor.offer(patch)
    check = vendor.updater(auto_update={"bandwidth": "256KiB/s"}).tick(NIGHT)
    assert check is not None and check.result == "ok"
    assert (vendor.inbox / patch.name).read_bytes() == patch.read_bytes()


# -- dropgate feed: what the operator reads --------------------------------------------------------------------------


def test_dropgate_feed_shows_the_offers_what_would_be_fetched_next_and_why(vendor: Vendor) -> None:
    vendor.offer(vendor.archive("3.18.9"), vendor.archive("3.19.274", notes="Fixes the export."),
                 vendor.archive("3.20.0", channel="unstable"), vendor.archive("3.21.0", min_version="3.20.0"),
                 now=dt.datetime.now(dt.UTC).timestamp() - 3600)
    config_file = vendor.site.root / "dropgate.yaml"
    config_file.write_text(yaml.safe_dump(vendor.site.raw_config))
    # the fixture's spool folder for validate contexts: on a real site it would show a run the journal lost
    vendor.site.spool.rmdir()
    command = [sys.executable, "-m", "pipeline", "--config", str(config_file), "feed"]
    text = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert " → 3.19.274" in out and "fetched next: the newest on stable above the installed 3.19.273" in out
    assert "3.21.0" in out and "needs 3.20.0 installed first (installed: 3.19.273)" in out
    assert "on channel unstable, not followed here (auto_update.channel: stable)" in out
    assert "not newer than the installed 3.19.273" in out
    assert "next:        gts.3.19.274.tgz" in out and "Fixes the export." in out
    assert "auto-update: ON (configuration default); schedule '0 0 * * *' Europe/Paris, channel stable" in out
    data = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60,
                                     cwd=ROOT).stdout)
    assert data["next"] == "3.19.274" and data["error"] is None
    assert [o["version"] for o in data["offers"]] == ["3.21.0", "3.20.0", "3.19.274", "3.18.9"]
    assert data["auto_update"]["enabled"] is True
    # a feed that cannot be used: exit 1, the reason in one line
    vendor.server.faults.status["feed.json"] = 503
    failed = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert failed.returncode == 1
    assert "ERROR: https://127.0.0.1:" in failed.stdout and "the server answered 503" in failed.stdout
