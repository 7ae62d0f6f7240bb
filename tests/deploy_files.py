"""What the shipped deploy files promise, as the tests that check them share it.

install.sh and the Ansible role leave the same layout; the per-site and the
fleet dashboards query only what the daemon exports.
"""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from pipeline.metrics import Metrics

# Shell lines for a script run by `unshare --mount`, with $scratch set: every system folder an install
# touches overlaid on a tmpfs at $scratch that vanishes with the namespace (exit 97: no overlays here).
OVERLAY_SYSTEM = r"""
mount -t tmpfs dropgate-install-test "$scratch" || exit 97
for folder in etc opt usr var run; do
    mkdir -p "$scratch/$folder/upper" "$scratch/$folder/work"
    mount -t overlay overlay \
        -o "lowerdir=/$folder,upperdir=$scratch/$folder/upper,workdir=$scratch/$folder/work" "/$folder" || exit 97
done
"""

# `stat -c '%n %a %U %G'` of the installed folders and configuration, in this order
INSTALLED_MODES = [
    "/var/lib/dropgate 755 root root",
    "/var/lib/dropgate/inbox 3770 root dropgate-upload",
    "/var/lib/dropgate/state 2750 root dropgate-admin",
    "/var/backups/dropgate 700 root root",
    "/run/dropgate 755 root root",
    "/etc/dropgate 750 root dropgate-admin",
    "/etc/dropgate/dropgate.yaml 640 root dropgate-admin",
]


def assert_installed_layout(out: Path) -> None:
    """An install's groups, owners and modes, and its command, as the install script wrote them to `out`."""
    assert (out / "groups.txt").read_text().split() == ["dropgate-admin", "dropgate-upload"]
    assert (out / "modes.txt").read_text().splitlines() == INSTALLED_MODES
    assert (out / "link.txt").read_text().strip() == "/opt/dropgate/venv/bin/dropgate"


def dashboard_queries(dashboard_path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in a Grafana dashboard, including its template variables."""
    dashboard = json.loads(dashboard_path.read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"${variable['name']}", variable["definition"]))
    return queries


def exported_names() -> set[str]:
    """The sample names the daemon's metrics produce, from the same Metrics class the daemon registers."""
    registry = CollectorRegistry()
    Metrics(registry)
    suffixes = {"counter": ["_total"], "info": ["_info"], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    return names
