"""The validate step on a real platform tree: what it stages, records and leaves behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.archive import Manifest
from pipeline.errors import StepAborted, StepTimeout
from pipeline.release import current_release, installed_version
from states import validate
from tests.archive_helpers import INSTALLED, ArchiveSite

FILES = {
    "VERSION": b"3.19.274\n",
    "bin/app": b"#!/bin/sh\necho app\n",
    "hooks/pre-apply.sh": b"#!/bin/sh\n",
    "migrations/001.sh": b"#!/bin/sh\n",
}
MODES = {"bin/app": 0o755, "hooks/pre-apply.sh": 0o755, "migrations/001.sh": 0o755}


@pytest.fixture
def site(tmp_path: Path) -> ArchiveSite:
    return ArchiveSite(tmp_path)


def test_a_valid_archive_is_staged_as_the_next_release(site: ArchiveSite) -> None:
    # Given 3.19.273 live and a signed 3.19.274 with a hook and a migration
    archive = site.pack(
        "3.19.274",
        FILES,
        modes=MODES,
        min_version="3.19.0",
        hooks={"pre_apply": "hooks/pre-apply.sh"},
        migrations=["migrations/001.sh"],
        notes="Fixes the search.",
    )
    ctx = site.context(archive)

    # When validate runs
    validate.run(ctx)

    # Then the release sits under releases/3.19.274, byte for byte, executables executable
    release = site.platform / "releases" / "3.19.274"
    for name, content in FILES.items():
        assert (release / name).read_bytes() == content
    assert os.access(release / "hooks" / "pre-apply.sh", os.X_OK)
    # the live release is untouched and no staging folder is left
    assert installed_version(site.platform) == INSTALLED
    assert current_release(site.platform) == (site.platform / "releases" / INSTALLED).resolve()
    assert not (site.platform / ".staging").exists()
    # the facts later steps need are recorded, as JSON
    facts = json.loads(json.dumps(ctx.facts))
    assert facts["from_version"] == INSTALLED
    assert facts["to_version"] == "3.19.274"
    assert facts["release_dir"] == str(release)
    assert facts["downtime"] is False
    assert facts["downtime_reason"] == "3.19.273 → 3.19.274 is a patch, applied live"
    manifest = Manifest.from_dict(facts["manifest"])
    assert manifest.hooks == {"pre_apply": "hooks/pre-apply.sh"}
    assert manifest.migrations == ("migrations/001.sh",)
    assert manifest.notes == "Fixes the search."
    assert {"from_version": INSTALLED, "to_version": "3.19.274"} in site.reporter.updates
    # and the history says what happened
    assert site.reporter.events[0] == "signature ok (key vendor-2026): gts 3.19.274 (stable)"
    assert site.reporter.events[-1].startswith("staged 4 files, ")
    assert site.reporter.events[-1].endswith("into releases/3.19.274")
    assert site.reporter.ratios[-1] == 1.0


@pytest.mark.parametrize(
    ("version", "downtime", "expected", "reason"),
    [
        ("3.20.0", None, True, "3.19.273 → 3.20.0 changes the major or minor version"),
        ("3.19.274", True, True, "the archive requires downtime"),
        ("4.0.0", False, False, "the archive says no downtime is needed"),
    ],
)
def test_downtime_is_planned_from_the_manifest_and_the_versions(
    site: ArchiveSite, version: str, downtime: bool | None, expected: bool, reason: str
) -> None:
    archive = site.pack(version, downtime=downtime)
    ctx = site.context(archive)

    validate.run(ctx)

    assert (ctx.facts["downtime"], ctx.facts["downtime_reason"]) == (expected, reason)


def test_a_release_candidate_of_the_next_version_is_an_upgrade(site: ArchiveSite) -> None:
    site.raw_config["policy"] = {"channels": ["stable", "unstable"]}
    ctx = site.context(site.pack("3.20.0-rc1", channel="unstable", min_version=INSTALLED))

    validate.run(ctx)

    assert ctx.facts["to_version"] == "3.20.0-rc1"
    assert (site.platform / "releases" / "3.20.0-rc1" / "VERSION").read_text() == "3.20.0-rc1\n"


def test_leftovers_of_an_earlier_attempt_are_cleared_first(site: ArchiveSite) -> None:
    # Given a staging folder and a half-built release left by a daemon that died during validate
    leftover = site.platform / ".staging" / "1"
    leftover.mkdir(parents=True)
    (leftover / "partial.bin").write_bytes(b"half")
    stale = site.platform / "releases" / "3.19.274"
    stale.mkdir()
    (stale / "stale.txt").write_text("from the interrupted attempt")
    ctx = site.context(site.pack("3.19.274", FILES, modes=MODES))

    # When the run is validated again
    validate.run(ctx)

    # Then the release holds exactly the archive's files
    assert sorted(p.name for p in stale.iterdir()) == ["VERSION", "bin", "hooks", "migrations"]
    assert not (site.platform / ".staging").exists()


def test_validating_the_same_run_twice_gives_the_same_release(site: ArchiveSite) -> None:
    archive = site.pack("3.19.274", FILES, modes=MODES)
    validate.run(site.context(archive))

    validate.run(site.context(site.spool / archive.name))

    assert (site.platform / "releases" / "3.19.274" / "bin" / "app").read_bytes() == FILES["bin/app"]


def test_a_shutdown_during_staging_leaves_nothing_and_may_resume(site: ArchiveSite) -> None:
    # Given a large archive, and a shutdown that arrives once staging has reported progress
    archive = site.pack("3.19.274", {f"blob{i}": os.urandom(2**20) for i in range(24)})
    ctx = site.context(archive)
    report = site.reporter.progress

    def progress_then_shutdown(run_id: int, step: str, ratio: float, message: str | None) -> None:
        report(run_id, step, ratio, message)
        ctx.cancel.cancel("the daemon is stopping", resumable=True)

    site.reporter.progress = progress_then_shutdown  # type: ignore[method-assign]

    # When validate runs, then it stops at its next checkpoint
    with pytest.raises(StepAborted) as stopped:
        validate.run(ctx)

    assert stopped.value.resumable
    assert "validate was stopped: the daemon is stopping" in str(stopped.value)
    assert sorted(p.name for p in (site.platform / "releases").iterdir()) == [INSTALLED]
    assert not (site.platform / ".staging").exists()
    assert "to_version" not in ctx.facts


def test_past_its_time_limit_validate_fails_without_a_trace(site: ArchiveSite) -> None:
    ctx = site.context(site.pack("3.19.274", FILES, modes=MODES))
    ctx.deadline = ctx.now() - 1

    with pytest.raises(StepTimeout, match="validate ran past its time limit"):
        validate.run(ctx)

    assert sorted(p.name for p in (site.platform / "releases").iterdir()) == [INSTALLED]
    assert not (site.platform / ".staging").exists()
