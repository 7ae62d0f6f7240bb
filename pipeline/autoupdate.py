"""The nightly job: check the vendor's feed on `auto_update.schedule` and fetch what it offers into the inbox.

    schedule due → fetch the feed → verify (signature, product, expiry, sequence)
    → choose the newest applicable archive → download to <inbox>/<name>.part
    → length, SHA-256 and signed head checked → rename into the inbox

From the inbox a fetched archive is an ordinary drop: same gate, same steps,
the same no-retry rule (bytes that failed or were rejected here are never
fetched again). The switch is the operator's (`dropgate auto-update on|off`,
kept in the journal with who and when; `auto_update.enabled` is only the
default). A check due while the daemon was down runs once at start-up; a
check that failed is tried again at the next scheduled time, never sooner.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config, config_path, format_duration, load_config
from pipeline.errors import ConfigError, ControlRefused, FeedRejected, FetchFailed, FetchStopped, StepFailed
from pipeline.feed import CHANNELS, MAX_FEED_BYTES, Feed, FeedEntry, check_fresh, format_time, parse_feed
from pipeline.fetcher import Fetcher
from pipeline.journal import FeedCheck, Journal, Setting
from pipeline.release import installed_version
from pipeline.schedule import local_text, machine_seed, next_check, zone, zone_name
from pipeline.signing import TrustStore, load_trusted_keys
from pipeline.versions import Version

if TYPE_CHECKING:
    from pipeline.metrics import Metrics

log = logging.getLogger("dropgate")

SWITCH = "auto_update.enabled"
TICK_SECONDS = 1.0
FETCH_DIR = "fetch"  # <state>/fetch: the last verified feed, and downloads whose bytes were not the feed's
FEED_COPY = "feed.json"
# Test hook: when set, the schedule reads "now" (seconds since the epoch) from this file instead of the
# system clock, so that tests can move the nightly job to midnight without waiting for it. Only the
# schedule and the feed's expiry use it; run timestamps keep the system clock.
CLOCK_HOOK = "DROPGATE_TEST_SCHEDULE_CLOCK"


def schedule_clock() -> Callable[[], float]:
    """The system clock, or the test hook's file when CLOCK_HOOK is set."""
    hook = os.environ.get(CLOCK_HOOK)
    if not hook:
        return time.time
    log.warning("test hook %s: the nightly schedule reads its clock from %s", CLOCK_HOOK, hook)

    def read() -> float:
        try:
            return float(Path(hook).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return time.time()

    return read


# -- the switch and the schedule ---------------------------------------------------------


@dataclass(frozen=True)
class Switch:
    enabled: bool
    setting: Setting | None  # None: the configuration's default


def switch(config: Config, journal: Journal | None) -> Switch:
    setting = journal.setting(SWITCH) if journal is not None else None
    if setting is None:
        return Switch(config.auto_update.enabled, None)
    return Switch(bool(setting.value), setting)


def due(config: Config, journal: Journal | None, *, since: float) -> float:
    """When the next check is due: the first scheduled time (plus this site's jitter) after the last
    check, or after `since` (the daemon's start) when there was none, and never before the switch was
    last turned on. A time in the past means: at once, and once."""
    auto = config.auto_update
    last = journal.last_feed_check() if journal is not None else None
    reference = last.started if last is not None else since
    on = switch(config, journal)
    if on.setting is not None and on.enabled:
        reference = max(reference, on.setting.ts)
    return next_check(auto.schedule, zone(auto.timezone), reference, jitter=auto.jitter, seed=machine_seed())


# -- what the feed offers, and what would be fetched ------------------------------------------


@dataclass(frozen=True)
class Offer:
    entry: FeedEntry
    chosen: bool
    why: str


def _not_applicable(entry: FeedEntry, config: Config, journal: Journal | None, installed: str | None) -> str | None:
    followed = ("stable",) if config.auto_update.channel == "stable" else CHANNELS
    if entry.channel not in followed:
        return f"on channel {entry.channel}, not followed here (auto_update.channel: {config.auto_update.channel})"
    if installed is None:
        return "no release is installed here (dropgate init)"
    if Version.parse(entry.version) <= Version.parse(installed):
        return f"not newer than the installed {installed}"
    if entry.min_version is not None and Version.parse(installed) < Version.parse(entry.min_version):
        return f"needs {entry.min_version} installed first (installed: {installed})"
    if entry.length > config.limits.max_archive_bytes:
        return f"{entry.length} bytes, above limits.max_archive_bytes ({config.limits.max_archive_bytes})"
    if journal is not None:
        earlier = journal.last_with_sha(entry.sha256)
        if earlier is not None:
            if earlier.outcome == "succeeded":
                return f"these bytes were already installed by run {earlier.id}"
            return (
                f"these bytes were {earlier.outcome} here as run {earlier.id}: never fetched again "
                f"(`dropgate retry {earlier.id}` runs them again)"
            )
        for run in (*journal.unfinished(), *journal.queued()):
            if run.sha256 == entry.sha256:
                return f"already here as run {run.id} ({run.step})"
    if (config.paths.inbox / entry.archive_name).exists():
        return "already in the inbox"
    return None


def plan(feed: Feed, config: Config, journal: Journal | None, installed: str | None) -> list[Offer]:
    """Every entry, newest first, each with why it would or would not be fetched; at most one is chosen."""
    offers: list[Offer] = []
    chosen: FeedEntry | None = None
    for entry in sorted(feed.entries, key=lambda e: Version.parse(e.version), reverse=True):
        why = _not_applicable(entry, config, journal, installed)
        if why is None and chosen is None:
            chosen = entry
            needs = f", needs {entry.min_version} (met)" if entry.min_version else ""
            why = f"fetched next: the newest on {entry.channel} above the installed {installed}{needs}"
        elif why is None:
            assert chosen is not None
            why = f"applicable, but the newer {chosen.version} is fetched first"
        offers.append(Offer(entry, entry is chosen, why))
    return offers


def read_feed(data: bytes, config: Config, keys: TrustStore, *, now: float, seen: tuple[int, str] | None) -> Feed:
    """A feed this site may use: verified, for its product, not expired, not older than the newest seen."""
    feed = parse_feed(data, keys)
    if feed.product != config.platform.product:
        raise FeedRejected(
            f"the feed is refused: it lists product {feed.product!r}, this site runs {config.platform.product!r}"
        )
    check_fresh(feed, now=now, seen=seen)
    return feed


def _trust(config: Config) -> TrustStore:
    try:
        return load_trusted_keys(config.trust.keys)
    except ConfigError as error:
        raise FeedRejected(f"the feed cannot be checked: {'; '.join(error.problems)}") from None


def _archive_url(feed_url: str, entry: FeedEntry) -> str:
    import httpx

    return str(httpx.URL(feed_url).join(entry.url))


# -- the job -------------------------------------------------------------------------------------------


class AutoUpdater(threading.Thread):
    """Checks the feed when due and fetches into the inbox; switched on and off by the operator."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
        resume_pause: float | None = None,
    ) -> None:
        super().__init__(name="dropgate-auto-update", daemon=True)
        self.config = config
        self.journal = journal
        self.metrics = metrics
        self.clock = clock
        self.resume_pause = resume_pause
        self.started_at = clock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._fetcher: Fetcher | None = None
        self._resume = self._settle_interrupted()
        self.publish()

    # -- control (other threads) ------------------------------------------------------
    def set_enabled(self, enabled: bool, who: str) -> str:
        """The operator's switch; off stops a download in progress at once (its .part is kept)."""
        if enabled and self.config.auto_update.feed is None:
            where = self.config.source or "the configuration"
            raise ControlRefused(f"auto_update.feed is not set in {where}: there is no feed to check")
        self.journal.set_setting(SWITCH, enabled, who, ts=self.clock())
        log.info("automatic updates switched %s by %s", "on" if enabled else "off", who)
        stopped = ""
        if not enabled and self._cancel_download(f"automatic updates were switched off by {who}"):
            stopped = "; the download in progress was stopped (its .part is kept and resumes when switched on)"
        self._wake.set()
        self.publish()
        if not enabled:
            return f"automatic updates are OFF{stopped}"
        tz = zone(self.config.auto_update.timezone)
        when = due(self.config, self.journal, since=self.started_at)
        return f"automatic updates are ON; next check {local_text(max(when, self.clock()), tz)}"

    def _cancel_download(self, reason: str) -> bool:
        with self._lock:
            fetcher = self._fetcher
            if fetcher is None:
                return False
            fetcher.stop_reason = reason
            fetcher.cancel.set()
            return True

    def stop(self) -> None:
        self._stopping.set()
        self._cancel_download("the daemon is stopping")
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick(self.clock())
            except Exception:
                log.exception("auto-update: the check failed unexpectedly; trying again at the next scheduled time")
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()

    def tick(self, now: float) -> FeedCheck | None:
        """Run a check if one is due at `now` (or was cut short by a stop); else nothing."""
        if not switch(self.config, self.journal).enabled:
            return None
        if self._resume or now >= due(self.config, self.journal, since=self.started_at):
            self._resume = False
            return self.check(now)
        return None

    def _settle_interrupted(self) -> bool:
        """Close checks a previous daemon left running; True if one should resume now."""
        resume = False
        for check in self.journal.feed_checks(limit=5):
            if check.result is not None:
                continue
            self.journal.update_feed_check(
                check.id,
                finished=self.clock(),
                result="stopped",
                message="interrupted: the daemon stopped during this check; it resumed at start-up",
            )
            resume = True
        return resume

    def check(self, now: float) -> FeedCheck:
        """One check of the feed, recorded in the journal; never raises for what the vendor's side does."""
        check_id = self.journal.start_feed_check(now)
        log.info("auto-update: checking %s", self.config.auto_update.feed)
        try:
            result, message = "ok", self._check(check_id, now)
        except FetchStopped as stopped:
            if self._stopping.is_set():
                log.info("auto-update: %s; it resumes at start-up", stopped)
                return self._finished(check_id)  # left open on purpose: the next start resumes it
            result, message = "stopped", str(stopped)
        except (FeedRejected, FetchFailed) as error:
            result, message = "failed", str(error)
        except Exception as error:
            log.exception("auto-update: unexpected error")
            result, message = "failed", f"unexpected error: {error!r}"
        self.journal.update_feed_check(check_id, finished=self.clock(), result=result, message=message)
        (log.info if result == "ok" else log.warning)("auto-update: %s: %s", result, message)
        self.publish()
        return self._finished(check_id)

    def _finished(self, check_id: int) -> FeedCheck:
        return next(c for c in self.journal.feed_checks(limit=5) if c.id == check_id)

    def _check(self, check_id: int, now: float) -> str:
        config = self.config
        url = config.auto_update.feed
        if url is None:
            raise FeedRejected("auto_update.feed is not set: there is no feed to check")
        keys = _trust(config)
        fetcher = Fetcher(
            ca_file=config.auto_update.ca_file, bandwidth=config.auto_update.bandwidth, on_progress=self._progress
        )
        if self.resume_pause is not None:
            fetcher.resume_pause = self.resume_pause
        with self._lock:
            self._fetcher = fetcher
        try:
            if self._stopping.is_set():
                fetcher.cancel.set()
            data = fetcher.get(url, max_bytes=MAX_FEED_BYTES)
            feed = read_feed(data, config, keys, now=now, seen=self.journal.feed_seen())
            self.journal.update_feed_check(check_id, sequence=feed.sequence, digest=feed.digest)
            self._keep_copy(data)
            offers = plan(feed, config, self.journal, installed_version(config.platform.root))
            chosen = next((offer.entry for offer in offers if offer.chosen), None)
            self.journal.update_feed_check(check_id, available=chosen.version if chosen else None)
            if chosen is None:
                newest = offers[0].why if offers else "the feed lists no archive"
                return f"feed sequence {feed.sequence}: nothing to fetch (newest: {newest})"
            return f"feed sequence {feed.sequence}: " + self._fetch(check_id, fetcher, url, chosen, keys)
        finally:
            with self._lock:
                self._fetcher = None
            if self.metrics is not None:
                self.metrics.download_progress(0, 0)

    def _fetch(self, check_id: int, fetcher: Fetcher, feed_url: str, entry: FeedEntry, keys: TrustStore) -> str:
        inbox = self.config.paths.inbox
        name = entry.archive_name
        part = inbox / f"{name}.part"
        self._forget_stale_parts(keep=part)
        self.journal.update_feed_check(check_id, downloading=name, total=entry.length)
        reject_dir = self.config.paths.state / FETCH_DIR
        fetcher.download(
            _archive_url(feed_url, entry), length=entry.length, sha256=entry.sha256, part=part, reject_dir=reject_dir
        )
        self._check_head(part, entry, keys, reject_dir)
        target = inbox / name
        if target.exists():
            raise FetchFailed(f"{name} appeared in the inbox meanwhile; the download stays in {part.name}")
        os.rename(part, target)
        self.journal.update_feed_check(
            check_id, downloading=None, fetched=name, fetched_sha256=entry.sha256, notes=entry.notes
        )
        return f"fetched {name} ({entry.length} bytes) into the inbox"

    @staticmethod
    def _check_head(part: Path, entry: FeedEntry, keys: TrustStore, reject_dir: Path) -> None:
        """The archive's own signed head must say what the feed says, before it goes into the inbox."""
        from pipeline.archive import authenticate

        try:
            manifest = authenticate(part, keys)
            problem = None
            if (manifest.product, manifest.version) != (entry.product, entry.version):
                problem = (
                    f"the feed lists it as {entry.product} {entry.version}, its signed manifest says "
                    f"{manifest.product} {manifest.version}"
                )
        except StepFailed as error:
            problem = str(error)
        if problem is not None:
            Fetcher._set_aside(part, reject_dir, f"{entry.archive_name}: {problem}")
            raise FetchFailed(f"{entry.archive_name}: {problem} (moved to {reject_dir})")

    def _forget_stale_parts(self, keep: Path) -> None:
        """Remove our own partial downloads of versions no longer chosen (never anything else)."""
        for check in self.journal.feed_checks(limit=50):
            if check.downloading is None:
                continue
            stale = self.config.paths.inbox / f"{check.downloading}.part"
            if stale != keep and stale.exists():
                log.info("auto-update: removing %s, a partial download of a version no longer chosen", stale)
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()

    def _keep_copy(self, data: bytes) -> None:
        folder = self.config.paths.state / FETCH_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{FEED_COPY}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / FEED_COPY)

    def _progress(self, done: int, total: int) -> None:
        if self.metrics is not None:
            self.metrics.download_progress(done, total)

    def publish(self) -> None:
        """The switch and the last check, to the metrics."""
        if self.metrics is None:
            return
        try:
            last = self.journal.last_feed_check("ok", "failed")
            read = next((c for c in self.journal.feed_checks(limit=20) if c.sequence is not None), None)
            self.metrics.feed_changed(
                enabled=switch(self.config, self.journal).enabled,
                last_check=last.started if last is not None else 0.0,
                success=last is not None and last.result == "ok",
                available=read.available if read is not None else None,
            )
        except Exception:
            log.exception("auto-update: cannot publish the metrics")


