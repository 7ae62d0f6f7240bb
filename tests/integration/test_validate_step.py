"""The validate step on a real platform tree: what it stages, records and leaves behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import StepAborted, StepTimeout
from pipeline.release import current_release, installed_version
from states import validate
from tests.archive_helpers import INSTALLED, ArchiveSite
from tests.conftest import Site, wait_for

FILES = {
    "VERSION": b"3.19.274\n",
    "bin/app": b"#!/bin/sh\necho app\n",
    "hooks/pre-apply.sh": b"#!/bin/sh\n",
    "migrations/001.sh": b"#!/bin/sh\n",
}
MODES = {"bin/app": 0o755, "hooks/pre-apply.sh": 0o755, "migrations/001.sh": 0o755}


@pytest.fixture
def sandbox(tmp_path: Path) -> ArchiveSite:
    return ArchiveSite(tmp_path)


def test_a_valid_archive_is_staged_as_the_next_release(sandbox: ArchiveSite) -> None:
    # Given 3.19.273 live and a signed 3.19.274 with a hook and a migration
    archive = sandbox.pack(
        "3.19.274",
        FILES,
        modes=MODES,
        min_version="3.19.0",
        hooks={"pre_apply": "hooks/pre-apply.sh"},
        migrations=["migrations/001.sh"],
        notes="Fixes the search.",
    )
    ctx = sandbox.context(archive)

    # When validate runs
    validate.run(ctx)

    # Then the release waits in the run's staging folder, byte for byte, executables executable
    staged = sandbox.platform / ".staging" / "1"
    for name, content in FILES.items():
        assert (staged / name).read_bytes() == content
    assert os.access(staged / "hooks" / "pre-apply.sh", os.X_OK)
    # and nothing appears under releases/ before the run has passed every pre-change step
    assert sorted(p.name for p in (sandbox.platform / "releases").iterdir()) == [INSTALLED]
    # the live release is untouched
    assert installed_version(sandbox.platform) == INSTALLED
    assert current_release(sandbox.platform) == (sandbox.platform / "releases" / INSTALLED).resolve()
    # the facts later steps need are recorded, as JSON
    facts = json.loads(json.dumps(ctx.facts))
    assert facts["from_version"] == INSTALLED
    assert facts["to_version"] == "3.19.274"
    assert facts["staged_release"] == str(staged)
    assert "release_dir" not in facts
    assert facts["downtime"] is False
    assert facts["downtime_reason"] == "3.19.273 → 3.19.274 is a patch, applied live"
    manifest = facts["manifest"]
    assert manifest["hooks"] == {"pre_apply": "hooks/pre-apply.sh"}
    assert manifest["migrations"] == ["migrations/001.sh"]
    assert manifest["notes"] == "Fixes the search."
    # the journal keeps a summary, not the per-file list (read on every status refresh)
    assert "files" not in manifest
    assert manifest["file_count"] == 4
    assert {"from_version": INSTALLED, "to_version": "3.19.274"} in sandbox.reporter.updates
    # and the history says what happened
    assert sandbox.reporter.events[0] == "signature ok (key vendor-2026): gts 3.19.274 (stable)"
    assert sandbox.reporter.events[-1].startswith("staged 4 files, ")
    assert sandbox.reporter.events[-1].endswith("it moves to releases/3.19.274 once the pre-change steps pass")
    assert sandbox.reporter.ratios[-1] == 1.0

    # When the run leaves the pre-change steps (the runner calls this as backup starts)
    validate.release_staged(ctx)

    # Then the release is under releases/3.19.274, the staging folder is gone, and the facts say where
    release = sandbox.platform / "releases" / "3.19.274"
    for name, content in FILES.items():
        assert (release / name).read_bytes() == content
    assert not (sandbox.platform / ".staging").exists()
    assert ctx.facts["release_dir"] == str(release)
    assert "staged_release" not in ctx.facts
    assert sandbox.reporter.events[-1] == "the staged release is now releases/3.19.274"


@pytest.mark.parametrize(
    ("version", "downtime", "expected", "reason"),
    [
        ("3.20.0", None, True, "3.19.273 → 3.20.0 changes the major or minor version"),
        ("3.19.274", True, True, "the archive requires downtime"),
        ("4.0.0", False, False, "the archive says no downtime is needed"),
    ],
)
def test_downtime_is_planned_from_the_manifest_and_the_versions(
    sandbox: ArchiveSite, version: str, downtime: bool | None, expected: bool, reason: str
) -> None:
    archive = sandbox.pack(version, downtime=downtime)
    ctx = sandbox.context(archive)

    validate.run(ctx)

    assert (ctx.facts["downtime"], ctx.facts["downtime_reason"]) == (expected, reason)


def test_a_release_candidate_of_the_next_version_is_an_upgrade(sandbox: ArchiveSite) -> None:
    sandbox.raw_config["policy"] = {"channels": ["stable", "unstable"]}
    ctx = sandbox.context(sandbox.pack("3.20.0-rc1", channel="unstable", min_version=INSTALLED))

    validate.run(ctx)
    validate.release_staged(ctx)

    assert ctx.facts["to_version"] == "3.20.0-rc1"
    assert (sandbox.platform / "releases" / "3.20.0-rc1" / "VERSION").read_text() == "3.20.0-rc1\n"


def test_leftovers_of_an_earlier_attempt_are_cleared_first(sandbox: ArchiveSite) -> None:
    # Given a staging folder and a half-built release left by a daemon that died during validate
    leftover = sandbox.platform / ".staging" / "1"
    leftover.mkdir(parents=True)
    (leftover / "partial.bin").write_bytes(b"half")
    stale = sandbox.platform / "releases" / "3.19.274"
    stale.mkdir()
    (stale / "stale.txt").write_text("from the interrupted attempt")
    ctx = sandbox.context(sandbox.pack("3.19.274", FILES, modes=MODES))

    # When the run is validated again, then its staging folder holds exactly the archive's files
    validate.run(ctx)
    assert sorted(p.name for p in leftover.iterdir()) == ["VERSION", "bin", "hooks", "migrations"]

    # and once it leaves the pre-change steps, so does the release
    validate.release_staged(ctx)
    assert sorted(p.name for p in stale.iterdir()) == ["VERSION", "bin", "hooks", "migrations"]
    assert not (sandbox.platform / ".staging").exists()


def test_validating_the_same_run_twice_gives_the_same_release(sandbox: ArchiveSite) -> None:
    archive = sandbox.pack("3.19.274", FILES, modes=MODES)
    validate.run(sandbox.context(archive))

    again = sandbox.context(sandbox.spool / archive.name)
    validate.run(again)
    validate.release_staged(again)

    assert (sandbox.platform / "releases" / "3.19.274" / "bin" / "app").read_bytes() == FILES["bin/app"]


def test_a_shutdown_during_staging_leaves_nothing_and_may_resume(sandbox: ArchiveSite) -> None:
    # Given a large archive, and a shutdown that arrives once staging has reported progress
    archive = sandbox.pack("3.19.274", {f"blob{i}": os.urandom(2**20) for i in range(24)})
    ctx = sandbox.context(archive)
    report = sandbox.reporter.progress

    def progress_then_shutdown(run_id: int, step: str, ratio: float, message: str | None) -> None:
        report(run_id, step, ratio, message)
        ctx.cancel.cancel("the daemon is stopping", resumable=True)

    sandbox.reporter.progress = progress_then_shutdown  # type: ignore[method-assign]

    # When validate runs, then it stops at its next checkpoint
    with pytest.raises(StepAborted) as stopped:
        validate.run(ctx)

    assert stopped.value.resumable
    assert "validate was stopped: the daemon is stopping" in str(stopped.value)
    assert sorted(p.name for p in (sandbox.platform / "releases").iterdir()) == [INSTALLED]
    assert not (sandbox.platform / ".staging").exists()
    assert "to_version" not in ctx.facts


def test_past_its_time_limit_validate_fails_without_a_trace(sandbox: ArchiveSite) -> None:
    ctx = sandbox.context(sandbox.pack("3.19.274", FILES, modes=MODES))
    ctx.deadline = ctx.now() - 1

    with pytest.raises(StepTimeout, match="validate ran past its time limit"):
        validate.run(ctx)

    assert sorted(p.name for p in (sandbox.platform / "releases").iterdir()) == [INSTALLED]
    assert not (sandbox.platform / ".staging").exists()


# -- through the real daemon the announced length -----------------------------------


def test_a_partial_upload_waits_as_uploading_and_is_taken_once_completed(site: Site) -> None:
    # Given a running daemon, and a signed archive of about 3 MB of which an interrupted upload left the first half
    site.start_daemon()
    blob = os.urandom(3 * 2**20)
    archive = site.pack("2.0.0", {"blob.bin": blob})
    data = archive.read_bytes()
    target = site.inbox / archive.name
    half = len(data) // 2
    target.write_bytes(data[:half])

    # Then it is shown as uploading N of M bytes, left in place, and no run starts
    def uploading() -> list[dict[str, object]]:
        return list(site.status()["uploading"])

    shown = wait_for(uploading, what="the partial upload to be listed as uploading")
    assert shown == [{"name": archive.name, "bytes": half, "total": len(data)}]
    assert f"uploading: {archive.name} {half} of {len(data)} bytes" in site.cli("status").stdout
    assert site.history() == []
    assert target.read_bytes() == data[:half]

    # When `reput` appends the rest
    with open(target, "ab") as upload:
        upload.write(data[half:])

    # Then the whole archive is taken, validated and installed as release 2.0.0
    run = site.wait_outcome(1, timeout=120)
    assert (run["archive"], run["size"], run["to_version"]) == (archive.name, len(data), "2.0.0")
    assert run["outcome"] == "succeeded", run["error"]
    assert (site.platform / "releases" / "2.0.0" / "blob.bin").read_bytes() == blob
