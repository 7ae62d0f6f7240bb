"""Every wait of a step is bounded by its time limit and by the daemon's stop, with the real daemon.

The platform's health endpoint is a real loopback server that accepts and
never answers; each check may wait 400 s (`timeout_seconds`). Before, such a
check kept `prereq` minutes past its 5 s limit and a SIGTERM did not stop it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Site, wait_for
from tests.support import SilentServer


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


def hanging_check(site: Site, server: SilentServer, **timeouts: str) -> None:
    site.write_config(
        verify={"http": [{"url": server.url, "timeout_seconds": 400}], "interval_seconds": 0.5},
        policy={"timeouts": timeouts},
    )


def test_a_health_check_that_never_answers_ends_prereq_at_its_time_limit(site: Site, silent: SilentServer) -> None:
    # Given prereq limited to 5 s and a health check allowed 400 s against a platform that never answers
    hanging_check(site, silent, prereq="5s")
    site.start_daemon()
    # When an update arrives
    site.drop(site.pack("1.0.1"))
    # Then prereq ends at its limit (not 400 s later) and the run is rejected, naming the request
    run = site.wait_outcome(1, timeout=90)
    assert run["outcome"] == "rejected"
    assert run["error"] == f"GET {silent.url} was still waiting for an answer at the step's time limit"
    assert silent.connections
    prereq = [timing for timing in site.show(1)["steps"] if timing["step"] == "prereq"]
    assert prereq and prereq[0]["result"] == "failed"


def test_sigterm_stops_prereq_while_its_health_check_hangs_and_the_run_resumes_later(
    site: Site, silent: SilentServer
) -> None:
    # Given prereq (limit 10 min) waiting on a health check that never answers
    hanging_check(site, silent, prereq="10m")
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "prereq")
    wait_for(lambda: silent.connections, what="the health check to be waiting")
    # When the daemon gets one SIGTERM
    # Then it stops at once (prereq changes nothing), and the run waits, queued, for the next start
    assert daemon.stop(timeout=30) == 0, daemon.output()[-3000:]
    run = site.show(1)
    assert run["outcome"] is None and run["step"] == "queued"
    assert any("the daemon is stopping: nothing was changed" in event["message"] for event in run["events"])


def test_a_health_check_that_hangs_in_verify_ends_verify_at_its_time_limit_and_rolls_back(site: Site) -> None:
    # Given a platform healthy for prereq's check, hanging from verify's on, and verify limited to 3 s
    with SilentServer(answer_first=1) as server:
        hanging_check(site, server, verify="3s")
        site.start_daemon()
        # When an update is applied
        site.drop(site.pack("1.0.1"))
        # Then verify ends at its limit and the platform is put back
        run = site.wait_outcome(1, timeout=90)
    assert run["outcome"] == "rolled_back", run
    assert "verify: the new release: still failing at the step's time limit" in run["error"]
    assert site.status()["installed_version"] == "1.0.0"


def test_a_second_sigterm_aborts_verify_while_its_health_check_hangs(site: Site) -> None:
    # Given verify (limit 10 min) waiting on a health check that never answers
    with SilentServer(answer_first=1) as server:
        hanging_check(site, server, verify="10m")
        daemon = site.start_daemon()
        site.drop(site.pack("1.0.1"))
        site.wait_step(1, "verify")
        wait_for(lambda: server.connections, what="verify's health check to be waiting")
        # When the daemon gets SIGTERM (verify may change the platform: it goes on to a safe point) and again
        daemon.proc.send_signal(15)
        wait_for(lambda: "stopping at a safe point" in daemon.output(), what="the first SIGTERM to be handled")
        daemon.proc.send_signal(15)
        # Then the second one ends the waiting check at once and the daemon exits
        daemon.proc.wait(timeout=60)
    run = site.show(1)
    assert run["outcome"] == "interrupted", run
    assert "was abandoned: aborted by a second SIGTERM" in run["error"]
