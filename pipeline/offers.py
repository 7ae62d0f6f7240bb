"""What the vendor's feed offers a site, and which archive the nightly job would fetch next, and why.

`plan` is the one place that decides (the nightly job fetches what it
chooses; `dropgate feed` shows every entry with its reason): the newest
entry on the followed channel, newer than the installed version, whose
minimum version is met, within `limits.max_archive_bytes`, and whose bytes
were never rejected, failed, installed or queued here (`Journal.last_with_sha`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import Config, config_path, format_duration, load_config
from pipeline.errors import ConfigError, FeedRejected, FetchFailed
from pipeline.journal import Journal
from pipeline.release import installed_version
from pipeline.versions import Version

if TYPE_CHECKING:
    from pipeline.feed import Feed, FeedEntry
    from pipeline.signing import TrustStore

CHANNELS_FOLLOWED = {"stable": ("stable",), "unstable": ("stable", "unstable")}


@dataclass(frozen=True)
class Offer:
    entry: FeedEntry
    chosen: bool
    why: str


def _not_applicable(entry: FeedEntry, config: Config, journal: Journal | None, installed: str | None) -> str | None:
    followed = CHANNELS_FOLLOWED[config.auto_update.channel]
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
    from pipeline.feed import check_fresh, parse_feed

    feed = parse_feed(data, keys)
    if feed.product != config.platform.product:
        raise FeedRejected(
            f"the feed is refused: it lists product {feed.product!r}, this site runs {config.platform.product!r}"
        )
    check_fresh(feed, now=now, seen=seen)
    return feed


def trust_store(config: Config) -> TrustStore:
    """The site's trusted keys; FeedRejected when they cannot be read."""
    from pipeline.signing import load_trusted_keys

    try:
        return load_trusted_keys(config.trust.keys)
    except ConfigError as error:
        raise FeedRejected(f"the feed cannot be checked: {'; '.join(error.problems)}") from None


# -- dropgate feed ---------------------------------------------------------------------------------


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
        from pipeline.feed import format_time

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
        from pipeline.autoupdate import render
        from pipeline.schedule import zone

        lines += render(self.state, zone(config.auto_update.timezone))
        if self.state["jitter"]:
            lines.append(f"  jitter:      up to {format_duration(self.state['jitter'])} after the scheduled time")
        return lines


def _show(args: argparse.Namespace) -> int:
    from pipeline.autoupdate import schedule_now, view
    from pipeline.feed import MAX_FEED_BYTES
    from pipeline.fetcher import Fetcher
    from pipeline.report import daemon_pid, open_journal

    config = load_config(config_path(args.config))
    url = config.auto_update.feed
    journal = open_journal(config)
    try:
        now = schedule_now()  # the daemon's schedule and feed expiry read the same clock
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
                report.feed = read_feed(data, config, trust_store(config), now=now, seen=seen)
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
