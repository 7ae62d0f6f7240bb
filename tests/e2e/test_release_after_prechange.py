"""A release folder appears under releases/ only once its run has passed every pre-change step.

validate stages into platform.root/.staging/<run>/; the release moves to
releases/<version> as backup starts. A run waiting for approval, refused by
prereq, rejected by the operator, or caught by a restart shows nothing under
releases/ that was not there before.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Site


def releases(site: Site) -> list[str]:
    return sorted(path.name for path in (site.platform / "releases").iterdir())


def test_a_run_waiting_for_approval_has_no_release_folder_yet(site: Site) -> None:
    # Given a site that requires approval, and a valid archive dropped into its inbox
    site.write_config(policy={"require_approval": True})
    site.start_daemon()
    site.drop(site.pack("2.0.0", {"static/site.css": "body { color: red }\n"}))

    # When the run waits for its approval
    site.wait_step(1, "approval")

    # Then its release waits in the run's staging folder, not under releases/
    assert releases(site) == ["1.0.0"]
    staged = site.platform / ".staging" / "1"
    assert (staged / "static" / "site.css").read_text() == "body { color: red }\n"

    # When it is approved, then the release moves under releases/ and is installed
    assert site.cli("approve", "1").returncode == 0
    run = site.wait_outcome(1, timeout=120)
    assert run["outcome"] == "succeeded", run["error"]
    assert releases(site) == ["1.0.0", "2.0.0"]
    assert (site.platform / "releases" / "2.0.0" / "static" / "site.css").exists()
    assert not (site.platform / ".staging").exists()
    events = [event["message"] for event in site.show(1)["events"]]
    assert "the staged release is now releases/2.0.0" in events


def test_a_run_refused_by_prereq_leaves_nothing_under_releases(site: Site) -> None:
    # Given an archive whose (well-formed) requirements this machine cannot meet
    site.start_daemon()
    site.drop(site.pack("2.0.0", requirements={"min_cpus": 100_000}))

    # When it is processed, then it is rejected in prereq
    run = site.wait_outcome(1, timeout=120)
    assert run["outcome"] == "rejected"
    assert "CPU" in run["error"] or "cpus" in run["error"]

    # and neither releases/ nor the staging folder keep anything of it
    assert releases(site) == ["1.0.0"]
    assert not (site.platform / ".staging").exists()
    assert (site.platform / "current").resolve().name == "1.0.0"


def test_a_staged_run_refused_when_revalidated_after_a_restart_leaves_nothing(site: Site) -> None:
    # Given a run staged and waiting for approval
    site.write_config(policy={"require_approval": True})
    daemon = site.start_daemon()
    site.drop(site.pack("2.0.0"))
    site.wait_step(1, "approval")
    assert (site.platform / ".staging" / "1").is_dir()

    # When the daemon is stopped, the site tightens its limits, and the daemon starts again
    assert daemon.stop(timeout=30) == 0
    site.write_config(limits={"max_members": 1})
    site.start_daemon()

    # Then the run is validated again from its spooled archive, refused, and leaves nothing
    run = site.wait_outcome(1, timeout=120)
    assert run["outcome"] == "rejected"
    assert "limits.max_members (1)" in run["error"]
    assert releases(site) == ["1.0.0"]
    assert not (site.platform / ".staging").exists()


def test_a_restart_before_backup_revalidates_and_the_run_completes(site: Site) -> None:
    # Given a run waiting for approval, its release staged
    site.write_config(policy={"require_approval": True})
    daemon = site.start_daemon()
    site.drop(site.pack("2.0.0"))
    site.wait_step(1, "approval")
    first: Path = site.platform / ".staging" / "1" / "VERSION"
    assert first.read_text() == "2.0.0\n"

    # When the daemon dies (SIGKILL) and starts again
    daemon.kill()
    site.start_daemon()

    # Then the run is validated again into a fresh staging folder, still nothing under releases/
    site.wait_step(1, "approval")
    assert releases(site) == ["1.0.0"]
    assert first.read_text() == "2.0.0\n"

    # and, approved, it installs
    assert site.cli("approve", "1").returncode == 0
    assert site.wait_outcome(1, timeout=120)["outcome"] == "succeeded"
    assert releases(site) == ["1.0.0", "2.0.0"]
