"""What dashboards and alerts read: `dropgate_gate` and `dropgate_step_progress_ratio`, scraped over real HTTP.

A sampler scrapes the real daemon's /metrics every 50 ms while real runs go
through (success, rejection, failure, resolve, a run queued on a blocked gate,
a restart) and records what a Prometheus server would have seen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import Site, wait_for


def parse(text: str) -> dict[str, str | float]:
    """The gate and step states and the progress ratio of one scrape."""
    sample: dict[str, str | float] = {}
    for line in text.splitlines():
        for name in ("dropgate_gate", "dropgate_step"):
            if line.startswith(f"{name}{{{name}=") and line.endswith(" 1.0"):
                sample[name] = line.split('"')[1]
        if line.startswith("dropgate_step_progress_ratio "):
            sample["progress"] = float(line.split()[1])
    return sample


def gate(site: Site) -> str | None:
    value = parse(site.metrics_text() or "").get("dropgate_gate")
    return str(value) if value is not None else None


@dataclass
class Sampler:
    """Scrapes /metrics in a thread; `samples` is what was seen, in order."""

    site: Site
    samples: list[dict[str, str | float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._scrape, name="metrics-sampler")

    def _scrape(self) -> None:
        while not self.stop.is_set():
            text = self.site.metrics_text()
            if text is not None:
                self.samples.append(parse(text))
            self.stop.wait(0.05)

    def more(self, scrapes: int) -> None:
        """Return once `scrapes` more scrapes were taken (what is seen after a moment, read as it happened)."""
        wanted = len(self.samples) + scrapes
        wait_for(lambda: len(self.samples) >= wanted, timeout=30, what=f"{scrapes} more scrapes")

    def gates(self) -> list[str]:
        """The gate states seen, consecutive repeats collapsed."""
        seen: list[str] = []
        for sample in self.samples:
            value = str(sample.get("dropgate_gate"))
            if not seen or seen[-1] != value:
                seen.append(value)
        return seen

    def progress_in(self, step: str) -> list[float]:
        return [float(s["progress"]) for s in self.samples if s.get("dropgate_step") == step and "progress" in s]

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


@pytest.fixture
def sampler(site: Site) -> Iterator[Sampler]:
    with Sampler(site) as running:
        yield running


def wait_gate(site: Site, wanted: str) -> None:
    wait_for(lambda: gate(site) == wanted, timeout=60, what=f"dropgate_gate to read {wanted} (reads {gate(site)})")


def test_the_gate_goes_back_to_idle_after_a_successful_run(site: Site) -> None:
    # Given a daemon that asks for approval (so the busy gate lasts long enough to be seen)
    site.write_config(policy={"require_approval": True})
    site.start_daemon()
    wait_gate(site, "idle")
    with Sampler(site) as sampler:
        # When an update arrives, waits for approval, is approved and succeeds
        site.drop(site.pack("1.0.1"))
        site.wait_step(1, "approval")
        wait_gate(site, "busy")
        assert site.metric("dropgate_blocked") == 0.0
        approved = site.cli("approve", "1")
        assert approved.returncode == 0, approved.stderr
        assert site.wait_outcome(1)["outcome"] == "succeeded"
        # Then the gate reads idle again (it stayed busy after every success)
        wait_gate(site, "idle")
        sampler.more(5)  # a few more scrapes: it must stay idle
    assert sampler.gates() == ["idle", "busy", "idle"]
    assert site.metric("dropgate_blocked") == 0.0
    assert site.metric("dropgate_runs_total", 'outcome="succeeded"') == 1.0
    assert site.status()["gate"] == "idle"


@pytest.mark.parametrize("archive", ["not an archive", "same version as installed"])
def test_the_gate_goes_back_to_idle_after_a_rejection(site: Site, sampler: Sampler, archive: str) -> None:
    # Given a running daemon
    site.start_daemon()
    # When an archive is rejected (in validate: not an archive; or a version not newer than the installed one)
    if archive == "not an archive":
        site.drop(b"garbage " * 100, name="gts.1.0.1.tgz")
    else:
        site.drop(site.pack("1.0.0"))
    assert site.wait_outcome(1)["outcome"] == "rejected"
    # Then the gate reads idle, not busy, and nothing says blocked
    wait_gate(site, "idle")
    assert site.metric("dropgate_blocked") == 0.0
    assert site.metric("dropgate_runs_total", 'outcome="rejected"') == 1.0
    # and a second, good archive runs through and leaves it idle too
    site.drop(site.pack("1.0.1"))
    assert site.wait_outcome(2)["outcome"] == "succeeded"
    wait_gate(site, "idle")
    assert "blocked" not in sampler.gates()


def test_the_gate_blocks_on_failure_stays_blocked_with_a_queued_run_and_across_a_restart_and_opens_on_resolve(
    site: Site, sampler: Sampler
) -> None:
    # Given a daemon whose backup dump fails
    site.write_config(backup={"dumps": [{"name": "db", "command": ["false"]}]})
    daemon = site.start_daemon()
    # When an update fails in backup
    site.drop(site.pack("1.0.1"))
    assert site.wait_outcome(1)["outcome"] == "failed"
    # Then the gate reads blocked
    wait_gate(site, "blocked")
    assert site.metric("dropgate_blocked") == 1.0
    # When another archive arrives while the gate is blocked
    site.drop(site.pack("1.0.2"))
    wait_for(lambda: site.status()["queued"], what="the second archive to be queued")
    # Then it waits, queued (counted in the backlog), and the gate still reads blocked (not busy)
    assert site.status()["queued"][0]["id"] == 2
    wait_for(lambda: site.metric("dropgate_inbox_files") == 1.0, what="the backlog metric to count it")
    assert gate(site) == "blocked"
    # When the daemon restarts (the dump repaired meanwhile)
    daemon.stop()
    site.write_config(backup={"dumps": []})
    site.start_daemon()
    # Then the gate still reads blocked
    wait_gate(site, "blocked")
    assert site.metric("dropgate_blocked") == 1.0
    assert site.run(2)["step"] == "queued"  # type: ignore[index]
    # When the operator resolves run 1
    resolved = site.cli("resolve", "1", "--note", "dump command repaired")
    assert resolved.returncode == 0, resolved.stderr
    # Then the queued run goes through and the gate ends idle
    assert site.wait_outcome(2)["outcome"] == "succeeded"
    wait_gate(site, "idle")
    assert site.metric("dropgate_blocked") == 0.0
    wait_for(lambda: sampler.gates()[-1] == "idle", timeout=10, what="the sampler to scrape the idle gate too")
    gates = sampler.gates()
    assert gates[gates.index("blocked") :][-1] == "idle"
    assert "busy" not in gates[gates.index("blocked") : -2], gates  # nothing ran while blocked


MIGRATION = """#!/bin/sh
# reports its own progress, slowly enough for a scrape to see each value
for ratio in 0.25 0.5 0.75 1.0; do
    printf '{"progress": %s, "message": "migrating"}\\n' "$ratio" >/dev/fd/"$DROPGATE_PROGRESS_FD"
    sleep 0.4
