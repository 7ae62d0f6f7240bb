"""What an operator installs beside the daemon (deploy/), checked with the real tools.

- The alert rules pass `promtool check rules` and their unit tests (`promtool test rules`).
- A real Prometheus on loopback scrapes a real daemon with the shipped rules
  and raises the blocked-gate alert when an update fails, drops it when the
  operator resolves, and raises the agent-down alert when the daemon stops.
- The systemd unit passes `systemd-analyze verify` and its sandbox rates "OK".
- The tmpfiles entries create the folders with the owners and modes sshd's
  chroot and the two groups need.
- The sshd drop-in is valid and applies SFTP-only, chrooted, to the upload group.
- The Grafana dashboard uses only metric names the daemon exports, in valid PromQL.
- A real nginx with the shipped snippet answers 503 with Retry-After while the
  maintenance flag exists, and serves the daemon's status page under /dropgate/.
- install.sh --dry-run prints its plan and changes nothing; run for real,
  twice, in a throwaway mount namespace, it installs everything, then finds it in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, Site, cannot_run, free_port, require_tool, wait_for
from tests.deploy_files import OVERLAY_SYSTEM, assert_installed_layout, dashboard_queries, exported_names
from tests.servers import PlatformBackend, PrometheusServer, maintenance_nginx, sbin_tool

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
    "DropgateFeedChecksFailing",
}


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


class Prometheus(PrometheusServer):
    """A Prometheus server on loopback with its own data folder; stopped by the fixture."""

    def __init__(self, binary: str, folder: Path, target: str, rules: Path) -> None:
        config = {
            # Short intervals so that a state change shows within seconds.
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "dropgate", "static_configs": [{"targets": [target]}]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        super().__init__(binary, folder, free_port())

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
    healthy_since = prometheus.now()  # every evaluation after this sees the daemon's samples
    wait_for(lambda: prometheus.evaluated_since(healthy_since + 1), timeout=60, what="the rules to be evaluated")
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


# -- systemd ---------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "dropgate.service"
TMPFILES = DEPLOY / "systemd" / "dropgate-tmpfiles.conf"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_is_a_notify_service_that_stops_at_a_safe_point_and_never_loops_on_bad_config() -> None:
    settings = unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == ["/usr/bin/dropgate run"]
    assert settings["Environment"] == ["DROPGATE_CONFIG=/etc/dropgate/dropgate.yaml"]
    assert settings["Restart"] == ["on-failure"]
    # dropgate's exit statuses for a configuration error and a lost or damaged journal
    assert settings["RestartPreventExitStatus"] == ["2 5"]
    assert settings["KillMode"] == ["mixed"]
    assert settings["WatchdogSec"]
    assert settings["ProtectSystem"] == ["strict"]
    writable = " ".join(settings["ReadWritePaths"]).split()
    # every folder the tmpfiles entries create is writable by the daemon
    for line in TMPFILES.read_text().splitlines():
        if line.startswith("d "):
            path = line.split()[1]
            assert any(path == w or path.startswith(w + "/") for w in writable), path


def test_the_unit_passes_systemd_analyze_verify_and_its_sandbox_rates_ok(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    # Given the unit with ExecStart pointing at this checkout's dropgate (the only line changed)
    command = Path(sys.executable).parent / "dropgate"
    assert command.exists(), command
    unit = tmp_path / "dropgate.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/dropgate run", f"ExecStart={command} run"))
    # Then systemd finds nothing to complain about
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "dropgate.service" not in verify.stderr, verify.stderr
    # and the sandbox's exposure is at most 4.0 ("OK" on systemd's 0-10 scale)
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=40", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    rating = re.search(r"Overall exposure level for dropgate.service: ([\d.]+) (\w+)", security.stdout)
    assert rating, security.stdout[-500:]
    assert float(rating.group(1)) <= 4.0
    assert rating.group(2) == "OK"


def test_the_tmpfiles_entries_create_the_folders_with_the_owners_and_modes_the_chroot_needs(tmp_path: Path) -> None:
    tmpfiles = require_tool("systemd-tmpfiles")
    # Given an empty root whose group database has the two groups
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\ndropgate-admin:x:990:\ndropgate-upload:x:991:\n")
    # When systemd-tmpfiles applies the entries there
    result = subprocess.run(
        [tmpfiles, f"--root={root}", "--create", str(TMPFILES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr

    # Then each folder has the owner and mode sshd's chroot and the two groups need
    def owner_mode(path: str) -> tuple[int, int, str]:
        info = (root / path.lstrip("/")).stat()
        return info.st_uid, info.st_gid, oct(info.st_mode & 0o7777)

    assert owner_mode("/var/lib/dropgate") == (0, 0, "0o755")  # the chroot: root's alone
    assert owner_mode("/var/lib/dropgate/inbox") == (0, 991, "0o3770")  # uploaders write, setgid, sticky
    assert owner_mode("/var/lib/dropgate/state") == (0, 990, "0o2750")  # admins read, uploaders stay out
    assert owner_mode("/var/backups/dropgate") == (0, 0, "0o700")
    assert owner_mode("/run/dropgate") == (0, 0, "0o755")  # nginx tests for the maintenance flag
    # and the inbox and state folder are where the example configuration puts them
    example = yaml.safe_load((ROOT / "config" / "dropgate.example.yaml").read_text())
    assert example["paths"]["inbox"] == "/var/lib/dropgate/inbox"
    assert example["paths"]["state"] == "/var/lib/dropgate/state"
    assert example["paths"]["backups"] == "/var/backups/dropgate"
    assert str(Path(example["maintenance"]["flag_file"]).parent) == "/run/dropgate"


# -- sshd --------------------------------------------------------------------------------------

DROP_IN = DEPLOY / "sshd" / "dropgate-inbox.conf"


def test_the_sshd_drop_in_gives_the_upload_group_sftp_only_in_a_chroot_and_leaves_others_alone(
    tmp_path: Path,
) -> None:
    sshd = sbin_tool("sshd")
    keygen = require_tool("ssh-keygen")
    # Given an sshd configuration made of a host key and the shipped drop-in
    key = tmp_path / "host_key"
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd -T wants its privilege separation folder

    def effective(user: str) -> dict[str, str]:
        """sshd's settings for a connection of `user`, the upload group standing for root's own group.

        `sshd -T -C` resolves a user's groups from the system, which has no
        dropgate-upload group here; root is in group root, so the test copy
        matches that group instead: the only line it changes.
        """
        drop_in = DROP_IN.read_text().replace("Match Group dropgate-upload\n", "Match Group root\n")
        config = tmp_path / "sshd_config"
        config.write_text(f"HostKey {key}\nPidFile none\nUsePAM no\n" + drop_in)
        result = subprocess.run(
            [sshd, "-T", "-f", str(config), "-C", f"user={user},host=client,addr=192.0.2.1"],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)

    # When sshd evaluates it for a member of the group
    member = effective("root")
    # Then the session is SFTP only, in the chroot, starting in the inbox, with nothing forwarded
    assert member["forcecommand"].startswith("internal-sftp -d /inbox -u 0027")
    assert member["chrootdirectory"] == "/var/lib/dropgate"
    assert member["permittty"] == "no"
    assert member["allowtcpforwarding"] == "no"
    assert member["x11forwarding"] == "no"
    assert member["passwordauthentication"] == "no"
    # and for anyone else nothing changes
    other = effective("nobody")
    assert other["forcecommand"] == "none"
    assert other["chrootdirectory"] == "none"


# -- Grafana -----------------------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "dropgate.json"
# SPEC section 6, as they appear in an exposition (counters end in _total, info metrics in _info)
CONTRACT = {
    "dropgate_gate", "dropgate_step", "dropgate_step_started_timestamp_seconds",
    "dropgate_step_deadline_timestamp_seconds", "dropgate_step_progress_ratio", "dropgate_step_duration_seconds",
    "dropgate_runs_total", "dropgate_last_success_timestamp_seconds", "dropgate_last_outcome_timestamp_seconds",
    "dropgate_blocked", "dropgate_maintenance_active", "dropgate_last_downtime_seconds", "dropgate_inbox_files",
    "dropgate_inbox_oldest_age_seconds", "dropgate_heartbeat_timestamp_seconds", "dropgate_platform_version_info",
    "dropgate_build_info", "dropgate_backup_bytes", "dropgate_backup_last_timestamp_seconds",
}


def test_the_dashboard_uses_only_metrics_the_daemon_exports_and_shows_every_contract_metric() -> None:
    exported = exported_names()
    used: set[str] = set()
    for title, expr in dashboard_queries(DASHBOARD):
        names = set(re.findall(r"\bdropgate_[a-z_]+", expr))
        unknown = names - exported
        assert not unknown, f"panel {title!r} queries metrics the daemon does not export: {unknown}"
        used |= names
    covered = {name for name in CONTRACT if any(u == name or u.startswith(name + "_") for u in used)}
    assert covered == CONTRACT, f"not on the dashboard: {CONTRACT - covered}"


def test_the_dashboard_has_the_panels_an_operator_looks_for_on_a_template_data_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in ("gate", "step", "progress", "step duration", "outcomes", "downtime", "inbox", "heartbeat",
                   "backup"):
        assert wanted in titles, f"no panel about {wanted}"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    # Given each query as a recording rule, with Grafana's variables filled in as Grafana would
    values = {"$instance": ".*", "$step": ".*", "$__range": "7d", "$__rate_interval": "1m", "$__interval": "30s"}
    rules = []
    for number, (_title, query) in enumerate(dashboard_queries(DASHBOARD)):
        expr = query
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").partition(",")[0].strip()
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    # Then promtool parses every one
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- install.sh --------------------------------------------------------------------------------

INSTALL = DEPLOY / "install.sh"
INSTALLED = [
    Path("/opt/dropgate"), Path("/usr/bin/dropgate"), Path("/etc/dropgate"), Path("/etc/tmpfiles.d/dropgate.conf"),
    Path("/etc/systemd/system/dropgate.service"), Path("/etc/ssh/sshd_config.d/dropgate-inbox.conf"),
    Path("/var/lib/dropgate"), Path("/var/backups/dropgate"), Path("/etc/group"), Path("/etc/pam.d/dropgate"),
]


def host_state() -> dict[str, tuple[int, int, int] | None]:
    def state(path: Path) -> tuple[int, int, int] | None:
        try:
            info = path.lstat()
        except FileNotFoundError:
            return None
        return info.st_mtime_ns, info.st_mode, info.st_size

    return {str(path): state(path) for path in INSTALLED}


def test_install_dry_run_prints_the_plan_and_changes_nothing(tmp_path: Path) -> None:
    require_tool("bash")
    assert subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, timeout=30).returncode == 0
    # Given a wheelhouse folder whose name would do harm if it ever reached a shell
    canary = tmp_path / "pwned"  # what `touch pwned` would create, run from tmp_path
    wheelhouse = tmp_path / "wheels $(touch pwned); `touch pwned` '\"x"
    wheelhouse.mkdir()
    before = host_state()
    # When the installer runs with --dry-run
    result = subprocess.run(
        [str(INSTALL), "--dry-run", "--wheelhouse", str(wheelhouse)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    # Then it succeeds and says, for each part, what it would do or that it is already done
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for group in ("dropgate-admin", "dropgate-upload"):
        assert f"would run: groupadd --system {group}" in out or f"group {group}: exists" in out
    for folder, mode, group in (("/var/lib/dropgate/inbox", "3770", "dropgate-upload"),
                                ("/var/lib/dropgate/state", "2750", "dropgate-admin")):
        assert f"chmod -- {mode} {folder}" in out or f"{folder}/: {mode} root:{group}" in out
    assert "/etc/systemd/system/dropgate.service" in out
    assert "/usr/bin/dropgate" in out
    assert "--no-index --find-links" in out
    assert out.rstrip().endswith("dry run: nothing was changed")
    # and nothing on the host changed, and the hostile name stayed a name
    assert host_state() == before
    assert not canary.exists()
    # and the SFTP drop-in is in the plan where sshd is installed (found as install.sh finds it)
    if shutil.which("sshd") is None and not os.access("/usr/sbin/sshd", os.X_OK):
        assert "sshd not installed: skipping the SFTP drop-in" in out
        cannot_run("sshd is not installed, so the plan for its drop-in was not checked")
    assert "/etc/ssh/sshd_config.d/dropgate-inbox.conf" in out


def test_install_usage_errors_exit_2() -> None:
    result = subprocess.run([str(INSTALL), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown argument: --frobnicate" in result.stderr


IN_NAMESPACE = r"""
set -eu
out=$1 source=$2 scratch=$3
""" + OVERLAY_SYSTEM + r"""
# sshd -t (run by the installer) wants the folder the ssh service makes when it starts; no ssh service runs here.
mkdir -p /run/sshd
"$source/deploy/install.sh" > "$out/first.txt" 2>&1 || { echo "exit status $?" >> "$out/first.txt"; exit 1; }
"$source/deploy/install.sh" > "$out/second.txt" 2>&1 || { echo "exit status $?" >> "$out/second.txt"; exit 1; }
getent group dropgate-admin dropgate-upload | cut -d: -f1 > "$out/groups.txt"
stat -c '%n %a %U %G' /var/lib/dropgate /var/lib/dropgate/inbox /var/lib/dropgate/state /var/backups/dropgate \
    /run/dropgate /etc/dropgate /etc/dropgate/dropgate.yaml > "$out/modes.txt"
