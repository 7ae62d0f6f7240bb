"""The fleet's deploy files, checked with the real tools: promtool, ansible-playbook, ansible-inventory.

- The fleet's recording rules pass `promtool check rules` and their unit tests,
  which cover every rule; they read only what the daemon exports.
- The fleet example config is valid, scrapes the job the per-site alerts expect,
  through file-based discovery, and loads both rule files.
- The fleet dashboard's queries are valid PromQL over exported metrics and the
  fleet's recorded series, and show what a rollout is watched by.
- The playbooks and the example inventory parse; the role's defaults agree with
  the shipped layout (tmpfiles entries, dropgate.example.yaml).
(The rollout itself: tests/e2e/test_fleet.py; the role applied: test_ansible_role.py.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import yaml

from tests.conftest import ROOT, require_tool
from tests.deploy_files import dashboard_queries, exported_names
from tests.fleet import ANSIBLE, ansible_playbook

PROMETHEUS = ROOT / "deploy" / "prometheus"
FLEET_RULES = PROMETHEUS / "dropgate.fleet.rules.yml"
FLEET_TESTS = PROMETHEUS / "dropgate.fleet.rules.test.yml"
FLEET_DASHBOARD = ROOT / "deploy" / "grafana" / "dropgate-fleet.json"


def recorded() -> list[str]:
    return [rule["record"] for group in yaml.safe_load(FLEET_RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_fleet_rules_pass_promtool_and_their_unit_tests_cover_every_rule() -> None:
    promtool = require_tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(FLEET_RULES)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(recorded())} rules found" in checked.stdout
    tested = {case["expr"] for test in yaml.safe_load(FLEET_TESTS.read_text())["tests"]
              for case in test.get("promql_expr_test", [])}
    assert set(recorded()) <= tested, f"recording rules without a unit test: {set(recorded()) - tested}"
    result = subprocess.run([promtool, "test", "rules", FLEET_TESTS.name], capture_output=True, text=True,
                            timeout=120, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_fleet_rules_read_only_what_the_daemon_exports_and_keep_the_job_of_the_alerts() -> None:
    exported = exported_names() | {"up"}  # and Prometheus' own `up`
    own = set(recorded())
    for group in yaml.safe_load(FLEET_RULES.read_text())["groups"]:
        for rule in group["rules"]:
            expr = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", rule["expr"])  # label names, not series
            raw = list(re.finditer(r"(?<![:\w])(dropgate_[a-z_]+|up)\b(\{[^}]*\})?", expr))
            names = {match.group(1) for match in raw}
            names |= set(re.findall(r"\b[a-z]+:[a-z_]+:[a-z0-9]+\b", expr))
            unknown = names - exported - own
            assert not unknown, f"{rule['record']} reads {unknown}, which the daemon does not export"
            for match in raw:  # every metric read is the job the per-site alerts watch
                assert 'job="dropgate"' in (match.group(2) or ""), f"{rule['record']}: {match.group(0)}"


def test_the_fleet_example_config_discovers_sites_from_files_and_loads_both_rule_files(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    config = yaml.safe_load((PROMETHEUS / "prometheus.fleet.example.yml").read_text())
    assert [Path(path).name for path in config["rule_files"]] == ["dropgate.rules.yml", "dropgate.fleet.rules.yml"]
    # Given the example with its paths pointing at the shipped files and a targets folder made from the example
    config["rule_files"] = [str(PROMETHEUS / Path(path).name) for path in config["rule_files"]]
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "north.yml").write_text((PROMETHEUS / "dropgate-sites.example.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "dropgate"  # what the per-site alerts look for: up{job="dropgate"}
    job["file_sd_configs"][0]["files"] = [str(tmp_path / "sites" / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    # Then promtool accepts the config, both rule files and the targets file
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout
    assert "WARNING" not in result.stdout + result.stderr
    sites = yaml.safe_load((PROMETHEUS / "dropgate-sites.example.yml").read_text())
    assert all(entry["labels"]["site"] and entry["targets"] for entry in sites)


def test_the_fleet_dashboard_queries_are_valid_promql_over_exported_and_recorded_series(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    known = exported_names() | {"up"} | set(recorded())
    used: set[str] = set()
    rules = []
    for number, (title, query) in enumerate(dashboard_queries(FLEET_DASHBOARD)):
        expr = query
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").rpartition(",")[0].strip()
        expr = expr.replace("$job", "dropgate")
        names = set(re.findall(r"\b[a-z]+:[a-z_]+:[a-z0-9]+\b|\bdropgate_[a-z_]+\b|\bup\b(?=\{)", expr))
        assert names <= known, f"panel {title!r} queries {names - known}, which nothing exports or records"
        used |= names
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # every recorded series is on the dashboard
    assert set(recorded()) <= used, f"not on the dashboard: {set(recorded()) - used}"
    dashboard = json.loads(FLEET_DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("per installed version", "blocked", "stuck", "waiting", "down", "every site", "outcomes"):
        assert wanted in titles, f"no panel about {wanted}"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# -- Ansible -----------------------------------------------------------------------------------------


def ansible_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_HOME": str(tmp_path),
            "ANSIBLE_LOCAL_TEMP": str(tmp_path), "ANSIBLE_NOCOLOR": "1"}


def test_the_playbooks_and_the_example_inventory_parse(tmp_path: Path) -> None:
    inventory = ANSIBLE / "inventory.example.yml"
    result = subprocess.run(
        [ansible_playbook(), "--syntax-check", "-i", str(inventory), str(ANSIBLE / "rollout.yml"),
         str(ANSIBLE / "site.yml"), "-e", "archive=/srv/gts.1.0.1.tgz"],
        capture_output=True, text=True, timeout=120, env=ansible_env(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    listed = subprocess.run(
        [str(Path(ansible_playbook()).with_name("ansible-inventory")), "-i", str(inventory), "--list"],
        capture_output=True, text=True, timeout=120, env=ansible_env(tmp_path),
    )
    assert listed.returncode == 0, listed.stderr
    hosts = json.loads(listed.stdout)["dropgate"]["hosts"]
    assert hosts[0] == "hospital-test"  # the canary first: the waves follow the inventory's order


def test_the_roles_defaults_agree_with_the_shipped_layout() -> None:
    defaults = yaml.safe_load((ANSIBLE / "roles" / "dropgate" / "defaults" / "main.yml").read_text())
    example = yaml.safe_load((ROOT / "config" / "dropgate.example.yaml").read_text())
    chroot = defaults["dropgate_chroot"]
    assert example["paths"] == {"inbox": f"{chroot}/inbox", "state": f"{chroot}/state",
                                "backups": defaults["dropgate_backups"]}
    assert example["maintenance"]["flag_file"] == f"{defaults['dropgate_run_dir']}/maintenance"
    assert example["control"]["admin_group"] == defaults["dropgate_admin_group"]
    rollout = yaml.safe_load((ANSIBLE / "roles" / "dropgate_rollout" / "defaults" / "main.yml").read_text())
    assert rollout["dropgate_command"] == defaults["dropgate_bin_link"]
    assert rollout["dropgate_config"] == "/etc/dropgate/dropgate.yaml"
    unit = (ROOT / "deploy" / "systemd" / "dropgate.service").read_text()
    assert f"ExecStart={defaults['dropgate_bin_link']} run\n" in unit
    assert f"DROPGATE_CONFIG={rollout['dropgate_config']}\n" in unit
