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

import contextlib
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ControlRefused, FeedRejected, FetchFailed, FetchStopped, StepFailed
from pipeline.inbox.arrival import move_in
from pipeline.journal import FeedCheck, Journal, Setting
from pipeline.release import installed_version
from pipeline.schedule import local_text, machine_seed, next_check, zone, zone_name

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.feed import FeedEntry
    from pipeline.fetcher import Fetcher
    from pipeline.metrics import Metrics
    from pipeline.quickconfig import SiteConfig
    from pipeline.signing import TrustStore

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
    """The system clock, or the test hook's file when CLOCK_HOOK is set (said once, in the daemon's log)."""
    hook = os.environ.get(CLOCK_HOOK)
    if not hook:
        return time.time
    log.warning("test hook %s: the nightly schedule reads its clock from %s", CLOCK_HOOK, hook)
    return lambda: _hooked(hook)


def schedule_now() -> float:
    """"Now" as the nightly schedule sees it: what `status` and `dropgate feed` compute the next check from,
    so that they show the daemon's own schedule."""
    hook = os.environ.get(CLOCK_HOOK)
    return _hooked(hook) if hook else time.time()


def _hooked(hook: str) -> float:
    try:
        return float(Path(hook).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return time.time()


# -- the switch and the schedule ---------------------------------------------------------


@dataclass(frozen=True)
class Switch:
    enabled: bool
    setting: Setting | None  # None: the configuration's default


def switch(config: SiteConfig, journal: Journal | None) -> Switch:
    setting = journal.setting(SWITCH) if journal is not None else None
    if setting is None:
        return Switch(config.auto_update.enabled, None)
    return Switch(bool(setting.value), setting)


def due(config: SiteConfig, journal: Journal | None, *, since: float) -> float:
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


# -- the job -------------------------------------------------------------------------------------------


def _archive_url(feed_url: str, entry: FeedEntry) -> str:
    import httpx

    return str(httpx.URL(feed_url).join(entry.url))


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
            self._resume = False  # switched on later, it waits for the schedule like any switch-on
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
        from pipeline.feed import MAX_FEED_BYTES
        from pipeline.fetcher import Fetcher
        from pipeline.offers import plan, read_feed, trust_store

        keys = trust_store(config)
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
        try:
            move_in(part, inbox / name)
        except FileExistsError:
            raise FetchFailed(f"{name} appeared in the inbox meanwhile; the download stays in {part.name}") from None
        self.journal.update_feed_check(
            check_id, downloading=None, fetched=name, fetched_sha256=entry.sha256, notes=entry.notes
        )
        return f"fetched {name} ({entry.length} bytes) into the inbox"

    @staticmethod
    def _check_head(part: Path, entry: FeedEntry, keys: TrustStore, reject_dir: Path) -> None:
        """The archive's own signed head must say what the feed says, before it goes into the inbox."""
        from pipeline.archive import authenticate
        from pipeline.fetcher import Fetcher

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


def view(config: SiteConfig, journal: Journal | None, *, now: float, running: bool) -> dict[str, Any]:
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
            "active": last.result is None and running,  # without a daemon an unfinished check is not running
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
        outcome = last["result"] or ("running" if last.get("active", True) else "cut short: the daemon stopped")
        message = f" — {last['message']}" if last["message"] else ""
        lines.append(f"  last check:  {when(last['started'])}: {outcome}{message}")
    download = auto["download"]
    if download is not None:
        state = "downloading" if download["active"] else "paused"
        lines.append(f"  download:    {download['name']} {download['bytes']} of {download['total']} bytes ({state})")
    return lines
