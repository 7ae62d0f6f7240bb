"""A failure caused by the site (no space, a read-only disk, a trust key file) does not lock the bytes out.

Such a run is `rejected` like any failure in validate, but its fault is the
site's: the message says which problem it was and that the archive was not
judged, and the same bytes dropped again after the repair are taken and run.
A real rejection of the archive still makes the same bytes a refused repeat.
Full and read-only disks are real tmpfs mounts (root only; skipped elsewhere,
failed under CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Site, wait_for
from tests.support import fill_filesystem, small_tmpfs


@pytest.fixture
def small_platform(site: Site, tmp_path: Path) -> Iterator[Path]:
    """The platform root (where validate stages) on a 4 MiB tmpfs, with release 1.0.0 live."""
    with small_tmpfs(tmp_path / "small", "4m") as mount:
        root = mount / "platform"
        shutil.copytree(site.platform, root, symlinks=True)
        site.write_config(platform={"root": str(root)})
        site.platform = root
        try:
            yield mount
        finally:
            for daemon in site.daemons:
                daemon.kill()


def payload() -> dict[str, str | bytes]:
    return {"data/blob.bin": os.urandom(1_500_000)}  # incompressible: the archive is as large as what it stages


def assert_site_fault(run: dict, *, says: str) -> None:
    assert run["outcome"] == "rejected"
    assert run["fault"] == "site"
    assert run["error"].startswith("site problem: "), run["error"]
    assert says in run["error"], run["error"]
    assert "the archive itself was not judged" in run["error"]
    assert f"dropgate retry {run['id']}" in run["error"]


def test_a_full_disk_while_staging_is_the_sites_fault_and_the_same_bytes_run_once_space_is_free(
    site: Site, small_platform: Path
) -> None:
    # Given the platform's filesystem full (another writer took it all)
    site.start_daemon()
    archive = site.pack("1.0.1", files=payload())
    filler = fill_filesystem(small_platform / "filler")
    # When the archive is dropped
    site.drop(archive)
    run = site.wait_outcome(1, timeout=120)
    # Then it is rejected for the site's reason, naming where space ran out and what was needed
    assert_site_fault(run, says="no space left on ")
    assert str(small_platform) in run["error"]
    assert "needed ~1.4 MiB" in run["error"]
    assert (site.state / "rejected" / "1-gts.1.0.1.tgz").is_file()  # kept, as every rejected archive
    assert not (site.platform / ".staging").exists() or not any((site.platform / ".staging").iterdir())
    # When space is freed and the same bytes are dropped again, they are taken (no repeat) and installed
    filler.unlink()
    site.drop(archive)
    second = site.wait_outcome(2, timeout=120)
    assert second["outcome"] == "succeeded", second["error"]
    assert os.readlink(site.platform / "current") == "releases/1.0.1"


def test_a_read_only_platform_disk_is_the_sites_fault(site: Site, small_platform: Path) -> None:
    site.start_daemon()
    archive = site.pack("1.0.1")
    subprocess.run(["mount", "-o", "remount,ro", str(small_platform)], check=True)
    site.drop(archive)
    assert_site_fault(site.wait_outcome(1, timeout=120), says="read-only file system on ")
    subprocess.run(["mount", "-o", "remount,rw", str(small_platform)], check=True)
    site.drop(archive)
    assert site.wait_outcome(2, timeout=120)["outcome"] == "succeeded"


@pytest.mark.parametrize("damage", ["missing", "a folder", "not a key"])
def test_an_unusable_trust_key_file_is_the_sites_fault(site: Site, damage: str) -> None:
    # Given a running daemon whose trusted key file is then lost or replaced
    site.start_daemon()
    archive = site.pack("1.0.1")
    key = site.keys / "vendor.pub"
    kept = key.with_name("vendor.pub.kept")
    key.rename(kept)
    if damage == "a folder":
        key.mkdir()
    elif damage == "not a key":
        key.write_text("hello\n")
    # When an archive is dropped, it is rejected for the site's reason, naming the key file
    site.drop(archive)
    run = site.wait_outcome(1, timeout=120)
    assert_site_fault(run, says="cannot authenticate, the trusted keys are unusable: trust.keys[0]: ")
    assert str(key) in run["error"]
    # When the key is put back and the same bytes dropped again, they run
    if key.is_dir():
        key.rmdir()
    kept.replace(key)
    site.drop(archive)
    assert site.wait_outcome(2, timeout=120)["outcome"] == "succeeded"


def test_an_archive_the_site_could_not_judge_is_still_refused_once_it_was_judged_bad(site: Site) -> None:
    # Given an unstable archive (refused by policy.channels) first dropped while the key file was missing
    site.start_daemon()
    archive = site.pack("1.0.1", channel="unstable")
    key = site.keys / "vendor.pub"
    key.rename(key.with_name("vendor.pub.kept"))
    site.drop(archive)
    assert site.wait_outcome(1, timeout=120)["fault"] == "site"
    key.with_name("vendor.pub.kept").replace(key)
    # When it is dropped again, it is judged: rejected, the archive's fault
    site.drop(archive)
    judged = site.wait_outcome(2, timeout=120)
    assert judged["outcome"] == "rejected" and judged["fault"] == "archive"
    assert "channel unstable is not allowed" in judged["error"]
    # Then the same bytes once more are a refused repeat of that judgement (not of the site's failure)
    site.drop(archive)
    repeat = site.wait_outcome(3, timeout=120)
    assert repeat["outcome"] == "rejected"
    assert "was already rejected as run 2" in repeat["error"]
    assert "dropgate retry 2" in repeat["error"]
    wait_for(lambda: site.status()["gate"] == "idle", what="the gate to stay open")
