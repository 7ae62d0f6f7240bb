"""What an operator installs beside the daemon (deploy/), checked with the real tools.

- The alert rules pass `promtool check rules` and their unit tests (`promtool test rules`).
- A real Prometheus on loopback scrapes a real daemon with the shipped rules
  and raises the blocked-gate alert when an update fails, drops it when the
  operator resolves, and raises the agent-down alert when the daemon stops.
- The systemd unit passes `systemd-analyze verify` and its sandbox rates "OK".
- The tmpfiles entries create the folders with the owners and modes sshd's
  chroot and the two groups need.
- The sshd drop-in is valid and applies SFTP-only, chrooted, to the upload group.
- The Grafana dashboard uses only metric names the daemon exports.
- install.sh --dry-run prints its plan and changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, Site, free_port, require_tool, wait_for

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "dropgate.rules.yml"
RULE_TESTS = [DEPLOY / "prometheus" / "dropgate.rules.test.yml", DEPLOY / "prometheus" / "dropgate.rules.days.test.yml"]
ALERTS = {
    "DropgateDown",
    "DropgateHeartbeatStale",
    "DropgateStepPastDeadline",
    "DropgateGateBlocked",
    "DropgateMaintenanceTooLong",
    "DropgateInboxBacklog",
    "DropgateNoRecentSuccess",
}


def sshd_binary() -> str:
    """sshd lives in /usr/sbin, which is not on every user's PATH."""
    if os.path.exists("/usr/sbin/sshd") and not any(
        os.path.exists(os.path.join(folder, "sshd")) for folder in os.environ.get("PATH", "").split(os.pathsep)
    ):
        return "/usr/sbin/sshd"
    return require_tool("sshd")


# -- alert rules, offline --------------------------------------------------------------


def test_the_alert_rules_pass_promtool_check() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_every_alert_has_a_for_a_severity_and_tells_the_operator_what_to_run() -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule.get("for"), f"{rule['alert']} has no for:"
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert re.search(r"`(dropgate|systemctl) [a-z]", rule["annotations"]["description"]), (
            f"{rule['alert']} does not name a command to run"
        )


