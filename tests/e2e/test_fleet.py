"""A rollout across a fleet: the real ansible-playbook running deploy/ansible/rollout.yml against real sites.

Every site is a real dropgate daemon with its own configuration, inbox,
journal and sample application (tests/fleet.py); most are reached with
Ansible's local connection, one over a real sshd on loopback, as production
would. A real Prometheus scrapes every site through file-based discovery with
the shipped per-site alerts and fleet recording rules.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.conftest import ROOT, free_port, require_tool, wait_for
from tests.fleet import Fleet, Rollout
from tests.servers import PrometheusServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

PROMETHEUS = ROOT / "deploy" / "prometheus"
WAVES: list[int | str] = [1, 2, "100%"]


def app_version(fleet: Fleet, name: str) -> str | None:
    """The version the site's application reports on /health (what its users get)."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{fleet[name].app_port}/health", timeout=5, trust_env=False)
    except httpx.HTTPError:
        return None
    return str(answer.json()["version"])


def runs_of(fleet: Fleet, name: str, archive: Path) -> list[dict[str, Any]]:
    """The site's runs of these bytes, oldest first (a drop, and any retries of it)."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    return [run for run in reversed(fleet[name].runs()) if run["sha256"] == digest]


def drops_of(fleet: Fleet, name: str, archive: Path) -> int:
    """How many times the archive reached the site's inbox (retries are not drops)."""
    return sum(1 for run in runs_of(fleet, name, archive) if run["retry_of"] is None)


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Any]:
    fleets: list[Fleet] = []

    def make(count: int, **options: Any) -> Fleet:
        fleet = Fleet(tmp_path / f"fleet-{len(fleets)}", count, **options)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


# -- every site succeeds -------------------------------------------------------------------------


def test_a_rollout_in_three_waves_brings_every_site_to_the_new_version_and_a_rerun_sends_nothing_again(
    fleet_factory: Any,
) -> None:
    # Given six sites on 1.0.0 (site-06 reached over ssh), and the vendor's signed 1.1.0
    fleet: Fleet = fleet_factory(6, over_ssh=[6])
    archive = fleet.archive("1.1.0")
    names = [site.name for site in fleet.sites]
    # (each site's `status --json` says where its inbox is: the rollout drops there)
    assert fleet["site-01"].site.status()["inbox"] == str(fleet["site-01"].site.inbox)

    # When the operator first asks what the rollout would do (--check)
    dry = fleet.rollout(archive, waves=WAVES, check=True)
    # Then every site says it would get the archive, and nothing reached any inbox
    assert dry.returncode == 0, dry.output[-4000:]
    assert dry.outcomes() == dict.fromkeys(names, "planned")
    assert dry.site("site-04")["note"] == "would drop: 1.0.0 → 1.1.0"
    assert all(site.runs() == [] for site in fleet.sites)

    # When the stop file exists, Then the rollout stops before the first wave: nothing is touched
    stop = Path(f"{archive}.stop")
    stop.touch()
    stopped = fleet.rollout(archive, waves=WAVES)
    stop.unlink()
    assert stopped.returncode == 0, stopped.output[-4000:]
    assert stopped.outcomes() == dict.fromkeys(names, "not reached")
    assert stopped.summary["result"].startswith(f"stopped: {stop} exists")
    assert all(site.runs() == [] for site in fleet.sites)

    # When the rollout runs
    rollout = fleet.rollout(archive, waves=WAVES)

    # Then it succeeds, wave by wave: one canary, then two sites, then the rest
    assert rollout.returncode == 0, rollout.output[-6000:]
    assert rollout.summary["result"] == "done"
    assert rollout.summary["archive"]["name"] == "gts.1.1.0.tgz"
    assert {line["site"]: line["wave"] for line in rollout.summary["sites"]} == {
        "site-01": 1, "site-02": 2, "site-03": 2, "site-04": 3, "site-05": 3, "site-06": 3}
    for name in names:
        line = rollout.site(name)
        run = fleet[name].site.show(1)
        # each site ran the archive once, and is on 1.1.0: in its journal and in what its users get
        assert (line["outcome"], line["before"], line["after"], line["run"]) == ("succeeded", "1.0.0", "1.1.0", 1)
        assert run["outcome"] == "succeeded"
        assert fleet[name].installed() == "1.1.0"
        assert app_version(fleet, name) == "1.1.0"
        # a minor update needs downtime: the summary shows the site's own measure of it
        assert run["facts"]["downtime"] is True
        assert line["downtime_seconds"] == pytest.approx(run["facts"]["downtime_seconds"], abs=0.001)
        assert line["downtime_seconds"] > 0
        assert line["run_seconds"] == pytest.approx(run["finished"] - run["started"], abs=0.001)
        # and nothing of the copy is left in the inbox
        assert list(fleet[name].site.inbox.iterdir()) == []
    # the table an operator reads at the end
    assert "DROPGATE ROLLOUT gts.1.1.0.tgz" in rollout.output
    assert re.search(r"^3\s+site-06\s+succeeded\s+1\.0\.0\s+1\.1\.0\s+\d+\.\ds\s+1\s*$", rollout.output, re.M)
    assert "result: done (6 succeeded)" in rollout.output
    # site-06 was really reached over ssh
    assert fleet.ssh is not None
    assert "Accepted publickey for root" in fleet.ssh.log_path.read_text(errors="replace")

    # When the same rollout runs again
    again = fleet.rollout(archive, waves=WAVES)
    # Then every site is skipped as already having it, and none got the archive a second time
    assert again.returncode == 0, again.output[-4000:]
    for name in names:
        assert again.site(name)["outcome"] == "skipped"
        assert again.site(name)["note"] == "already installed by run 1"
        assert len(fleet[name].runs()) == 1


