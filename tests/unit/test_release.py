"""The release layout: switching, pruning, adopting an existing installation, the downtime decision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import DropgateError
from pipeline.release import (
    adopt_release,
    current_release,
    installed_version,
    plan_downtime,
    prune_releases,
    release_dir,
    switch_current,
)


def make_releases(root: Path, *versions: str) -> None:
    for version in versions:
        folder = release_dir(root, version)
        folder.mkdir(parents=True)
        (folder / "VERSION").write_text(version)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "releases").iterdir())


def test_switch_current_replaces_the_link_in_one_rename(tmp_path: Path) -> None:
    make_releases(tmp_path, "1.0.0", "1.1.0")
    switch_current(tmp_path, release_dir(tmp_path, "1.0.0"))
    inode_before = os.lstat(tmp_path / "current").st_ino

    switch_current(tmp_path, release_dir(tmp_path, "1.1.0"))

    assert installed_version(tmp_path) == "1.1.0"
    assert os.readlink(tmp_path / "current") == "releases/1.1.0"  # relative: the root can move
    assert os.lstat(tmp_path / "current").st_ino != inode_before  # a new link renamed over, not edited
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "releases"]  # no temporary left


def test_no_current_release_reads_as_none(tmp_path: Path) -> None:
    assert current_release(tmp_path) is None
    assert installed_version(tmp_path) is None


def test_prune_keeps_the_newest_by_version_order(tmp_path: Path) -> None:
    make_releases(tmp_path, "3.9.0", "3.10.0", "3.10.1", "3.11.0", "3.8.5")
    switch_current(tmp_path, release_dir(tmp_path, "3.11.0"))

    removed = prune_releases(tmp_path, 3, protect=[release_dir(tmp_path, "3.10.1")])

    assert removed == ["3.8.5", "3.9.0"]
    assert names(tmp_path) == ["3.10.0", "3.10.1", "3.11.0"]
    assert list((tmp_path / ".staging").iterdir()) == []


def test_prune_never_removes_the_live_or_a_protected_release(tmp_path: Path) -> None:
    make_releases(tmp_path, "1.0.0", "2.0.0", "3.0.0")
    switch_current(tmp_path, release_dir(tmp_path, "1.0.0"))  # e.g. rolled back to the oldest

    removed = prune_releases(tmp_path, 1, protect=[release_dir(tmp_path, "2.0.0"), None])

    assert removed == []
    assert names(tmp_path) == ["1.0.0", "2.0.0", "3.0.0"]


def test_prune_leaves_folders_that_are_not_versions(tmp_path: Path) -> None:
    make_releases(tmp_path, "1.0.0", "2.0.0")
    (tmp_path / "releases" / "notes").mkdir()
    switch_current(tmp_path, release_dir(tmp_path, "2.0.0"))

    assert prune_releases(tmp_path, 1) == ["1.0.0"]
    assert names(tmp_path) == ["2.0.0", "notes"]


def test_prune_without_releases_folder_removes_nothing(tmp_path: Path) -> None:
    assert prune_releases(tmp_path / "missing", 3) == []


@pytest.mark.parametrize(
    ("old", "new", "manifest", "expected"),
    [
        ("3.19.273", "3.19.274", None, False),
        ("3.18.9", "3.19.0", None, True),
        ("2.9.1", "3.0.0", None, True),
        ("3.19.273", "3.19.274", True, True),
        ("3.18.0", "3.19.0", False, False),
        (None, "1.0.0", None, True),
    ],
)
def test_plan_downtime(old: str | None, new: str, manifest: bool | None, expected: bool) -> None:
    downtime, reason = plan_downtime(old, new, manifest)
    assert downtime is expected
    assert reason


def installation(tmp_path: Path) -> Path:
    source = tmp_path / "opt" / "gts"
    (source / "bin").mkdir(parents=True)
    (source / "bin" / "server").write_text("#!/bin/sh\n")
    (source / "bin" / "server").chmod(0o750)
    (source / "etc").symlink_to("/etc")
    (source / "VERSION").write_text("3.18.2\n")
    return source


def test_adopt_by_moving_leaves_a_link_at_the_old_place(tmp_path: Path) -> None:
    source = installation(tmp_path)
    root = tmp_path / "platform"

    target = adopt_release(root, source, "3.18.2", copy=False)

    assert target == release_dir(root, "3.18.2")
    assert installed_version(root) == "3.18.2"
    assert (target / "bin" / "server").stat().st_mode & 0o777 == 0o750
    assert (target / "etc").is_symlink()
    assert source.is_symlink() and source.resolve() == target.resolve()


def test_adopt_by_copying_leaves_the_original_alone(tmp_path: Path) -> None:
    source = installation(tmp_path)
    root = tmp_path / "platform"

    target = adopt_release(root, source, "3.18.2", copy=True)

    assert not source.is_symlink() and (source / "bin" / "server").is_file()
    assert (target / "bin" / "server").stat().st_mode & 0o777 == 0o750
    assert os.readlink(target / "etc") == "/etc"
    assert installed_version(root) == "3.18.2"
    assert not (root / ".staging").exists() or list((root / ".staging").iterdir()) == []


def test_adopt_refuses_a_second_first_release(tmp_path: Path) -> None:
    root = tmp_path / "platform"
    adopt_release(root, installation(tmp_path), "3.18.2", copy=True)

    with pytest.raises(DropgateError, match=r"already has a current release \(3.18.2\); nothing adopted"):
        adopt_release(root, installation(tmp_path / "other"), "3.18.3", copy=True)


def test_adopt_refuses_the_folder_holding_the_root(tmp_path: Path) -> None:
    source = installation(tmp_path)
    with pytest.raises(DropgateError, match=r"contains platform\.root"):
        adopt_release(source / "dropgate", source, "3.18.2", copy=False)
    assert (source / "VERSION").is_file()


def init_config(tmp_path: Path) -> Path:
    """A site configuration for `dropgate init`, with every folder under `tmp_path`."""
    config = tmp_path / "dropgate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "paths": {"inbox": "inbox", "state": "state", "backups": "backups"},
                "platform": {"product": "gts", "root": "platform"},
                "maintenance": {"flag_file": "run/maintenance"},
            }
        )
    )
    return config


def test_init_from_the_command_line(tmp_path: Path) -> None:
    # Given a configuration and an existing installation with a VERSION file
    source = installation(tmp_path)
    config = init_config(tmp_path)

    # When the operator runs `dropgate init --adopt DIR --copy`
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(config), "init", "--adopt", str(source), "--copy"],
        capture_output=True,
        text=True,
        check=False,
    )

    # Then the folders exist and the installation is the first release (version read from VERSION)
    assert result.returncode == 0, result.stderr
    assert f"adopted {source} (copied) as release 3.18.2" in result.stdout
    for folder in ("inbox", "state", "backups", "platform/releases", "run"):
        assert (tmp_path / folder).is_dir()
    assert installed_version(tmp_path / "platform") == "3.18.2"

    # And running it again is refused with the reason, exit 1
    again = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(config), "init", "--adopt", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1
    assert "already has a current release (3.18.2)" in again.stderr


def test_init_asks_for_the_version_when_the_installation_does_not_say(tmp_path: Path) -> None:
    source = installation(tmp_path)
    (source / "VERSION").unlink()
    config = init_config(tmp_path)

    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(config), "init", "--adopt", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 2
    assert f"say which version {source} is: --version V" in result.stderr
    assert not (tmp_path / "inbox").exists()  # refused before any folder was made
    assert installed_version(tmp_path / "platform") is None
    assert (source / "bin" / "server").is_file()