done
"""

HOOK = """#!/bin/sh
printf '{"progress": 1.0, "message": "prepared"}\\n' >/dev/fd/"$DROPGATE_PROGRESS_FD"
sleep 0.4
"""


def test_progress_in_apply_never_goes_back_and_a_migration_fills_only_its_share(site: Site, sampler: Sampler) -> None:
    # Given an update with a pre-apply hook and a migration that report their own progress
    # (apply has three units here: the hook, the migration, the switch of `current`)
    site.start_daemon()
    archive = site.pack(
        "1.0.1",
        files={"hooks/pre.sh": HOOK, "migrations/001.sh": MIGRATION},
        hooks={"pre_apply": "hooks/pre.sh"},
        migrations=["migrations/001.sh"],
    )
    # When it is applied
    site.drop(archive)
    assert site.wait_outcome(1)["outcome"] == "succeeded"
    sampler.more(3)
    # Then the progress seen during apply only ever rose
    seen = sampler.progress_in("apply")
    assert seen, sampler.samples[-5:]
    assert seen == sorted(seen), seen
    # and the migration's own 25 %..100 % showed as its third of the step, after the hook's third
    assert any(1 / 3 < ratio < 2 / 3 for ratio in seen), seen
    assert max(seen) <= 1.0
    # and no step's progress ever went back while that step ran
    previous: tuple[object, float] | None = None
    for sample in sampler.samples:
        if "progress" not in sample:
            continue
        current = (sample.get("dropgate_step"), float(sample["progress"]))
        if previous is not None and previous[0] == current[0] and current[0] != "none":
            assert current[1] >= previous[1], (previous, current)
        previous = current