# -- what the operator reads ------------------------------------------------------------------------------


def view(config: Config, journal: Journal | None, *, now: float, running: bool) -> dict[str, Any]:
    """The state of automatic updates, for `status`, the page and `dropgate feed`."""
    auto = config.auto_update
    on = switch(config, journal)
    tz = zone(auto.timezone)
    result: dict[str, Any] = {
        "enabled": on.enabled,
        "set_by": on.setting.who if on.setting else None,
        "set_at": on.setting.ts if on.setting else None,
        "feed": auto.feed,
        "channel": auto.channel,
        "schedule": auto.schedule,
        "timezone": zone_name(tz),
        "jitter": auto.jitter,
        "next_check": None,
        "overdue": False,
        "last_check": None,
        "last_success": None,
        "available_version": None,
        "download": None,
    }
    if on.enabled and auto.feed is not None:
        result["next_check"] = due(config, journal, since=now)
        result["overdue"] = result["next_check"] <= now
    checks = journal.feed_checks(limit=50) if journal is not None else []
    if checks:
        last = checks[0]
        result["last_check"] = {
            "started": last.started,
            "finished": last.finished,
            "result": last.result,
            "message": last.message,
            "fetched": last.fetched,
        }
        success = next((c for c in checks if c.result == "ok"), None)
        result["last_success"] = success.started if success else None
        read = next((c for c in checks if c.sequence is not None), None)
        result["available_version"] = read.available if read else None
        if last.downloading:
            part = config.paths.inbox / f"{last.downloading}.part"
            with contextlib.suppress(FileNotFoundError):
                result["download"] = {
                    "name": last.downloading,
                    "bytes": part.stat().st_size,
                    "total": last.total,
                    "active": last.result is None and running,
                }
    return result