readlink /usr/bin/dropgate > "$out/link.txt"
/usr/bin/dropgate --help > "$out/help.txt" 2>&1
cp /etc/pam.d/dropgate "$out/pam.txt"
stat -c '%a %U %G' /etc/pam.d/dropgate > "$out/pam-mode.txt"
if command -v systemd-analyze > /dev/null; then
    systemd-analyze verify /etc/systemd/system/dropgate.service > "$out/verify.txt" 2>&1 ||
        echo "exit status $?" >> "$out/verify.txt"
fi
"""


@pytest.mark.slow
def test_install_for_real_twice_in_a_throwaway_root_and_the_second_run_changes_nothing(tmp_path: Path) -> None:
    unshare = require_tool("unshare")
    if os.geteuid() != 0:
        cannot_run("installing for real (in a mount namespace) needs root")
    # Given a mount namespace where /etc, /opt, /usr, /var and /run are overlays on a tmpfs
    script = tmp_path / "in-namespace.sh"
    script.write_text(IN_NAMESPACE)
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    before = host_state()
    # When install.sh runs there, twice
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "bash", str(script), str(out), str(ROOT), str(scratch)],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode == 97 or "unshare failed" in result.stderr:
        cannot_run(f"this machine does not allow mount namespaces with overlays: {result.stderr.strip()}")
    first = (out / "first.txt").read_text()
    assert result.returncode == 0, result.stderr + first + (out / "second.txt").read_text()
    # Then the first run installed everything, with the owners and modes of the tmpfiles entries
    assert_installed_layout(out)
    assert "usage: dropgate" in (out / "help.txt").read_text()
    # and the console's PAM service, the stacks of this host's family named in it
    assert (out / "pam-mode.txt").read_text().split() == ["644", "root", "root"]
    stacks = [line for line in (out / "pam.txt").read_text().splitlines() if line and not line.startswith("#")]
    if Path("/etc/pam.d/common-auth").exists():
        assert stacks == ["@include common-auth", "@include common-account"]
    assert "/etc/pam.d/dropgate: exists, left as it is" in (out / "second.txt").read_text()
    if (out / "verify.txt").exists():  # the unit as shipped, with its real ExecStart now present
        assert (out / "verify.txt").read_text() == ""
    assert "dropgate is installed" in first
    # and the second run found it all in place: its only action is pip's (idempotent) upgrade
    second = (out / "second.txt").read_text()
    actions = [line for line in second.splitlines() if line.startswith("run:")]
    assert len(actions) == 1 and " -m pip install " in actions[0], second
    assert "/etc/dropgate/dropgate.yaml: exists, left as it is" in second
    # and nothing of it reached the host
    assert host_state() == before


# -- nginx ---------------------------------------------------------------------------------------

def http_get(url: str) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url)
    opener = urllib.request.build_opener(NoRedirect())
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture
def nginx(site: Site, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real nginx on loopback with the shipped snippet; yields its URL and the maintenance flag's path."""
    flag = site.root / "run" / "maintenance"  # the site's maintenance.flag_file
    backend = PlatformBackend(b"the platform, release 1.0.0\n")
    try:
        with maintenance_nginx(tmp_path / "nginx", flag, {9108: site.port}, backend.port) as url:
            yield url, flag
    finally:
        backend.stop()


