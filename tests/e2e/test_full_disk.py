"""A full disk under the state folder: the daemon stops loudly rather than going on blind.

The state folder and the inbox (one filesystem, as the config demands) live on a
real 8 MiB tmpfs mounted for the test (root only; skipped elsewhere, failed under CI).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Site, wait_for
from tests.support import fill_filesystem, small_tmpfs


@pytest.fixture
def small_state(site: Site, tmp_path: Path) -> Iterator[Path]:
    """The site's state folder and inbox on an 8 MiB tmpfs."""
    with small_tmpfs(tmp_path / "small", "8m") as mount:
        site.write_config(paths={"inbox": str(mount / "inbox"), "state": str(mount / "state")})
        site.inbox = mount / "inbox"
        site.state = mount / "state"
        try:
            yield mount
        finally:
            for daemon in site.daemons:
                daemon.kill()


def test_a_full_state_disk_stops_the_daemon_with_an_error_and_the_run_resumes_after(
    site: Site, small_state: Path
) -> None:
    # Given a run waiting for approval, its journal on a small filesystem
    site.write_config(policy={"require_approval": True})
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    # When the filesystem fills up and the run must record something
    filler = fill_filesystem(small_state / "filler")
    result = site.cli("approve", "1")
    # Then the daemon does not go on blind: it stops with exit 1 and says why
    assert result.returncode != 0
    assert daemon.proc.wait(timeout=60) == 1
    assert "stopped on an error" in daemon.output()
    # and once space is freed, nothing is lost: the run resumes and can be approved
    filler.unlink()
    site.start_daemon()
    site.wait_step(1, "approval")
    approved = wait_for(lambda: site.cli("approve", "1").returncode == 0, what="the approval to be taken")
    assert approved
    assert site.wait_outcome(1, timeout=120)["outcome"] == "succeeded"
    assert os.readlink(site.platform / "current") == "releases/1.0.1"