def test_the_alert_rules_unit_tests_pass_and_cover_every_alert() -> None:
    promtool = require_tool("promtool")
    # Given the unit tests of the rules
    covered = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            firing = [t for t in case["alert_rule_test"] if t["exp_alerts"]]
            quiet = [t for t in case["alert_rule_test"] if not t["exp_alerts"]]
            # each alert is shown both firing and not firing
            assert firing and quiet, case["name"]
            covered.update(t["alertname"] for t in case["alert_rule_test"])
    assert covered == ALERTS
    # When promtool runs them, Then they pass
    result = subprocess.run(
        [promtool, "test", "rules", *(path.name for path in RULE_TESTS)],
        capture_output=True, text=True, timeout=120, cwd=RULES.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_the_example_scrape_config_is_valid(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    # Given the example with its rule file pointing at the shipped rules
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.example.yml").read_text())
    config["rule_files"] = [str(RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    # Then promtool accepts it, and it scrapes the job the DropgateDown alert looks for
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [job["job_name"] for job in config["scrape_configs"]] == ["dropgate"]
    assert 'up{job="dropgate"}' in RULES.read_text()


# -- alert rules, live: a real Prometheus scraping a real daemon ---------------------------


class Prometheus:
    """A Prometheus server on loopback with its own data folder; stopped by the fixture."""

    def __init__(self, binary: str, folder: Path, target: str, rules: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            # Short intervals so that a state change shows within seconds.
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "dropgate", "static_configs": [{"targets": [target]}]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = folder / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log, stderr=subprocess.STDOUT, cwd=folder,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read()
        except OSError:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            return None
        return json.loads(body)["data"] if path.startswith("/api/") else body

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/query", query=expr)["result"])

    def alerts(self) -> dict[str, dict[str, Any]]:
        """The active alerts (pending or firing) by name."""
        data = self.get("/api/v1/alerts")
        return {alert["labels"]["alertname"]: alert for alert in (data or {"alerts": []})["alerts"]}

    def firing(self) -> set[str]:
        return {name for name, alert in self.alerts().items() if alert["state"] == "firing"}

    def now(self) -> float:
        """Prometheus' own clock."""
        return float(self.get("/api/v1/query", query="time()")["result"][1])

    def evaluated_since(self, moment: float) -> bool:
        """Whether every rule group has been evaluated after `moment` (RFC 3339 in the API)."""
        groups = self.get("/api/v1/rules")["groups"]
        return bool(groups) and all(rfc3339(group["lastEvaluation"]) > moment for group in groups)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def rfc3339(text: str) -> float:
    """Seconds since the epoch of Prometheus' timestamps (nanoseconds, a Z or an offset)."""
    match = re.fullmatch(r"(.{19})(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    assert match, text
    whole, fraction, zone = match.groups()
    moment = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone)).timestamp()
    return moment + float(f"0.{fraction or 0}")


def rules_with_short_for(folder: Path) -> Path:
    """The shipped rules with every `for:` cut to 2s, and nothing else changed.

    The shipped durations (1 minute to 1 hour) are what the promtool unit tests
    check on their synthetic clock; what only a live server can check is that
    the expressions match what a real daemon exports, so this copy shortens
    the waits and keeps every expression, label and annotation as shipped.
    """
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "2s"
    path = folder / "dropgate.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@pytest.fixture
def prometheus(site: Site, tmp_path: Path) -> Iterator[Prometheus]:
    binary = require_tool("prometheus")
    folder = tmp_path / "prometheus"
    folder.mkdir()
    server = Prometheus(binary, folder, f"127.0.0.1:{site.port}", rules_with_short_for(folder))
    try:
        wait_for(lambda: server.get("/-/ready") is not None, timeout=60, what="prometheus to be ready")
        yield server
    finally:
        server.stop()


def test_prometheus_raises_the_blocked_gate_alert_when_an_update_fails_and_drops_it_on_resolve(
    site: Site, prometheus: Prometheus
) -> None:
    # Given a running daemon whose backup dump command fails, scraped by Prometheus with the shipped rules
    site.write_config(backup={"dumps": [{"name": "db", "command": ["false"]}]})
    daemon = site.start_daemon()
    wait_for(
        lambda: list(prometheus.query('up{job="dropgate"} == 1 and on() dropgate_heartbeat_timestamp_seconds')),
        timeout=60, what="prometheus to scrape the daemon",
    )
    healthy_since = prometheus.now()
    wait_for(lambda: prometheus.evaluated_since(healthy_since + 3), timeout=60, what="the rules to be evaluated")
    # Then a healthy idle site raises nothing (a site that never updated is not "no success in 60 days")
    assert prometheus.alerts() == {}

    # When an update fails in backup
    site.drop(site.pack("1.0.1"))
    run = site.wait_outcome(1)
    assert run["outcome"] == "failed", run
    assert site.status()["gate"] == "blocked"
    # Then the blocked-gate alert fires, alone, with its severity and the command to unblock
    wait_for(lambda: "DropgateGateBlocked" in prometheus.firing(), timeout=60, what="DropgateGateBlocked to fire")
    alert = prometheus.alerts()["DropgateGateBlocked"]
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["instance"] == f"127.0.0.1:{site.port}"
    assert "dropgate resolve ID" in alert["annotations"]["description"]
    assert prometheus.firing() == {"DropgateGateBlocked"}

    # When the operator resolves the run
    resolved = site.cli("resolve", "1", "--note", "dump command repaired")
    assert resolved.returncode == 0, resolved.stdout + resolved.stderr
    # Then the alert ends
    wait_for(lambda: not prometheus.alerts(), timeout=60, what="the alert to end after resolve")

    # When the daemon stops, Then the agent-down alert fires (and nothing else: its series went stale)
    daemon.stop()
    wait_for(lambda: "DropgateDown" in prometheus.firing(), timeout=60, what="DropgateDown to fire")
    assert prometheus.alerts()["DropgateDown"]["labels"]["severity"] == "critical"
    assert set(prometheus.alerts()) == {"DropgateDown"}
