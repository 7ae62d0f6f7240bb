"""The files the daemon leaves: never world-readable, whatever umask it was started with."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, DaemonProcess, Site, wait_for


def start_with_umask(site: Site, umask: int) -> DaemonProcess:
    """The daemon started by hand from a shell whose umask is `umask` (no unit to set one)."""
    log_path = site.root / "daemon-umask.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", 'umask "$0" && exec "$@"', f"{umask:04o}", sys.executable, "-m", "pipeline",
             "--config", str(site.config_path), "run"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    daemon = DaemonProcess(site, proc, log_path)
    site.daemons.append(daemon)
    wait_for(lambda: site.metrics_text() is not None, what="the daemon to be ready")
    return daemon


def readable_by_others(*roots: Path) -> list[str]:
    """Everything under `roots` that a user outside the owner and group could read.

    An entry is readable by others when it has the read bit for others and every
    folder between the root and it lets others through. The roots are the
    test's own folders; the modes the daemon gave everything below are what is
    checked. Files keep the modes they arrived with (an uploaded archive, a data
    file in a snapshot): what protects them is the folder the daemon put them in.
    """
    found = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            if here != root and not all(p.stat().st_mode & 0o001 for p in [here, *here.parents] if root in p.parents):
                dirs.clear()  # others cannot get past this folder
                continue
            for name in [*dirs, *files]:
                path = here / name
                mode = path.lstat().st_mode
                if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode):
                    continue
                if mode & 0o004:
                    found.append(f"{path.relative_to(root.parent)} {stat.filemode(mode)}")
    return found


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o022], ids=["0000", "0002", "0022"])
def test_files_the_daemon_creates_are_not_world_readable_whatever_its_umask(site: Site, umask: int) -> None:
    # Given a daemon started by hand from a shell with a permissive umask, with a dump in its backup
    site.write_config(backup={"dumps": [{"name": "db", "command": ["echo", "CREATE TABLE t;"]}]})
    daemon = start_with_umask(site, umask)
    # When one update succeeds and one archive is rejected
    site.drop(site.pack("1.0.1"))
    assert site.wait_outcome(1)["outcome"] == "succeeded"
    site.drop(b"not an archive\n", name="gts.1.0.2.tgz")
    assert site.wait_outcome(2)["outcome"] == "rejected"
    # Then the journal, the run logs, the spooled and rejected archives and the backups exist
    state = site.state
    for path in (
        state / "journal.db",
        state / "runs" / "1.log",
        state / "spool" / "1" / "gts.1.0.1.tgz",
        state / "rejected" / "2-gts.1.0.2.tgz",
        state / "rejected" / "2-gts.1.0.2.tgz.reason",
        site.backups / "1" / "dumps" / "db",
    ):
        assert path.exists(), path
    # and none of them, nor any folder, is open to others; the control socket is root's and the group's
    assert readable_by_others(state, site.backups) == []
    assert stat.S_IMODE((state / "control.sock").stat().st_mode) == 0o660
    daemon.stop()
    assert readable_by_others(state, site.backups) == []  # what the last checkpoint wrote, too
