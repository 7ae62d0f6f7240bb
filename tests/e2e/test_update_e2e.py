"""Updates end to end: the real daemon, real signed archives, the sample platform answering real HTTP.

The sample platform is what a site runs: the application (started, stopped and
restarted by the configured commands, reporting its version on /health) behind
a front that stands in for nginx with dropgate's maintenance snippet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pipeline.sample_platform import front_command, release_files, service_commands, write_release
from tests.conftest import Site, free_port, wait_for


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5, trust_env=False)
    except httpx.HTTPError:
        return None


@dataclass
class Watcher:
    """Asks the platform's front page over and over while an update runs; what visitors saw."""

    url: str
    flag: Path
    statuses: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    retry_after: set[str] = field(default_factory=set)
    flag_seen: bool = False
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        with httpx.Client(trust_env=False, timeout=5) as client:
            while not self.stop.is_set():
                self.flag_seen = self.flag_seen or self.flag.exists()
                try:
                    response = client.get(self.url)
                except httpx.HTTPError:
                    self.statuses.append(0)
                    continue
                self.statuses.append(response.status_code)
                if response.status_code == 503:
                    self.retry_after.add(response.headers.get("Retry-After", ""))
                elif "x-platform-version" in response.headers:
                    self.versions.append(response.headers["x-platform-version"])

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


class SamplePlatform:
    """The site's platform replaced by the sample application, with a front in front of it."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.app_port = free_port()
        self.front_port = free_port()
        self.flag = site.root / "run" / "maintenance"
        write_release(site.platform / "releases" / "1.0.0", "1.0.0")
        self.services = service_commands(site.platform, self.app_port)
        site.write_config(
            platform={"services": self.services, "keep_releases": 2},
            maintenance={"retry_after": "2m"},
            verify={"http": [{"url": f"{self.backend}/health", "version": True}], "interval_seconds": 0.2},
        )
        subprocess.run(self.services["start"][0], check=True, capture_output=True)
        status = f"http://127.0.0.1:{site.port}/"
        self.front = subprocess.Popen(
            front_command(self.front_port, self.app_port, self.flag, status), stdout=subprocess.DEVNULL
        )
        wait_for(lambda: get(self.url) is not None, what="the front to answer")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.front_port}/"

    @property
    def backend(self) -> str:
        return f"http://127.0.0.1:{self.app_port}"

    def version(self) -> str | None:
        answer = get(f"{self.backend}/health")
        return answer.json()["version"] if answer is not None else None

    def pack(
        self, version: str, *, health_status: int = 200, files: dict[str, str] | None = None, **manifest: object
    ) -> Path:
        """A signed archive of the sample platform's release `version` (plus `files`)."""
        payload: dict[str, str | bytes] = {**release_files(version, health_status=health_status), **(files or {})}
        return self.site.pack(version, files=payload, **manifest)

    def close(self) -> None:
        for daemon in self.site.daemons:  # first, so that no run starts the application again
            daemon.stop()
        self.front.terminate()
        self.front.wait(timeout=10)
        subprocess.run(self.services["stop"][0], check=True, capture_output=True)


@pytest.fixture
def platform(site: Site) -> Iterator[SamplePlatform]:
    sample = SamplePlatform(site)
    try:
        yield sample
    finally:
        sample.close()


def messages(site: Site, run_id: int) -> list[str]:
    return [event["message"] for event in site.show(run_id)["events"]]


def test_a_patch_is_applied_live_and_the_platform_answers_throughout(site: Site, platform: SamplePlatform) -> None:
    # Given the platform on 1.0.0 in service, and the daemon
    site.start_daemon()

    # When a patch 1.0.0 → 1.0.1 is dropped while visitors keep asking for pages
    with Watcher(platform.url, platform.flag) as watcher:
        site.drop(platform.pack("1.0.1"))
        run = site.wait_outcome(1, timeout=90)
        wait_for(lambda: "1.0.1" in watcher.versions, what="a visitor to see 1.0.1")

    # Then it succeeded without maintenance: every answer was a 200, never a 503, and 1.0.1 is live
    assert run["outcome"] == "succeeded", run["error"]
    assert run["downtime"] is False
    assert "patch, applied live" in run["downtime_reason"]
    assert set(watcher.statuses) == {200}, sorted(set(watcher.statuses))
    assert not watcher.flag_seen
    assert watcher.versions[0] == "1.0.0" and watcher.versions[-1] == "1.0.1"
    assert platform.version() == "1.0.1"
    assert "maintenance" not in site.show(1)["steps"]
    assert site.status()["installed_version"] == "1.0.1"


