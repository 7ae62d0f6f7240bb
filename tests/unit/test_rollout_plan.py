"""The rollout's decisions (deploy/ansible/filter_plugins/dropgate_rollout.py and library/dropgate_run.py).

Each site's next move is decided on the controller from what the site's own
`status --json` and `history --json` said; these tests give it the JSON a
real dropgate prints (the keys of SPEC section 7) for every situation a
rollout meets, and check the move and the line the summary shows.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.versions import Version
from tests.conftest import ROOT

SHA = "a" * 64
OTHER_SHA = "b" * 64


def load(relative: str) -> ModuleType:
    path = ROOT / "deploy" / "ansible" / relative
    spec = importlib.util.spec_from_file_location(Path(relative).stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rollout = load("filter_plugins/dropgate_rollout.py")
follow = load("library/dropgate_run.py")
ARCHIVE = rollout.archive_facts("/srv/releases/gts.1.1.0.tgz", SHA, 1234)


def status(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "gate": "idle", "daemon": {"running": True, "pid": 42}, "run": None, "queued": [], "uploading": [],
        "installed_version": "1.0.0", "blocked_by": [], "inbox": "/var/lib/dropgate/inbox",
    }
    return {**base, **changes}


def run(number: int, *, sha: str | None = SHA, outcome: str | None = "succeeded", step: str = "verify",
        archive: str = "gts.1.1.0.tgz", resolved: float | None = None, error: str | None = None,
        retry_of: int | None = None) -> dict[str, Any]:
    return {"id": number, "archive": archive, "sha256": sha, "outcome": outcome, "step": step,
            "resolved": resolved, "error": error, "retry_of": retry_of}


# -- versions and names -------------------------------------------------------------------


@pytest.mark.parametrize(("left", "right", "order"), [
    ("3.9", "3.10", -1), ("3.10", "3.9", 1), ("1.0", "1.0.0", 0), ("3.20.0-rc1", "3.20.0", -1),
    ("3.20.0-rc2", "3.20.0-rc10", -1), ("3.19.274", "3.19.274", 0), ("2", "10", -1),
])
def test_versions_compare_as_dropgate_compares_them(left: str, right: str, order: int) -> None:
    assert rollout.version_cmp(left, right) == order


versions = st.builds(
    lambda parts, tag: ".".join(str(p) for p in parts) + tag,
    st.lists(st.integers(0, 30), min_size=1, max_size=4),
    st.sampled_from(["", "-rc1", "-rc2", "-beta", "~a3", ".dev1"]),
)


@given(versions, versions)
def test_the_controller_and_the_site_always_agree_on_the_order_of_two_versions(left: str, right: str) -> None:
    site = Version.parse(left), Version.parse(right)
    expected = (site[0] > site[1]) - (site[0] < site[1])
    assert rollout.version_cmp(left, right) == expected


def test_the_archive_name_gives_product_and_version() -> None:
    facts = rollout.archive_facts("/srv/releases/gts.3.19.274.tgz", SHA, 99)
    assert (facts["name"], facts["product"], facts["version"], facts["sha256"], facts["size"]) == (
        "gts.3.19.274.tgz", "gts", "3.19.274", SHA, 99)


@pytest.mark.parametrize("name", [
    "gts.3.19.274.tar.gz", "gts.tgz", "GTS.1.0.tgz", ".1.0.tgz", "gts.latest.tgz", "gts.1.0.tgz.part", "gts",
])
def test_a_name_that_is_not_product_dot_version_dot_tgz_is_refused_naming_it(name: str) -> None:
    with pytest.raises(rollout.AnsibleFilterError, match=r"<product>\.<version>\.tgz"):
        rollout.archive_facts(f"/srv/{name}", SHA)


@pytest.mark.parametrize("checksum", ["", None, "A" * 64, "a" * 63, "z" * 64])
def test_an_archive_without_a_sha256_is_refused(checksum: Any) -> None:
    with pytest.raises(rollout.AnsibleFilterError, match="sha256"):
        rollout.archive_facts("/srv/gts.1.1.0.tgz", checksum)


# -- the plan ---------------------------------------------------------------------------------


def test_an_idle_site_below_the_version_gets_the_archive() -> None:
    plan = rollout.plan(status(), [run(3, sha=OTHER_SHA, archive="gts.1.0.1.tgz")], ARCHIVE)
    assert plan["action"] == "drop"
    assert plan["after"] == 3  # runs up to 3 existed before the drop: ours is newer
    assert plan["reason"] == "1.0.0 → 1.1.0"


@pytest.mark.parametrize(("installed", "reason"), [
    ("1.1.0", "version 1.1.0 already installed"),
    ("1.1", "version 1.1.0 already installed"),
    ("1.2.0", "version 1.1.0 is older than the installed 1.2.0"),
    ("1.10.0", "version 1.1.0 is older than the installed 1.10.0"),
])
def test_a_site_on_this_version_or_newer_is_skipped(installed: str, reason: str) -> None:
    plan = rollout.plan(status(installed_version=installed), [], ARCHIVE)
    assert (plan["action"], plan["reason"]) == ("skip", reason)


def test_a_site_that_installed_this_archive_says_which_run_did() -> None:
    plan = rollout.plan(status(installed_version="1.1.0"), [run(7)], ARCHIVE)
    assert (plan["action"], plan["run"], plan["reason"]) == ("skip", 7, "already installed by run 7")


@pytest.mark.parametrize(("found", "where"), [
    (run(5, outcome=None, step="backup"), "in backup"),
    (run(5, outcome=None, step="queued"), "queued"),
    (run(5, sha=None, outcome=None, step="queued"), "queued"),  # taken, not hashed yet
    (run(5, outcome=None, step="approval"), "in approval"),
])
def test_a_site_that_already_has_this_archive_queued_or_running_is_followed_not_sent_it_again(
    found: dict[str, Any], where: str
) -> None:
    plan = rollout.plan(status(gate="busy"), [found, run(4, sha=OTHER_SHA, archive="gts.1.0.1.tgz")], ARCHIVE)
    assert (plan["action"], plan["run"]) == ("wait", 5)
    assert where in plan["reason"]


def test_a_queued_run_of_the_same_name_with_other_bytes_is_not_ours() -> None:
    history = [run(5, sha=OTHER_SHA, outcome=None, step="queued")]
    plan = rollout.plan(status(queued=[{"id": 5, "archive": "gts.1.1.0.tgz"}]), history, ARCHIVE)
    assert plan["action"] == "skip"
    assert "other archives are queued: run 5 (gts.1.1.0.tgz)" in plan["reason"]


def test_of_two_runs_of_this_archive_still_to_end_the_older_is_followed() -> None:
    history = [run(9, outcome=None, step="queued"), run(8, outcome=None, step="apply")]
    assert rollout.plan(status(gate="busy"), history, ARCHIVE)["run"] == 8


def test_a_run_of_this_archive_that_still_blocks_the_gate_stops_the_rollout() -> None:
    history = [run(6, outcome="rolled_back", error="verify: failed")]
    plan = rollout.plan(status(gate="blocked", blocked_by=[{"id": 6, "outcome": "rolled_back"}]), history, ARCHIVE)
    assert (plan["action"], plan["run"]) == ("fail", 6)
    assert "`dropgate resolve 6 --note ...`" in plan["reason"]


@pytest.mark.parametrize("outcome", ["rolled_back", "failed", "interrupted", "rejected"])
def test_a_resolved_failure_of_this_archive_is_not_sent_again_unless_the_operator_asks(outcome: str) -> None:
    history = [run(6, outcome=outcome, resolved=1.0, error="the reason")]
    plan = rollout.plan(status(), history, ARCHIVE)
    assert (plan["action"], plan["run"]) == ("skip", 6)
    assert f"run 6 of this archive ended {outcome}: the reason; not dropped again" in plan["reason"]
    assert "dropgate_retry=true" in plan["reason"]
    retried = rollout.plan(status(), history, ARCHIVE, retry=True)
    assert (retried["action"], retried["run"]) == ("retry", 6)


def test_a_retry_waits_for_a_gate_blocked_by_another_run() -> None:
    history = [run(7, sha=OTHER_SHA, outcome="failed", archive="gts.1.0.1.tgz"), run(6, outcome="rejected")]
    plan = rollout.plan(status(gate="blocked", blocked_by=[{"id": 7, "outcome": "failed"}]), history, ARCHIVE,
                        retry=True)
    assert plan["action"] == "skip"
    assert "blocked by run 7 (failed)" in plan["reason"]


def test_the_newest_run_of_this_archive_decides() -> None:
    # rolled back, resolved, retried by hand and succeeded: installed, nothing to do
    history = [run(8, outcome="succeeded", retry_of=6), run(6, outcome="rolled_back", resolved=1.0)]
    plan = rollout.plan(status(installed_version="1.1.0"), history, ARCHIVE, retry=True)
    assert (plan["action"], plan["reason"]) == ("skip", "already installed by run 8")


@pytest.mark.parametrize(("changes", "reason"), [
    ({"gate": "blocked", "blocked_by": [{"id": 3, "outcome": "failed"}]}, "the gate is blocked by run 3 (failed)"),
    ({"gate": "busy", "run": {"id": 4, "archive": "gts.1.0.1.tgz"}}, "the gate is busy with run 4 (gts.1.0.1.tgz)"),
    ({"daemon": {"running": False, "pid": None}}, "the daemon is not running"),
    ({"queued": [{"id": 5, "archive": "gts.1.0.2.tgz"}]}, "other archives are queued: run 5 (gts.1.0.2.tgz)"),
    ({"uploading": [{"name": "gts.1.1.0.tgz", "bytes": 10, "total": 99}]}, "an upload of gts.1.1.0.tgz is already"),
    ({"screening": [{"name": "gts.1.1.0.tgz", "arrived": 1.0}]}, "gts.1.1.0.tgz is being screened"),
    ({"installed_version": None}, "no release is installed"),
    ({"installed_version": "not-a-version"}, "cannot compare the installed version"),
])
def test_a_site_that_is_not_idle_and_ready_is_skipped_with_the_reason(changes: dict[str, Any], reason: str) -> None:
    plan = rollout.plan(status(**changes), [], ARCHIVE)
    assert plan["action"] == "skip"
    assert reason in plan["reason"]


def test_a_run_of_this_archive_on_a_stopped_daemon_is_reported_not_followed() -> None:
    plan = rollout.plan(status(daemon={"running": False, "pid": None}), [run(2, outcome=None, step="backup")], ARCHIVE)
    assert (plan["action"], plan["run"]) == ("skip", 2)
    assert "the daemon is not running" in plan["reason"]


def test_a_site_whose_dropgate_does_not_say_where_its_inbox_is_is_an_error_not_a_guess() -> None:
    old = status()
    del old["inbox"]
    with pytest.raises(rollout.AnsibleFilterError, match="where its inbox is"):
        rollout.plan(old, [], ARCHIVE)


# -- the summary line ---------------------------------------------------------------------------


def drop_plan() -> dict[str, Any]:
    return rollout.plan(status(), [], ARCHIVE)


def test_a_succeeded_run_gives_versions_downtime_and_run_id() -> None:
    shown = {"id": 1, "outcome": "succeeded", "error": None, "started": 100.0, "finished": 112.5,
             "facts": {"downtime": True, "downtime_seconds": 2.25}}
    wait = {"state": "ended", "run": shown, "status": {"installed_version": "1.1.0"}, "message": ""}
    line = rollout.site_record(drop_plan(), wait, ARCHIVE, "north")
    assert line == {"site": "north", "archive": "gts.1.1.0.tgz", "action": "drop", "run": 1, "before": "1.0.0",
                    "after": "1.1.0", "outcome": "succeeded", "note": "", "downtime_seconds": 2.25,
                    "run_seconds": 12.5}


def test_a_live_patch_shows_no_downtime_and_a_rollback_names_the_command_to_look_at_it() -> None:
    patch = {"id": 2, "outcome": "succeeded", "started": 1.0, "finished": 2.0, "facts": {"downtime": False}}
    line = rollout.site_record(drop_plan(), {"state": "ended", "run": patch, "status": {}}, ARCHIVE, "s")
    assert line["downtime_seconds"] == 0.0
    failed = {"id": 3, "outcome": "rolled_back", "error": "verify: /health 500", "started": 1.0, "finished": 9.0,
              "facts": {"downtime_seconds": 4.0}}
    line = rollout.site_record(drop_plan(), {"state": "ended", "run": failed,
                                             "status": {"installed_version": "1.0.0"}}, ARCHIVE, "s")
    assert (line["outcome"], line["after"], line["downtime_seconds"]) == ("rolled_back", "1.0.0", 4.0)
    assert line["note"] == "verify: /health 500 (`dropgate show 3 --log` on the site)"


@pytest.mark.parametrize(("state", "outcome"), [
    ("waiting", "waiting"), ("timeout", "timeout"), ("not_taken", "not_taken"), (None, "error"),
])
def test_a_run_that_did_not_end_is_reported_as_such(state: str | None, outcome: str) -> None:
    wait = {"state": state, "run": {"id": 4, "step": "approval"}, "status": {}, "message": "why"}
    line = rollout.site_record(drop_plan(), wait, ARCHIVE, "s")
    assert (line["outcome"], line["run"], line["note"]) == (outcome, 4, "why")
    assert (outcome in rollout.FINE) == (outcome == "waiting")


def test_a_dry_run_says_what_it_would_do_and_a_skip_says_why() -> None:
    line = rollout.site_record(drop_plan(), None, ARCHIVE, "s", check=True)
    assert (line["outcome"], line["note"]) == ("planned", "would drop: 1.0.0 → 1.1.0")
    skipped = rollout.plan(status(installed_version="1.1.0"), [], ARCHIVE)
    line = rollout.site_record(skipped, None, ARCHIVE, "s")
    assert (line["outcome"], line["note"]) == ("skipped", "version 1.1.0 already installed")


# -- following a run (the module's own reading of the JSON) -----------------------------------------


def params(**changes: Any) -> dict[str, Any]:
    return {"sha256": SHA, "name": "gts.1.1.0.tgz", "after": 3, "retry_of": None, **changes}


def test_the_run_of_a_dropped_archive_is_the_oldest_of_its_bytes_newer_than_the_drop() -> None:
    history = [run(7, outcome=None, step="queued"), run(6, outcome=None, step="queued"),
               run(5, sha=None, outcome=None, step="queued"), run(4, sha=OTHER_SHA), run(2)]
    assert follow.find_run(history, params())["id"] == 6  # 5 is not hashed yet: these bytes' runs come first
    assert follow.find_run([run(5, sha=None, outcome=None, step="queued")], params())["id"] == 5
    assert follow.find_run([run(5, sha=None, outcome=None, archive="gts.1.0.9.tgz")], params()) is None
    assert follow.find_run([run(2), run(3)], params()) is None  # older than the drop: not this drop's run
    assert follow.find_run([run(9, retry_of=6), run(7, retry_of=1)], params(retry_of=6))["id"] == 9


@pytest.mark.parametrize(("shown", "waiting"), [
    ({"step": "approval", "outcome": None, "facts": {}}, "approval"),
    ({"step": "approval", "outcome": None, "facts": {"approved_at": 1.0}}, None),
    ({"step": "window", "outcome": None, "events": [{"step": "window", "message": "waiting for a window (x)"}]},
     "window"),
    ({"step": "window", "outcome": None, "events": [{"step": "prereq", "message": "ok"}]}, None),
    ({"step": "window", "outcome": None, "events": [{"step": "window", "message": "maintenance window open"}]}, None),
    ({"step": "window", "outcome": None, "facts": {"window_waiting": True}, "events": []}, "window"),
    ({"step": "window", "outcome": None, "facts": {"window_waiting": False},
      "events": [{"step": "window", "message": "waiting for a window (x)"}]}, None),
    ({"step": "window", "outcome": None, "facts": {}, "events": []}, None),
    ({"step": "backup", "outcome": None}, None),
    ({"step": "approval", "outcome": "rejected", "facts": {}}, None),
])
def test_a_run_waits_for_its_site_only_in_approval_not_yet_given_or_in_a_closed_window(
    shown: dict[str, Any], waiting: str | None
) -> None:
    assert follow.waiting_for(shown) == waiting