def render(auto: dict[str, Any], tz: dt.tzinfo) -> list[str]:
    """The auto-update lines of `status` and `dropgate feed`, times in the schedule's zone."""

    def when(ts: float | None) -> str:
        return local_text(ts, tz) if ts else "-"

    state = "ON" if auto["enabled"] else "OFF"
    who = f" (set by {auto['set_by']} at {when(auto['set_at'])})" if auto["set_by"] else " (configuration default)"
    lines = [f"auto-update: {state}{who}; schedule {auto['schedule']!r} {auto['timezone']}, channel {auto['channel']}"]
    if auto["next_check"] is not None:
        late = " (missed: it runs as soon as the daemon runs)" if auto["overdue"] else ""
        lines.append(f"  next check:  {when(auto['next_check'])}{late}")
    last = auto["last_check"]
    if last is not None:
        outcome = last["result"] or "running"
        message = f" — {last['message']}" if last["message"] else ""
        lines.append(f"  last check:  {when(last['started'])}: {outcome}{message}")
    download = auto["download"]
    if download is not None:
        state = "downloading" if download["active"] else "paused"
        lines.append(f"  download:    {download['name']} {download['bytes']} of {download['total']} bytes ({state})")
    return lines


def cmd_feed(args: argparse.Namespace) -> int:
    """`dropgate feed` (site), `dropgate feed build` and `dropgate feed verify` (vendor)."""
    from pipeline import feed as feed_module

    if args.feed_action == "build":
        return feed_module.cmd_feed_build(args)
    if args.feed_action == "verify":
        return feed_module.cmd_feed_verify(args)
    return _show(args)