# -- a site fails in the second wave ------------------------------------------------------------


class FleetPrometheus(PrometheusServer):
    """A real Prometheus configured as prometheus.fleet.example.yml says, on loopback, with short intervals."""

    def __init__(self, folder: Path, fleet: Fleet) -> None:
        binary = require_tool("prometheus")
        folder.mkdir()
        # The shipped alert rules with `for:` cut to 2s (the promtool tests check the durations);
        # the fleet rules as shipped.
        alerts = yaml.safe_load((PROMETHEUS / "dropgate.rules.yml").read_text())
        for group in alerts["groups"]:
            for rule in group["rules"]:
                rule["for"] = "2s"
        (folder / "dropgate.rules.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
        config = yaml.safe_load((PROMETHEUS / "prometheus.fleet.example.yml").read_text())
        config["rule_files"] = [str(folder / "dropgate.rules.yml"), str(PROMETHEUS / "dropgate.fleet.rules.yml")]
        config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
        job = config["scrape_configs"][0]
        assert job["job_name"] == "dropgate"
        job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
        sites = folder / "dropgate-sites"
        sites.mkdir()
        job["file_sd_configs"][0]["files"] = [str(sites / "*.yml")]
        job["file_sd_configs"][0]["refresh_interval"] = "1s"
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        # The targets file, in the shape of dropgate-sites.example.yml
        example = yaml.safe_load((PROMETHEUS / "dropgate-sites.example.yml").read_text())
        assert set(example[0]) == {"targets", "labels"} and "site" in example[0]["labels"]
        targets = [{"targets": [f"127.0.0.1:{site.port}"], "labels": {"site": site.name}} for site in fleet.sites]
        (sites / "test-fleet.yml").write_text(yaml.safe_dump(targets))
        super().__init__(binary, folder, free_port())
        wait_for(lambda: self.get("/-/ready") is not None, timeout=60, what="prometheus to be ready")

    def values(self, expr: str, label: str) -> dict[str, float]:
        """An instant query's samples by the value of one label."""
        data = self.get("/api/v1/query", query=expr) or {"result": []}
        return {sample["metric"].get(label, ""): float(sample["value"][1]) for sample in data["result"]}

    def settled(self, expr: str, label: str, expected: dict[str, float]) -> bool:
        """Whether the query reads `expected`, from rules evaluated after every site was scraped again."""
        return self.values(expr, label) == expected

    def firing(self) -> dict[str, set[str]]:
        data = self.get("/api/v1/alerts") or {"alerts": []}
        fired: dict[str, set[str]] = {}
        for alert in data["alerts"]:
            if alert["state"] == "firing":
                fired.setdefault(alert["labels"]["alertname"], set()).add(alert["labels"].get("site", ""))
        return fired


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    servers: list[FleetPrometheus] = []

    def start(fleet: Fleet) -> FleetPrometheus:
        server = FleetPrometheus(tmp_path / f"prometheus-{len(servers)}", fleet)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_a_site_failing_verify_in_the_second_wave_is_rolled_back_and_stops_the_rollout_before_the_third(
    fleet_factory: Any, prometheus_for: Any
) -> None:
    # Given seven sites on 1.0.0 (site-02 over ssh), watched by one Prometheus; release 1.1.0 needs
    # a licence file that site-03 lacks, so its check of the new release will fail in verify
    fleet: Fleet = fleet_factory(7, over_ssh=[2])
    fleet["site-03"].licence.unlink()
    prometheus: FleetPrometheus = prometheus_for(fleet)
    all_old = {"1.0.0": 7.0}
    wait_for(lambda: prometheus.settled("version:dropgate_sites:count", "version", all_old), timeout=90,
             what="prometheus to count seven sites on 1.0.0")
    archive = fleet.archive("1.1.0")

    # When the rollout runs in three waves: [site-01], [site-02, site-03], [site-04 … site-07]
    rollout = fleet.rollout(archive, waves=WAVES)

    # Then site-03's run failed verify and was rolled back: its platform is on 1.0.0 again, its gate blocked
    assert rollout.returncode == 2, rollout.output[-6000:]
    failed = rollout.site("site-03")
    assert (failed["outcome"], failed["wave"], failed["run"], failed["before"], failed["after"]) == (
        "rolled_back", 2, 1, "1.0.0", "1.0.0")
    assert failed["note"].startswith("verify: ")
    assert str(fleet["site-03"].licence) in failed["note"]
    assert "`dropgate show 1 --log` on the site" in failed["note"]
    assert fleet["site-03"].site.show(1)["outcome"] == "rolled_back"
    assert fleet["site-03"].installed() == "1.0.0"
    assert app_version(fleet, "site-03") == "1.0.0"
    assert fleet["site-03"].site.status()["gate"] == "blocked"
    # the sites of the first two waves that were fine are on 1.1.0
    for name in ("site-01", "site-02"):
        assert rollout.site(name)["outcome"] == "succeeded"
        assert fleet[name].installed() == "1.1.0"
    # and the rollout stopped: the third wave's sites are untouched, still on 1.0.0, their inboxes empty
    for name in ("site-04", "site-05", "site-06", "site-07"):
        assert rollout.site(name)["outcome"] == "not reached"
        assert fleet[name].runs() == []
        assert list(fleet[name].site.inbox.iterdir()) == []
        assert fleet[name].installed() == "1.0.0"
        assert app_version(fleet, name) == "1.0.0"
    assert rollout.summary["result"] == "stopped: site-03 rolled_back"
    assert "result: stopped: site-03 rolled_back" in rollout.output

    # And Prometheus, scraping every site, counts the fleet from the recording rules
    wait_for(lambda: prometheus.settled("version:dropgate_sites:count", "version", {"1.1.0": 2.0, "1.0.0": 5.0}),
             timeout=90, what="the fleet rules to count 2 sites on 1.1.0 and 5 on 1.0.0")
    wait_for(lambda: prometheus.settled("job:dropgate_sites_blocked:count", "job", {"dropgate": 1.0}),
             timeout=60, what="the fleet rules to count one blocked site")
    assert prometheus.values("job:dropgate_sites:count", "job") == {"dropgate": 7.0}
    assert prometheus.values("job:dropgate_sites_stuck:count", "job") == {"dropgate": 0.0}
    # behind them, the per-site alert fires for the one site, named by its label
    wait_for(lambda: prometheus.firing().get("DropgateGateBlocked") == {"site-03"}, timeout=60,
             what="DropgateGateBlocked to fire for site-03")

    # When the operator installs the licence on site-03, resolves, and reruns the rollout
    fleet["site-03"].licence.write_text("licensed to the site\n")
    resolved = fleet["site-03"].site.cli("resolve", "1", "--note", "licence installed")
    assert resolved.returncode == 0, resolved.stderr
    rerun = fleet.rollout(archive, waves=WAVES)

    # Then the rollout continues: the first waves are skipped, site-03 is not sent the archive again
    # (only the operator's retry runs it again), and the third wave is updated
    assert rerun.returncode == 0, rerun.output[-6000:]
    assert rerun.site("site-01")["note"] == "already installed by run 1"
    assert rerun.site("site-02")["note"] == "already installed by run 1"
    assert rerun.site("site-03")["outcome"] == "skipped"
    assert "run 1 of this archive ended rolled_back" in rerun.site("site-03")["note"]
    assert "dropgate_retry=true" in rerun.site("site-03")["note"]
    for name in ("site-04", "site-05", "site-06", "site-07"):
        assert (rerun.site(name)["outcome"], rerun.site(name)["after"]) == ("succeeded", "1.1.0")
    for site in fleet.sites:
        assert drops_of(fleet, site.name, archive) == 1

    # When the operator asks for site-03 to run it again
    retried = fleet.rollout(archive, waves=WAVES, limit="site-03", extra={"dropgate_retry": True})
    # Then its run 1 is retried as run 2 — still one drop — and succeeds
    assert retried.returncode == 0, retried.output[-6000:]
    assert (retried.site("site-03")["outcome"], retried.site("site-03")["run"]) == ("succeeded", 2)
    assert [(run["id"], run["outcome"], run["retry_of"]) for run in runs_of(fleet, "site-03", archive)] == [
        (1, "rolled_back", None), (2, "succeeded", 1)]
    assert drops_of(fleet, "site-03", archive) == 1
    assert app_version(fleet, "site-03") == "1.1.0"
    # and the whole fleet reads as one version, with nothing blocked
    wait_for(lambda: prometheus.settled("version:dropgate_sites:count", "version", {"1.1.0": 7.0}),
             timeout=90, what="the fleet rules to count all seven sites on 1.1.0")
    wait_for(lambda: prometheus.settled("job:dropgate_sites_blocked:count", "job", {"dropgate": 0.0}),
             timeout=60, what="the fleet rules to count no blocked site")


# -- sites with their own gates ------------------------------------------------------------------------


def closed_window() -> str:
    """A one-hour window three days from now: closed whatever the hour (SPEC 5.8 `Mon-Tue 07:00-12:00`)."""
    days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    return f"{days[(datetime.now().weekday() + 3) % 7]} 03:00-04:00"


def test_sites_waiting_for_their_approval_or_window_are_reported_waiting_and_a_rerun_follows_them(
    fleet_factory: Any,
) -> None:
    # Given four sites: the canary requires its operator's approval, site-02 updates only in a window now closed
    fleet: Fleet = fleet_factory(4, configs={1: {"policy": {"require_approval": True}},
                                             2: {"policy": {"windows": [closed_window()]}}})
    archive = fleet.archive("1.1.0")

    # When the rollout runs: the canary, then the rest
    first: Rollout = fleet.rollout(archive, waves=[1, "100%"])
    # Then the canary is reported waiting, not failed, and the rollout stops there, the rest untouched
    assert first.returncode == 0, first.output[-6000:]
    canary = first.site("site-01")
    assert (canary["outcome"], canary["run"]) == ("waiting", 1)
    assert "`dropgate approve 1` on the site" in canary["note"]
    assert fleet["site-01"].site.status()["run"]["step"] == "approval"
    assert first.summary["result"].startswith("stopped: sites of this wave wait for their approval or window")
    for name in ("site-02", "site-03", "site-04"):
        assert first.site(name)["outcome"] == "not reached"
        assert fleet[name].runs() == []

    # When the canary's operator approves, and the rollout is run again
    approved = fleet["site-01"].site.cli("approve", "1")
    assert approved.returncode == 0, approved.stderr
    second = fleet.rollout(archive, waves=[1, "100%"])
    # Then the canary's run is followed to its end (not dropped again), and the next wave goes:
    # site-02 waits for its window, the others are updated
    assert second.returncode == 0, second.output[-6000:]
    canary = second.site("site-01")
    assert canary["run"] == 1
    # (the approved run may have ended before the rerun looked: then it is found installed by run 1)
    assert (canary["action"], canary["outcome"]) == ("wait", "succeeded") or \
        (canary["outcome"], canary["note"]) == ("skipped", "already installed by run 1"), canary
    assert fleet["site-01"].installed() == "1.1.0"
    assert second.site("site-02")["outcome"] == "waiting"
    assert "maintenance window" in second.site("site-02")["note"]
    assert fleet["site-02"].site.status()["run"]["step"] == "window"
    for name in ("site-03", "site-04"):
        assert second.site(name)["outcome"] == "succeeded"
    assert drops_of(fleet, "site-01", archive) == 1

    # When the rollout is run once more while site-02's window is still closed
    third = fleet.rollout(archive, waves=[1, "100%"])
    # Then site-02 is still waiting on its same run, and no site got the archive twice
    assert third.returncode == 0, third.output[-6000:]
    assert (third.site("site-02")["outcome"], third.site("site-02")["run"]) == ("waiting", 1)
    for site in fleet.sites:
        assert drops_of(fleet, site.name, archive) == 1


def dropgate_following(config: Path, run_id: int) -> bool:
    """Whether a `dropgate --config CONFIG show RUN --json` runs now: the rollout is following that run."""
    wanted = ["--config", str(config), "show", str(run_id), "--json"]
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(cmdline[i : i + len(wanted)] == wanted for i in range(len(cmdline))):
            return True
    return False


def test_a_site_whose_run_outlasts_its_time_limit_fails_the_rollout_and_a_rerun_follows_the_same_run(
    fleet_factory: Any,
) -> None:
    # Given two sites and an update whose migration goes on until the test lets it (a long migration)
    long_apply = {"policy": {"timeouts": {"apply": "15m"}}}
    fleet: Fleet = fleet_factory(2, configs={1: long_apply, 2: long_apply})
    hold = 'while [ ! -e "$DROPGATE_RELEASE_DIR/../../go-ahead" ]; do sleep 0.2; done\n'
    archive = fleet.archive("1.1.0", files={"migrations/001.sh": "#!/bin/sh\n" + hold},
                            migrations=["migrations/001.sh"])
    go_ahead = fleet["site-01"].site.platform / "go-ahead"

    # When the rollout gives each site 5 seconds
    slow = fleet.rollout(archive, waves=[1, "100%"], extra={"dropgate_site_timeout": 5})
    # Then the canary is reported timed out, naming its run and step, and the rollout stops before the rest
    assert slow.returncode == 2, slow.output[-6000:]
    line = slow.site("site-01")
    assert (line["outcome"], line["run"]) == ("timeout", 1)
    assert "run 1 is still in apply after the time limit of 5s" in line["note"]
    assert slow.site("site-02")["outcome"] == "not reached"
    assert fleet["site-02"].runs() == []
    # and the run itself goes on: dropgate never leaves an update half-way because a watcher left
    assert fleet["site-01"].site.status()["run"]["step"] == "apply"

    # When the rollout is run again with time enough, and the migration ends while it watches
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        again = pool.submit(fleet.rollout, archive, waves=[1, "100%"])
        wait_for(lambda: dropgate_following(fleet["site-01"].site.config_path, 1) or again.done(), timeout=300,
                 what="the rerun to follow run 1", interval=0.02)
        go_ahead.touch()
        (fleet["site-02"].site.platform / "go-ahead").touch()
        rerun = again.result(timeout=900)
    # Then it followed the same run to its end — the archive was not dropped again — and went on
    assert rerun.returncode == 0, rerun.output[-6000:]
    line = rerun.site("site-01")
    assert (line["action"], line["outcome"], line["run"], line["after"]) == ("wait", "succeeded", 1, "1.1.0")
    assert rerun.site("site-02")["outcome"] == "succeeded"
    assert drops_of(fleet, "site-01", archive) == 1
    assert len(fleet["site-01"].runs()) == 1


def test_a_site_that_cannot_be_reached_stops_the_rollout_before_the_next_wave(fleet_factory: Any) -> None:
    # Given four sites, the second reached over ssh, whose sshd is down
    fleet: Fleet = fleet_factory(4, over_ssh=[2])
    assert fleet.ssh is not None
    fleet.ssh.stop()
    archive = fleet.archive("1.1.0")
    # When the rollout runs in waves [site-01], [site-02, site-03], [site-04]
    rollout = fleet.rollout(archive, waves=WAVES)
    # Then site-02 is reported unreachable beside site-03, updated, and the rollout stops before site-04
    assert rollout.returncode != 0, rollout.output[-6000:]
    assert rollout.outcomes() == {"site-01": "succeeded", "site-02": "unreachable", "site-03": "succeeded",
                                  "site-04": "not reached"}
    assert rollout.summary["result"] == "stopped: site-02 unreachable"
    assert fleet["site-02"].runs() == [] and fleet["site-04"].runs() == []
    assert fleet["site-04"].installed() == "1.0.0"
