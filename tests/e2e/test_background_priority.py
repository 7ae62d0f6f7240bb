"""Staging and the backup yield to the platform (section `background`); the platform's services never do.

The real daemon runs a downtime update. A dump command and the services' start
command report their own I/O class (`ionice -p $$`) and niceness (`nice`): the
dump runs inside the backup, the start command inside apply.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Site, require_tool

REPORT = "ionice -p $$; nice"


def io_class_of(pid: int) -> str:
    return subprocess.run(["ionice", "-p", str(pid)], capture_output=True, text=True, check=True).stdout.strip()


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16])


def update_reporting(site: Site, background: dict[str, Any] | None) -> tuple[list[str], list[str], int]:
    """Run a downtime update; what the dump and the start command said, and the daemon's pid."""
    require_tool("ionice")
    started = site.root / "start-report"
    sections: dict[str, Any] = {
        "backup": {"dumps": [{"name": "report", "command": {"shell": REPORT}}]},
        "platform": {
            "services": {
                "stop": [["true"]],
                "start": [{"shell": f"({REPORT}) > {started}"}],
                "restart": [["true"]],
            }
        },
    }
    if background is not None:
        sections["background"] = background
    site.write_config(**sections)
    daemon = site.start_daemon()
    site.drop(site.pack("1.1.0"))
    run = site.wait_outcome(1, timeout=120)
    assert run["outcome"] == "succeeded", run["error"]
    dumped = (site.backups / "1" / "dumps" / "report").read_text().split("\n")
    return dumped, started.read_text().split("\n"), daemon.pid


@pytest.mark.parametrize(
    ("background", "io_class", "nice"),
    [
        (None, "idle", 10),  # the defaults
        ({"io_class": "best-effort", "nice": 5}, "best-effort: prio 7", 5),
        ({"io_class": "idle", "nice": 19}, "idle", 19),
    ],
)
def test_the_backup_runs_at_the_background_priority_and_the_services_at_the_daemons(
    site: Site, background: dict[str, Any] | None, io_class: str, nice: int
) -> None:
    # When a downtime update runs (its backup with a dump, its apply starting the services)
    dumped, started, daemon = update_reporting(site, background)

    # Then the dump ran at the background I/O class and niceness (never below the daemon's own niceness)
    assert dumped[0] == io_class
    assert int(dumped[1]) == max(nice, nice_of(daemon))
    # And the platform's services were started exactly as the daemon itself runs
    assert started[0] == io_class_of(daemon)
    assert int(started[1]) == nice_of(daemon)
    # And the run log says at which priority validate and the backup ran
    log = site.show(1)["log"]
    text = "\n".join(log) if isinstance(log, list) else str(log)
    expected = f"background priority: I/O class {(background or {}).get('io_class', 'idle')}, nice {nice}"
    assert text.count(expected) == 2, text[-2000:]


def test_background_none_leaves_the_backup_at_the_daemons_priority(site: Site) -> None:
    dumped, _started, daemon = update_reporting(site, {"io_class": "none", "nice": 0})

    assert dumped[0] == io_class_of(daemon)
    assert int(dumped[1]) == nice_of(daemon)
    assert "background priority" not in "\n".join(site.show(1)["log"])