@dataclass
class FeedReport:
    """What `dropgate feed` prints: the feed read now, what it offers, and the state of the job."""

    config: Config
    installed: str | None
    state: dict[str, Any]
    feed: Feed | None = None
    offers: tuple[Offer, ...] = ()
    error: str | None = None

    @property
    def chosen(self) -> Offer | None:
        return next((offer for offer in self.offers if offer.chosen), None)

    def to_json(self) -> dict[str, Any]:
        feed, chosen = self.feed, self.chosen
        document = None
        if feed is not None:
            document = {"sequence": feed.sequence, "published": feed.published, "expires": feed.expires,
                        "key_id": feed.key_id}
        return {
            "feed": self.config.auto_update.feed,
            "error": self.error,
            "product": self.config.platform.product,
            "installed_version": self.installed,
            "document": document,
            "offers": [{**offer.entry.to_fields(), "next": offer.chosen, "why": offer.why} for offer in self.offers],
            "next": None if chosen is None else chosen.entry.version,
            "auto_update": self.state,
        }

    def lines(self) -> list[str]:
        config, feed = self.config, self.feed
        lines = [f"feed:        {config.auto_update.feed or '(not set)'}"]
        if self.error is not None:
            lines.append(f"  ERROR: {self.error}")
        if feed is not None:
            lines.append(
                f"  sequence {feed.sequence}, signed with key {feed.key_id}, "
                f"published {format_time(feed.published)}, expires {format_time(feed.expires)}"
            )
            lines.append(f"offers for {config.platform.product} (installed: {self.installed or 'none'}):")
            for offer in self.offers:
                entry = offer.entry
                mark = "→" if offer.chosen else " "
                day = dt.datetime.fromtimestamp(entry.published, dt.UTC).strftime("%Y-%m-%d")
                lines.append(f" {mark} {entry.version:16} {entry.channel:8} {day}  {offer.why}")
            if not self.offers:
                lines.append("   (the feed lists no archive)")
            chosen = self.chosen
            if chosen is None:
                lines.append("next:        nothing would be fetched")
            else:
                lines.append(f"next:        {chosen.entry.archive_name} ({chosen.entry.length} bytes)")
                lines += [f"    {line}" for line in chosen.entry.notes.splitlines() or ["(no release notes)"]]
        lines += render(self.state, zone(config.auto_update.timezone))
        if self.state["jitter"]:
            lines.append(f"  jitter:      up to {format_duration(self.state['jitter'])} after the scheduled time")
        return lines


def _show(args: argparse.Namespace) -> int:
    from pipeline.report import daemon_pid, open_journal

    config = load_config(config_path(args.config))
    url = config.auto_update.feed
    journal = open_journal(config)
    try:
        now = time.time()
        report = FeedReport(
            config,
            installed_version(config.platform.root),
            view(config, journal, now=now, running=daemon_pid(config.paths.state) is not None),
        )
        if url is None:
            report.error = "auto_update.feed is not set: there is no feed to check"
        else:
            try:
                data = Fetcher(ca_file=config.auto_update.ca_file).get(url, max_bytes=MAX_FEED_BYTES)
                seen = journal.feed_seen() if journal is not None else None
                report.feed = read_feed(data, config, _trust(config), now=now, seen=seen)
                report.offers = tuple(plan(report.feed, config, journal, report.installed))
            except (FeedRejected, FetchFailed) as failure:
                report.error = str(failure)
    finally:
        if journal is not None:
            journal.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(report.lines()))
    return 0 if report.error is None else 1