def test_a_minor_update_takes_downtime_behind_a_503_and_measures_it(site: Site, platform: SamplePlatform) -> None:
    # Given an update 1.0.0 → 1.1.0 whose pre-apply hook holds apply until the test has seen the 503
    seen = site.root / "test-saw-503"
    hook = f'#!/bin/sh\necho "waiting for the visitor"\nwhile [ ! -e "{seen}" ]; do sleep 0.05; done\necho "go"\n'
    archive = platform.pack("1.1.0", files={"hooks/pre.sh": hook}, hooks={"pre_apply": "hooks/pre.sh"})
    site.start_daemon()

    with Watcher(platform.url, platform.flag) as watcher:
        # When it is dropped
        site.drop(archive)

        # Then visitors get the maintenance page with Retry-After, and the status page stays reachable
        wait_for(lambda: 503 in watcher.statuses, what="the maintenance page")
        status_page = get(platform.url + "dropgate/status.json")
        assert status_page is not None and status_page.status_code == 200
        assert status_page.json()["run"]["step"] in ("maintenance", "apply")
        assert site.metric("dropgate_maintenance_active") == 1
        # And the hook's output is in the run log while it runs
        wait_for(
            lambda: any("waiting for the visitor" in line for line in site.show(1).get("log", [])),
            what="the hook's output in `show --log`",
        )
        seen.touch()
        run = site.wait_outcome(1, timeout=90)
        wait_for(lambda: watcher.statuses[-1] == 200, what="the platform back in service")

    # And afterwards the flag is gone, 1.1.0 answers, the downtime is measured
    assert run["outcome"] == "succeeded", run["error"]
    assert run["downtime"] is True and "major or minor" in run["downtime_reason"]
    assert watcher.flag_seen and not platform.flag.exists()
    assert watcher.retry_after == {"120"}
    assert set(watcher.statuses) <= {200, 503}
    assert watcher.versions[0] == "1.0.0" and watcher.versions[-1] == "1.1.0"
    assert platform.version() == "1.1.0"
    assert any(m.startswith("maintenance off after") for m in messages(site, 1))
    downtime = site.metric("dropgate_last_downtime_seconds")
    assert downtime is not None and downtime > 0
    assert site.metric("dropgate_maintenance_active") == 0
    assert site.show(1)["facts"]["downtime_seconds"] == pytest.approx(downtime, abs=0.01)


def test_a_failing_migration_is_rolled_back_and_the_old_release_serves_again(
    site: Site, platform: SamplePlatform
) -> None:
    # Given a minor update whose second migration fails
    files = {
        "migrations/001.sh": "#!/bin/sh\necho 'adding column'\n",
        "migrations/002.sh": "#!/bin/sh\necho 'ERROR: relation \"users\" does not exist' >&2\nexit 3\n",
    }
    archive = platform.pack("1.1.0", files=files, migrations=["migrations/001.sh", "migrations/002.sh"])
    site.start_daemon()

    # When it is dropped
    site.drop(archive)
    run = site.wait_outcome(1, timeout=90)

    # Then it is rolled back: 1.0.0 answers, maintenance is over, the cause is named, the gate is blocked
    assert run["outcome"] == "rolled_back"
    assert "migration 2/2 migrations/002.sh failed with exit code 3" in run["error"]
    assert platform.version() == "1.0.0"
    answer = get(platform.url)
    assert answer is not None and answer.status_code == 200
    assert not platform.flag.exists()
    assert "migration 1/2 migrations/001.sh" in messages(site, 1)
    assert any('relation "users" does not exist' in line for line in site.show(1)["log"])
    assert site.status()["gate"] == "blocked"