def test_nginx_serves_the_maintenance_page_while_the_flag_exists_and_the_status_page_always(
    site: Site, nginx: tuple[str, Path]
) -> None:
    url, flag = nginx
    # Given a running daemon behind nginx with the shipped snippet, and no maintenance
    site.start_daemon()
    assert http_get(f"{url}/reports/today")[0:3:2] == (200, "the platform, release 1.0.0\n")
    # When the maintenance flag appears
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text('{"run": 1, "retry_after": 900}')
    # Then every platform URL answers 503 with the maintenance page and a Retry-After
    for path in ("/", "/reports/today", "/dropgatex"):
        status, headers, body = http_get(url + path)
        assert status == 503, path
        assert headers["Retry-After"] == "900"
        assert "The platform is being updated" in body
    # and dropgate's status page stays reachable under /dropgate/, its metrics not
    status, _, body = http_get(f"{url}/dropgate/")
    assert status == 200
    assert "<html" in body.lower()
    assert [http_get(f"{url}/dropgate/{asset}")[0] for asset in ("status.js", "status.css")] == [200, 200]
    status, _, body = http_get(f"{url}/dropgate/status.json")
    assert status == 200
    assert json.loads(body)["gate"] == "idle"
    assert http_get(f"{url}/dropgate/metrics")[0] == 404
    assert http_get(f"{url}/dropgate")[0] == 301
    # When the flag is removed, Then the platform answers again (nginx tests it on every request)
    flag.unlink()
    assert http_get(f"{url}/reports/today")[0:3:2] == (200, "the platform, release 1.0.0\n")
