"""The steps maintenance, apply and verify against a real sample platform (real processes, real HTTP)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.config import Config, parse_config
from pipeline.context import StepContext
from pipeline.errors import CommandFailed, StepFailed, StepTimeout
from pipeline.release import current_release, installed_version, release_dir, switch_current
from pipeline.sample_platform import front_command, service_commands, write_release
from states import apply, maintenance, verify
from tests.conftest import free_port, wait_for
from tests.support import RecordingReporter


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2, trust_env=False)
    except httpx.HTTPError:
        return None


class Recorder(RecordingReporter):
    """What the steps reported, with the run's journal columns as they stand."""

    @property
    def run(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for update in self.updates:
            merged.update(update)
        return merged

    @property
    def progress_reports(self) -> list[float]:
        return self.ratios

    def log_text(self) -> str:
        return "\n".join(self.logs)


@dataclass
class Site:
    tmp: Path
    root: Path
    flag: Path
    app_port: int
    front_port: int
    recorder: Recorder
    facts: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def front(self) -> str:
        return f"http://127.0.0.1:{self.front_port}/"

    @property
    def health(self) -> str:
        return f"http://127.0.0.1:{self.app_port}/health"

    def config(self) -> Config:
        raw: dict[str, Any] = {
            "paths": {"inbox": "inbox", "state": "state", "backups": "backups"},
            "platform": {
                "product": "sample",
                "root": str(self.root),
                "keep_releases": 2,
                "services": service_commands(self.root, self.app_port),
            },
            "maintenance": {"flag_file": str(self.flag), "retry_after": "2m"},
            "verify": {"http": [{"url": self.health, "version": True}], "interval_seconds": 0.1},
        }
        for section, values in self.overrides.items():
            raw.setdefault(section, {}).update(values)
        return parse_config(raw, base=self.tmp)

    def context(self, step: str, limit: float | None = 30.0) -> StepContext:
        return StepContext(
            run_id=7,
            step=step,
            archive=self.tmp / "sample.1.1.0.tgz",
            archive_name="sample.1.1.0.tgz",
            sha256="0" * 64,
            config=self.config(),
            facts=self.facts,
            reporter=self.recorder,
            deadline=time.time() + limit if limit else None,
        )

    def stage(self, version: str, *, health_status: int = 200, **manifest: Any) -> Path:
        """What validate leaves behind: the release folder and the facts."""
        folder = write_release(release_dir(self.root, version), version, health_status=health_status)
        self.facts.update(
            manifest={"migrations": [], "hooks": {}, **manifest},
            from_version=installed_version(self.root),
            to_version=version,
            release_dir=str(folder),
        )
        return folder

    def answered_version(self) -> str | None:
        response = get(self.health)
        return response.json()["version"] if response is not None else None


def script(path: Path, body: str, *, executable: bool = True) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    if executable:
        path.chmod(0o755)
    return path.name


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "platform"
    write_release(release_dir(root, "1.0.0"), "1.0.0")
    switch_current(root, release_dir(root, "1.0.0"))
    flag = tmp_path / "run" / "maintenance"
    recorder = Recorder()
    site = Site(tmp_path, root, flag, free_port(), free_port(), recorder, facts={})
    services = service_commands(root, site.app_port)
    subprocess.run(services["start"][0], check=True, capture_output=True)
    front = subprocess.Popen(front_command(site.front_port, site.app_port, flag), stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: get(site.front) is not None, what="the front to answer")
        yield site
    finally:
        front.terminate()
        front.wait(timeout=10)
        subprocess.run(services["stop"][0], check=True, capture_output=True)


# -- maintenance --------------------------------------------------------------


def test_maintenance_serves_503_with_retry_after_and_stops_the_platform(site: Site) -> None:
    # Given a platform in service
    assert get(site.front).status_code == 200  # type: ignore[union-attr]
    ctx = site.context("maintenance")

    # When maintenance is entered
    maintenance.enter(ctx)

    # Then visitors get the maintenance page, the application is stopped, and the run says so
    answer = get(site.front)
    assert answer is not None and answer.status_code == 503
    assert answer.headers["Retry-After"] == "120"
    assert json.loads(site.flag.read_text())["run_id"] == 7
    assert get(site.health) is None
    assert site.recorder.run["maintenance"] is True
    assert site.facts["maintenance_since"] > 0

    # When it is left
    maintenance.leave(ctx)

    # Then the platform is back, the flag is gone and the downtime is recorded
    assert get(site.front).status_code == 200  # type: ignore[union-attr]
    assert not site.flag.exists()
    assert site.recorder.run["maintenance"] is False
    assert site.facts["downtime_seconds"] >= 0
    assert any(e.startswith("maintenance off after") for e in site.recorder.events)


def test_leave_is_idempotent_and_a_no_op_when_never_entered(site: Site) -> None:
    ctx = site.context("verify")
    site.flag.parent.mkdir(parents=True, exist_ok=True)
    site.flag.write_text("set by an operator\n")

    maintenance.leave(ctx)  # never entered: someone else's flag stays

    assert site.flag.read_text() == "set by an operator\n"
    assert "maintenance" not in site.recorder.run
    site.flag.unlink()
    maintenance.enter(ctx)
    maintenance.leave(ctx)
    events = len(site.recorder.events)
    maintenance.leave(ctx)
    assert len(site.recorder.events) == events
    assert get(site.front).status_code == 200  # type: ignore[union-attr]


def test_maintenance_mode_always_leaves_and_keeps_the_original_error(site: Site) -> None:
    ctx = site.context("rollback")

    with pytest.raises(RuntimeError, match="inside"), maintenance.maintenance_mode(ctx):
        assert get(site.front).status_code == 503  # type: ignore[union-attr]
        raise RuntimeError("inside")

    assert not site.flag.exists()
    assert get(site.front).status_code == 200  # type: ignore[union-attr]


def test_a_failing_stop_command_leaves_maintenance_recorded_on(site: Site) -> None:
    site.overrides["platform"] = {"services": {"stop": [["sh", "-c", "echo cannot stop; exit 4"]]}}
    ctx = site.context("maintenance")

    with pytest.raises(CommandFailed, match=r"stop 1/1 failed with exit code 4"):
        maintenance.run(ctx)

    assert site.flag.exists()
    assert site.recorder.run["maintenance"] is True
    assert "cannot stop" in site.recorder.log_text()


def test_downtime_is_required_only_when_decided(site: Site) -> None:
    assert maintenance.required(site.config(), {"downtime": True}) is True
    assert maintenance.required(site.config(), {"downtime": False}) is False


# -- apply --------------------------------------------------------------------


def test_apply_runs_hooks_and_migrations_in_order_then_switches(site: Site) -> None:
    # Given a staged release with hooks and migrations that record their order and environment
    trace = site.tmp / "trace"
    folder = release_dir(site.root, "1.1.0")
    line = (
        f'echo "$0 $DROPGATE_RUN_ID $DROPGATE_FROM_VERSION $DROPGATE_TO_VERSION $DROPGATE_RELEASE_DIR" >> {trace}\n'
        "echo output of $0\n"
    )
    script(folder / "hooks" / "pre.sh", line)
    script(folder / "hooks" / "post.sh", line)
    script(folder / "migrations" / "001.sh", line)
    script(folder / "migrations" / "002.sh", line, executable=False)  # modes lost: runs by its #! line
    site.stage(
        "1.1.0",
        migrations=["migrations/001.sh", "migrations/002.sh"],
        hooks={"pre_apply": "hooks/pre.sh", "post_apply": "hooks/post.sh"},
    )

    # When apply runs
    apply.run(site.context("apply"))

    # Then each ran once, in order, with the run's context; current points at the new release
    names = [Path(row.split()[0]).name + " " + " ".join(row.split()[1:]) for row in trace.read_text().splitlines()]
    assert names == [f"{n} 7 1.0.0 1.1.0 {folder}" for n in ("pre.sh", "001.sh", "002.sh", "post.sh")]
    assert installed_version(site.root) == "1.1.0"
    assert site.answered_version() == "1.1.0"
    assert site.facts["previous_release"] == str(release_dir(site.root, "1.0.0").resolve())
    assert site.recorder.run["platform_changed"] is True
    assert "migration 1/2 migrations/001.sh" in site.recorder.events
    assert "migration 2/2 migrations/002.sh" in site.recorder.events
    assert "current → releases/1.1.0 (was 1.0.0)" in site.recorder.events
    assert "[migration 2/2 migrations/002.sh] output of" in site.recorder.log_text()


def progress_script(reports: list[float]) -> str:
    """A Python hook or migration writing each ratio as a JSON line to DROPGATE_PROGRESS_FD."""
    lines = "".join(json.dumps({"progress": ratio, "message": f"at {ratio}"}) + "\n" for ratio in reports)
    return f"#!{sys.executable}\nimport os\nos.write(int(os.environ['DROPGATE_PROGRESS_FD']), {lines.encode()!r})\n"


def test_a_migration_reports_its_own_progress_within_its_share_of_apply(site: Site) -> None:
    # Given one migration writing a JSON progress line to DROPGATE_PROGRESS_FD; apply has three units
    # (the migration, the switch of `current`, the one restart command)
    folder = site.stage("1.1.0", migrations=["migrate.py"])
    (folder / "migrate.py").write_text(progress_script([0.42]))

    # When apply runs it
    apply.run(site.context("apply"))

    # Then its 0.42 shows as 0.42 of the first third of the step, and the bar ends full
    assert site.recorder.progress_reports[0] == pytest.approx(0.42 / 3)
    assert site.recorder.progress_reports[-1] == 1.0


@pytest.mark.parametrize(
    ("reports", "hooks"),
    [
        ([0.0, 0.5, 1.0], False),  # the case seen on sites: 1.0 raw, then apply's counter said 0.667
        ([0.9, 0.3, 1.0], False),  # a migration that restarts its own count
        ([1.0, 1.0, 0.0], True),  # hooks and migrations both report, the last one backwards
        ([-5.0, 7.0, float("nan")], True),  # out of range (nan is refused by the pipe's parser)
    ],
)
def test_progress_within_apply_never_goes_back(site: Site, reports: list[float], hooks: bool) -> None:
    # Given two migrations (and, in some cases, pre- and post-apply hooks) that report progress
    folder = site.stage(
        "1.1.0",
        migrations=["m/1.py", "m/2.py"],
        hooks={"pre_apply": "pre.py", "post_apply": "post.py"} if hooks else {},
    )
    (folder / "m").mkdir(exist_ok=True)
    for name in ("m/1.py", "m/2.py", "pre.py", "post.py"):
        (folder / name).write_text(progress_script(reports))

    # When apply runs them
    apply.run(site.context("apply"))

    # Then the bar only ever moves forward, stays in 0..1, and ends full
    ratios = site.recorder.progress_reports
    assert ratios == sorted(ratios), ratios
    assert all(0.0 <= ratio <= 1.0 for ratio in ratios)
    assert ratios[-1] == 1.0
    # and the first hook's or migration's own 100 % fills only its unit of the step
    units = 2 + 1 + 1 + (2 if hooks else 0)
    assert max(ratios[: len(reports)]) <= 1 / units + 1e-9


def test_a_failing_migration_stops_apply_before_the_switch(site: Site) -> None:
    folder = release_dir(site.root, "1.1.0")
    script(folder / "m" / "001.sh", "echo first\n")
    script(folder / "m" / "002.sh", "echo 'relation users does not exist' >&2\nexit 3\n")
    script(folder / "m" / "003.sh", f"touch {site.tmp / 'third-ran'}\n")
    site.stage("1.1.0", migrations=["m/001.sh", "m/002.sh", "m/003.sh"])

    with pytest.raises(CommandFailed, match=r"^migration 2/3 m/002.sh failed with exit code 3$"):
        apply.run(site.context("apply"))

    assert installed_version(site.root) == "1.0.0"
    assert site.answered_version() == "1.0.0"
    assert not (site.tmp / "third-ran").exists()
    assert "relation users does not exist" in site.recorder.log_text()
    assert site.recorder.run["platform_changed"] is True


def test_a_hung_post_apply_hook_is_killed_with_its_children(site: Site) -> None:
    folder = release_dir(site.root, "1.1.0")
    pids = site.tmp / "pids"
    script(folder / "post.sh", f"sleep 600 &\necho $! >> {pids}\necho $$ >> {pids}\necho hanging\nwait\n")
    site.stage("1.1.0", hooks={"post_apply": "post.sh"})

    with pytest.raises(StepTimeout, match=r"post-apply post.sh was still running at the step's time limit"):
        apply.run(site.context("apply", limit=3))

    hook_processes = [Path(f"/proc/{pid}") for pid in pids.read_text().split()]
    assert len(hook_processes) == 2
    wait_for(lambda: not any(p.exists() for p in hook_processes), what="the hook and its child to be gone")
    assert "[post-apply post.sh] hanging" in site.recorder.log_text()


def test_sql_migrations_run_through_the_configured_runner(site: Site) -> None:
    runner = site.tmp / "fake-psql"
    script(runner, f'echo "$@" >> {site.tmp / "psql-calls"}\n')
    site.overrides["platform"] = {"migration_runners": {".sql": [str(runner), "-v", "ON_ERROR_STOP=1", "-f"]}}
    folder = release_dir(site.root, "1.1.0")
    (folder / "db").mkdir(parents=True)
    (folder / "db" / "001 add users.sql").write_text("create table users();\n")
    site.stage("1.1.0", migrations=["db/001 add users.sql"])

    apply.run(site.context("apply"))

    calls = (site.tmp / "psql-calls").read_text().splitlines()
    assert calls == [f"-v ON_ERROR_STOP=1 -f {(folder / 'db' / '001 add users.sql').resolve()}"]


def test_a_manifest_path_outside_the_release_is_refused(site: Site) -> None:
    site.stage("1.1.0", hooks={"pre_apply": "../../escape.sh"})

    with pytest.raises(StepFailed, match="points outside the release folder"):
        apply.run(site.context("apply"))
    assert installed_version(site.root) == "1.0.0"


def test_revert_switches_back_and_restarts(site: Site) -> None:
    site.stage("1.1.0")
    apply.run(site.context("apply"))
    assert site.answered_version() == "1.1.0"

    apply.revert(site.context("rollback"))

    assert installed_version(site.root) == "1.0.0"
    assert site.answered_version() == "1.0.0"
    assert "current → releases/1.0.0 again (was 1.1.0)" in site.recorder.events


def test_revert_before_apply_started_changes_nothing(site: Site) -> None:
    site.stage("1.1.0")

    apply.revert(site.context("rollback"))

    assert installed_version(site.root) == "1.0.0"
    assert site.recorder.events == ["apply had not started: the release was not changed"]


# -- verify -------------------------------------------------------------------


def test_verify_passes_leaves_maintenance_and_prunes(site: Site) -> None:
    # Given two older releases, a downtime update applied behind the maintenance page
    for old in ("0.8.0", "0.9.0"):
        write_release(release_dir(site.root, old), old)
    site.stage("1.1.0")
    maintenance.run(site.context("maintenance"))
    apply.run(site.context("apply"))
    assert get(site.front).status_code == 503  # type: ignore[union-attr]

    # When verify runs
    verify.run(site.context("verify"))

    # Then the platform is back in service on 1.1.0 and only keep_releases (2) are left
    answer = get(site.front)
    assert answer is not None and answer.status_code == 200 and "1.1.0" in answer.text
    assert not site.flag.exists()
    assert sorted(p.name for p in (site.root / "releases").iterdir()) == ["1.0.0", "1.1.0"]
    assert "pruned old releases: 0.8.0, 0.9.0 (keeping 2)" in site.recorder.events
    assert site.recorder.progress_reports[-1] == 1.0


def test_verify_fails_on_a_release_answering_500_and_never_reports_done(site: Site) -> None:
    site.stage("1.1.0", health_status=500)
    maintenance.run(site.context("maintenance"))
    apply.run(site.context("apply"))
    site.recorder.progress_reports.clear()

    with pytest.raises(StepTimeout, match=r"still failing at the step's time limit .*status 500, expected 200"):
        verify.run(site.context("verify", limit=1.5))

    assert site.flag.exists()  # the failure path decides about maintenance
    assert max(site.recorder.progress_reports) < 1.0
    assert installed_version(site.root) == "1.1.0"


def test_check_platform_names_each_failure(site: Site) -> None:
    site.overrides["verify"] = {
        "http": [
            {"url": site.health, "version": True},
            {"url": site.health, "contains": "no such text"},
            {"url": f"http://127.0.0.1:{free_port()}/", "timeout_seconds": 1},
        ],
        "commands": [["sh", "-c", "exit 2"], ["sleep", "30"], ["true"]],
        "command_timeout": "1s",
    }
    lines: list[str] = []

    failures = verify.check_platform(site.config(), expected_version="2.0.0", log=lines.append)

    assert failures[0] == f"GET {site.health}: reports version 1.0.0, expected 2.0.0"
    assert failures[1] == f"GET {site.health}: the answer does not contain 'no such text'"
    assert failures[2].startswith("GET http://127.0.0.1:") and "no answer" in failures[2]
    assert failures[3] == "sh -c exit 2: exit code 2, expected 0"
    assert failures[4] == "sleep 30: still running after 1s, killed"
    assert len(failures) == 5
    assert verify.check_platform(site.config(), expected_version=None, log=lines.append)[:1] == [
        f"GET {site.health}: the answer does not contain 'no such text'"
    ]


def test_a_check_failing_during_the_soak_fails_verify(site: Site) -> None:
    counter = site.tmp / "count"
    check = f"n=$(($(cat {counter} 2>/dev/null || echo 0) + 1)); echo $n > {counter}; [ $n -lt 3 ]"
    site.overrides["verify"] = {"commands": [{"shell": check}], "soak_seconds": 60}
    site.stage("1.1.0")
    apply.run(site.context("apply"))
    site.recorder.progress_reports.clear()

    with pytest.raises(StepFailed, match=r"exit code 1, expected 0 during the soak"):
        verify.run(site.context("verify"))

    assert counter.read_text().strip() == "3"
    assert max(site.recorder.progress_reports) < 1.0


def test_pruning_never_removes_the_previous_release(site: Site) -> None:
    # Given keep_releases 1, the previous release is still kept (rollback needs it)
    site.overrides["platform"] = {"keep_releases": 1}
    site.stage("1.1.0")
    apply.run(site.context("apply"))
    verify.run(site.context("verify"))
    assert current_release(site.root) == release_dir(site.root, "1.1.0").resolve()
    assert sorted(p.name for p in (site.root / "releases").iterdir()) == ["1.0.0", "1.1.0"]


# -- the maintenance window holds stop, switch, start, check ----------------------


def traced_services(site: Site, trace: Path) -> dict[str, list[Any]]:
    """The sample platform's service commands, each first appending its name to `trace`."""
    real = service_commands(site.root, site.app_port)
    return {name: [["sh", "-c", f"echo {name} >> {trace}"], *commands] for name, commands in real.items()}


def test_with_downtime_apply_starts_the_services_and_leaving_does_not_start_them_again(site: Site) -> None:
    # Given a downtime update and service commands that say when they run
    trace = site.tmp / "services"
    site.overrides["platform"] = {"services": traced_services(site, trace)}
    site.stage("1.1.0")

    # When maintenance, apply and verify run
    maintenance.run(site.context("maintenance"))
    apply.run(site.context("apply"))
    assert get(site.front).status_code == 503  # type: ignore[union-attr]  # still behind the page
    assert site.answered_version() == "1.1.0"  # started right after the switch: verify can check it
    verify.run(site.context("verify"))

    # Then the services were stopped once and started once (no restart of a stopped platform, no second start)
    assert trace.read_text().split() == ["stop", "start"]
    assert "services started (2 commands)" in site.recorder.events
    assert any(
        e.startswith("maintenance off after") and "services started after the switch" in e for e in site.recorder.events
    )
    answer = get(site.front)
    assert answer is not None and answer.status_code == 200 and "1.1.0" in answer.text
    assert not site.flag.exists()


def test_without_downtime_apply_restarts_and_nothing_is_stopped_or_started(site: Site) -> None:
    trace = site.tmp / "services"
    site.overrides["platform"] = {"services": traced_services(site, trace)}
    site.stage("1.0.1")

    apply.run(site.context("apply"))
    verify.run(site.context("verify"))

    assert trace.read_text().split() == ["restart"]
    assert site.answered_version() == "1.0.1"
    assert "services restarted (2 commands)" in site.recorder.events


def test_services_stopped_again_after_apply_started_them_are_started_when_leaving(site: Site) -> None:
    # Given apply started the services after the stop, then maintenance was entered again (they stop again)
    trace = site.tmp / "services"
    site.overrides["platform"] = {"services": traced_services(site, trace)}
    site.stage("1.1.0")
    maintenance.run(site.context("maintenance"))
    apply.run(site.context("apply"))
    maintenance.enter(site.context("rollback"))
    assert get(site.health) is None

    # When maintenance is left
    maintenance.leave(site.context("rollback"))

    # Then the start commands ran again: the platform is back
    assert trace.read_text().split() == ["stop", "start", "stop", "start"]
    assert site.answered_version() == "1.1.0"
    assert not site.flag.exists()


def test_with_no_start_commands_apply_still_restarts_after_a_stop(site: Site) -> None:
    """A site that brings its platform back with `restart` alone keeps working."""
    trace = site.tmp / "services"
    services = traced_services(site, trace)
    site.overrides["platform"] = {"services": {"stop": services["stop"], "start": [], "restart": services["restart"]}}
    site.stage("1.1.0")

    maintenance.run(site.context("maintenance"))
    apply.run(site.context("apply"))
    verify.run(site.context("verify"))

    assert trace.read_text().split() == ["stop", "restart"]
    assert site.answered_version() == "1.1.0"


def test_a_check_failing_at_first_is_tried_again_soon_not_an_interval_later(site: Site) -> None:
    """The platform answers only after the first failed check; the interval (120 s) is longer than
    the step's time limit (60 s), so only a short retry lets verify pass."""
    site.overrides["verify"] = {"interval_seconds": 120}
    site.stage("1.0.1")
    apply.run(site.context("apply"))
    services = service_commands(site.root, site.app_port)
    subprocess.run(services["stop"][0], check=True, capture_output=True)

    def start_after_the_first_failure() -> None:
        wait_for(
            lambda: any("not healthy yet" in e for e in site.recorder.events),
            what="the first check to fail",
        )
        subprocess.run(services["start"][0], check=True, capture_output=True)

    helper = threading.Thread(target=start_after_the_first_failure)
    helper.start()
    try:
        verify.run(site.context("verify", limit=60))
    finally:
        helper.join()

    healthy = [e for e in site.recorder.events if e.startswith("healthy: 1 check passed")]
    assert healthy and healthy[0] != "healthy: 1 check passed (attempt 1)"
    assert site.answered_version() == "1.0.1"
