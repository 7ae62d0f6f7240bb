"""HTTP health checks never wait past the step's time limit or its cancellation.

A real loopback server that accepts connections and never answers stands for
a hung platform. Each check runs in a thread of the test, which must finish
within a generous deadline: an unbounded wait would hold it for the check's
own `timeout_seconds` (400 s here).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config, parse_config
from pipeline.errors import StepAborted, StepTimeout
from pipeline.process import CancelToken
from states.verify import check_platform
from tests.support import SilentServer

GENEROUS = 60.0  # far below the check's 400 s, far above any bounded wait here


def config_with(tmp_path: Path, *urls: str, timeout_seconds: float = 400) -> Config:
    return parse_config(
        {
            "platform": {"product": "gts", "root": "platform"},
            "verify": {"http": [{"url": url, "timeout_seconds": timeout_seconds} for url in urls]},
        },
        base=tmp_path,
    )


def outcome_of(call: Callable[[], Any]) -> tuple[str, Any]:
    """Run `call` in a thread; ("returned", value) or ("raised", error), failing if it is still waiting."""
    result: list[tuple[str, Any]] = []

    def target() -> None:
        try:
            result.append(("returned", call()))
        except BaseException as error:
            result.append(("raised", error))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(GENEROUS)
    assert result, f"the check was still waiting after {GENEROUS:.0f}s: its wait is not bounded"
    return result[0]


@pytest.mark.parametrize("left", [0.5, 2.0])
def test_a_check_that_never_answers_ends_at_the_steps_time_limit(tmp_path: Path, left: float) -> None:
    with SilentServer() as server:
        # Given a check allowed 400 s, against a server that never answers, in a step with `left` seconds left
        config = config_with(tmp_path, server.url)
        # When one pass of the checks runs
        kind, value = outcome_of(
            lambda: check_platform(config, expected_version=None, log=lambda _line: None, deadline=time.time() + left)
        )
    # Then the step's time limit ends it, naming the request
    assert kind == "raised"
    assert isinstance(value, StepTimeout)
    assert str(value) == f"GET {server.url} was still waiting for an answer at the step's time limit"
    assert server.connections  # it really connected and waited


def test_a_check_after_the_time_limit_does_not_start(tmp_path: Path) -> None:
    with SilentServer() as server:
        config = config_with(tmp_path, server.url)
        kind, value = outcome_of(
            lambda: check_platform(config, expected_version=None, log=lambda _line: None, deadline=time.time() - 1)
        )
    assert kind == "raised" and isinstance(value, StepTimeout)
    assert "could not start: the step's time limit had passed" in str(value)
    assert not server.connections


@pytest.mark.parametrize("resumable", [True, False])
def test_a_cancellation_interrupts_a_check_that_never_answers(tmp_path: Path, resumable: bool) -> None:
    with SilentServer() as server:
        # Given a check allowed 400 s against a silent server, in a step with an hour left
        config = config_with(tmp_path, server.url)
        cancel = CancelToken()
        # When the daemon is stopped while the check waits (SIGTERM cancels the step's token)
        timer = threading.Timer(1.0, lambda: cancel.cancel("the daemon is stopping", resumable=resumable))
        timer.start()
        try:
            kind, value = outcome_of(
                lambda: check_platform(
                    config, expected_version=None, log=lambda _line: None, deadline=time.time() + 3600, cancel=cancel
                )
            )
        finally:
            timer.cancel()
    # Then the check stops waiting, and says whether the run may resume
    assert kind == "raised" and isinstance(value, StepAborted)
    assert value.resumable is resumable
    assert str(value) == f"GET {server.url} was abandoned: the daemon is stopping"


def test_without_a_time_limit_the_checks_own_timeout_makes_it_a_failure(tmp_path: Path) -> None:
    with SilentServer() as server:
        # Given a check allowed 1 s and no step time limit (preflight), and a second check that is fine
        config = config_with(tmp_path, server.url, server.url.replace("/health", "/other"), timeout_seconds=1)
        lines: list[str] = []
        # When one pass runs
        kind, value = outcome_of(lambda: check_platform(config, expected_version=None, log=lines.append))
    # Then each silent check is a failure of that pass, not an error of the step
    assert kind == "returned"
    urls = [server.url, server.url.replace("/health", "/other")]
    assert [failure.split(": no answer (")[0] for failure in value] == [f"GET {url}" for url in urls]
    assert lines == [f"check failed: {failure}" for failure in value]