def test_a_post_apply_hook_hanging_past_the_limit_is_killed_with_its_children(
    site: Site, platform: SamplePlatform
) -> None:
    # Given a patch whose post-apply hook starts a child and never ends, and a 4 s limit for apply
    pids = site.root / "hook-pids"
    hook = f'#!/bin/sh\nsleep 600 &\necho $! >> "{pids}"\necho $$ >> "{pids}"\necho "hanging"\nwait\n'
    archive = platform.pack("1.0.1", files={"hooks/post.sh": hook}, hooks={"post_apply": "hooks/post.sh"})
    site.write_config(policy={"timeouts": {"apply": "4s"}})
    site.start_daemon()

    # When it is dropped
    site.drop(archive)
    run = site.wait_outcome(1, timeout=90)

    # Then apply fails at its limit, the hook and its child are gone, and 1.0.0 serves again
    assert run["outcome"] == "rolled_back"
    assert "post-apply post.sh was still running at the step's time limit and was killed" in run["error"]
    hook_processes = [Path(f"/proc/{pid}") for pid in pids.read_text().split()]
    assert len(hook_processes) == 2
    wait_for(lambda: not any(p.exists() for p in hook_processes), what="the hook and its child to be gone")
    assert platform.version() == "1.0.0"


def test_a_release_answering_500_fails_verify_and_is_rolled_back(site: Site, platform: SamplePlatform) -> None:
    # Given a patch whose /health answers 500, and 2 s for verify
    site.write_config(policy={"timeouts": {"verify": "2s"}})
    site.start_daemon()

    # When it is dropped
    site.drop(platform.pack("1.0.1", health_status=500))
    run = site.wait_outcome(1, timeout=90)

    # Then verify fails naming the check, and the rollback path puts 1.0.0 back in service
    assert run["outcome"] == "rolled_back"
    assert "status 500, expected 200" in run["error"]
    assert any("current → releases/1.0.1" in m for m in messages(site, 1))
    assert platform.version() == "1.0.0"
    assert (site.platform / "current").readlink() == Path("releases/1.0.0")
    assert not platform.flag.exists()
    assert site.status()["gate"] == "blocked"


def test_hold_leaves_maintenance_on_and_the_gate_blocked(site: Site, platform: SamplePlatform) -> None:
    # Given policy hold and a minor update (downtime) whose /health answers 500
    site.write_config(policy={"on_failure": "hold", "timeouts": {"verify": "2s"}})
    site.start_daemon()

    # When it is dropped, and another archive after it
    site.drop(platform.pack("1.1.0", health_status=500))
    run = site.wait_outcome(1, timeout=90)
    site.drop(platform.pack("1.1.1"))
    wait_for(lambda: len(site.status()["queued"]) == 1, what="the second archive to be queued")

    # Then the run failed and everything is left as it failed: 1.1.0 current, maintenance on, gate blocked
    assert run["outcome"] == "failed"
    assert "status 500, expected 200" in run["error"]
    assert run["maintenance"] is True
    assert platform.flag.exists()
    answer = get(platform.url)
    assert answer is not None and answer.status_code == 503
    assert (site.platform / "current").readlink() == Path("releases/1.1.0")
    status = site.status()
    assert status["gate"] == "blocked"
    assert site.metric("dropgate_maintenance_active") == 1
    assert site.run(2)["outcome"] is None  # type: ignore[index]


def test_the_demo_runs_its_sample_updates_and_stops_everything(tmp_path: Path) -> None:
    # Given nothing but an empty folder
    folder = tmp_path / "demo"

    # When a newcomer runs the README's first command with --once
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--dir", str(folder), "--once"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Then every sample run ended as expected, with the patch live and the minor update behind a 503
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 of 3 runs ended as expected." in result.stdout
    assert "gts.1.0.1.tgz: succeeded: 1.0.0 → 1.0.1, no downtime" in result.stdout
    assert "gts.1.1.0.tgz: succeeded: 1.0.1 → 1.1.0, downtime" in result.stdout
    assert "visitors get: 503 maintenance page (Retry-After 300)" in result.stdout
    assert "gts.1.2.0.tgz: rejected:" in result.stdout
    # And the sample platform it started is stopped again
    app_port = json.loads((folder / ".dropgate-demo").read_text())["app_port"]
    assert get(f"http://127.0.0.1:{app_port}/health") is None
