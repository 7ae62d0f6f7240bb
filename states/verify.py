"""Step `verify` (SPEC 5.6): the new release proves itself, then the platform returns to service.

The configured checks (HTTP status, body text, the version the platform
reports; commands) start at once and, while failing, are retried after a short
backoff growing to `verify.interval_seconds`, until they all pass or the step's
time limit ends the step. No check waits past the step's time limit or its
cancellation: a request runs in a thread the step leaves behind when either
comes (its own timeout is cut to the time left, so it ends by the time limit
at the latest), as a command's process group is killed. Then maintenance is left (if this
run entered it), the checks must pass again with the platform in service, and
for `verify.soak_seconds` after that. Only then are releases beyond
`platform.keep_releases` pruned: the live and the previous release never are.
"""

from __future__ import annotations

import functools
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from pipeline.config import Config, HttpCheck
from pipeline.context import StepContext
from pipeline.errors import CommandFailed, StepAborted, StepFailed, StepTimeout
from pipeline.process import CancelToken, run_command
from pipeline.release import prune_releases
from states import maintenance

WAIT_SLICE_SECONDS = 0.1  # how soon a cancellation or the time limit is seen while a request waits


def _reported_version(response: httpx.Response, expected: str) -> str | None:
    """The version an answer reports: a JSON `version` field, else the expected version as a word of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "version" in body:
        return str(body["version"])
    if re.search(rf"(?<![\w.]){re.escape(expected)}(?![\w.])", response.text):
        return expected
    return None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The TLS settings of the checks, built once: loading the CA bundle takes tens of milliseconds,
    which every pass inside the maintenance window would otherwise pay again."""
    return httpx.create_ssl_context(trust_env=False)


class _Request(threading.Thread):
    """One GET in its own thread, so that the step can stop waiting for it."""

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__(name="dropgate-http-check", daemon=True)
        self.url = url
        self.timeout = timeout
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            with httpx.Client(trust_env=False, follow_redirects=False, verify=_tls_context()) as client:
                self.response = client.get(self.url, timeout=self.timeout)
        except Exception as error:  # handed to the step, which reports it as the check's failure
            self.error = error
        finally:
            self.done.set()


def fetch(
    url: str,
    timeout: float,
    *,
    deadline: float | None = None,
    cancel: CancelToken | None = None,
    now: Callable[[], float] = time.time,
) -> httpx.Response:
    """GET `url` within `timeout` seconds, never past `deadline` (StepTimeout) nor a cancellation
    (StepAborted); httpx.TimeoutException when it takes longer than `timeout`."""
    started = now()
    limit = timeout if deadline is None else min(timeout, deadline - started)
    if limit <= 0:
        raise StepTimeout(f"GET {url} could not start: the step's time limit had passed")
    request = _Request(url, limit)
    request.start()
    while not request.done.wait(WAIT_SLICE_SECONDS):
        if cancel is not None and cancel.cancelled:
            raise StepAborted(f"GET {url} was abandoned: {cancel.reason}", resumable=cancel.resumable)
        if deadline is not None and now() >= deadline:
            raise StepTimeout(f"GET {url} was still waiting for an answer at the step's time limit")
        if now() - started >= limit:
            raise httpx.TimeoutException(f"no answer within {limit:g}s")
    if request.error is not None:
        bound_by_step = deadline is not None and deadline - started < timeout
        if bound_by_step and isinstance(request.error, httpx.TimeoutException):
            # The request's own timeout was the step's remaining time: it is the step that ran out
            # (on a loaded machine httpx may notice before this loop does).
            raise StepTimeout(f"GET {url} was still waiting for an answer at the step's time limit") from request.error
        raise request.error
    assert request.response is not None
    return request.response


def _check_http(
    check: HttpCheck,
    expected_version: str | None,
    *,
    deadline: float | None,
    cancel: CancelToken | None,
    now: Callable[[], float],
) -> str | None:
    try:
        response = fetch(check.url, check.timeout_seconds, deadline=deadline, cancel=cancel, now=now)
    except httpx.HTTPError as error:
        return f"GET {check.url}: no answer ({error or type(error).__name__})"
    if response.status_code != check.status:
        return f"GET {check.url}: status {response.status_code}, expected {check.status}"
    if check.contains is not None and check.contains not in response.text:
        return f"GET {check.url}: the answer does not contain {check.contains!r}"
    if check.version and expected_version is not None:
        reported = _reported_version(response, expected_version)
        if reported is None:
            return f"GET {check.url}: reports no version, expected {expected_version}"
        if reported != expected_version:
            return f"GET {check.url}: reports version {reported}, expected {expected_version}"
    return None


def check_platform(
    config: Config,
    *,
    expected_version: str | None,
    log: Callable[[str], None],
    env: Mapping[str, str] | None = None,
    deadline: float | None = None,
    cancel: CancelToken | None = None,
    now: Callable[[], float] = time.time,
) -> list[str]:
    """One pass of every configured check; the failures as one-line messages (empty: healthy).

    `expected_version` None skips the version comparison. Each request may take
    its `timeout_seconds`, each command `verify.command_timeout` at most; none
    waits past `deadline` (StepTimeout, like any step command) or `cancel`
    (StepAborted).
    """
    failures: list[str] = []
    for check in config.verify.http:
        failure = _check_http(check, expected_version, deadline=deadline, cancel=cancel, now=now)
        if failure is not None:
            log(f"check failed: {failure}")
            failures.append(failure)
    commands = config.verify.commands
    for index, command in enumerate(commands, start=1):
        cap = now() + config.verify.command_timeout
        limit = cap if deadline is None else min(cap, deadline)
        what = f"check {index}/{len(commands)}"
        try:
            result = run_command(
                command, log=log, what=what, env=env, deadline=limit, cancel=cancel, check=False, now=now
            )
        except StepTimeout:
            if deadline is not None and now() >= deadline:
                raise
            failures.append(f"{command.describe()}: still running after {config.verify.command_timeout:g}s, killed")
            continue
        except CommandFailed as error:
            failures.append(str(error))
            continue
        if result.returncode != 0:
            failures.append(f"{command.describe()}: exit code {result.returncode}, expected 0")
    return failures


def _one_pass(ctx: StepContext) -> list[str]:
    """check_platform inside the step: its log, environment, time limit and cancellation."""
    return check_platform(
        ctx.config,
        expected_version=ctx.facts.get("to_version"),
        log=ctx.log,
        env=ctx.environment(),
        deadline=ctx.deadline,
        cancel=ctx.cancel,
        now=ctx.now,
    )


FIRST_RETRY_SECONDS = 0.02  # a failing check is tried again this soon, then twice as late each time


def _until_healthy(ctx: StepContext, phase: str, low: float, high: float) -> int:
    """Repeat the checks until they pass; the number of attempts. Progress stays in [low, high).

    The first pass starts at once; while failing, the checks are tried again after
    20 ms, then twice as late each time, up to `verify.interval_seconds`: a platform
    that answers 30 ms after its start is seen 30 ms after, not an interval later.
    """
    config = ctx.config
    interval = config.verify.interval_seconds
    delay = min(FIRST_RETRY_SECONDS, interval)
    started = ctx.now()
    attempt = 0
    failures: list[str] = []
    try:
        while True:
            attempt += 1
            failures = _one_pass(ctx)
            if not failures:
                return attempt
            if attempt == 1:
                ctx.event(f"{phase}: not healthy yet ({failures[0]}); checking again, at most every {interval:g}s")
            share = 0.0
            if ctx.deadline is not None and ctx.deadline > started:
                share = min(1.0, (ctx.now() - started) / (ctx.deadline - started))
            ctx.progress(low + (high - low) * 0.99 * share, f"{phase}: attempt {attempt}, {len(failures)} failing")
            ctx.wait(delay)
            delay = min(delay * 2, interval)
    except StepTimeout:
        summary = failures[0] if failures else "a check was still running"
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise StepTimeout(
            f"verify: {phase}: still failing at the step's time limit after {attempt} attempts: {summary}{more}"
        ) from None


def _soak(ctx: StepContext, low: float, high: float) -> None:
    """The checks must keep passing for `verify.soak_seconds` with the platform in service."""
    config = ctx.config
    seconds = config.verify.soak_seconds
    started = ctx.now()
    end = started + seconds
    ctx.event(f"soak: the checks must keep passing for {seconds:g}s")
    while (left := end - ctx.now()) > 0:
        ctx.wait(min(config.verify.interval_seconds, left))
        failures = _one_pass(ctx)
        if failures:
            raise StepFailed(f"verify: {failures[0]} during the soak, {ctx.now() - started:.0f}s in")
        ctx.progress(low + (high - low) * min(1.0, (ctx.now() - started) / seconds), "soak")
    ctx.event(f"soak passed: {seconds:g}s healthy in service")


def _prune(ctx: StepContext) -> None:
    root = ctx.config.platform.root
    previous = ctx.facts.get("previous_release")
    try:  # the live release is always kept; the previous one too, for a rollback
        removed = prune_releases(root, ctx.config.platform.keep_releases, [Path(previous)] if previous else [])
    except OSError as error:
        ctx.event(f"could not prune old releases in {root / 'releases'}: {error}")
        return
    if removed:
        ctx.event(f"pruned old releases: {', '.join(removed)} (keeping {ctx.config.platform.keep_releases})")


def run(ctx: StepContext) -> None:
    config = ctx.config
    count = len(config.verify.http) + len(config.verify.commands)
    if count == 0:
        ctx.event("no checks configured (verify.http, verify.commands): nothing proves the new release")
    ctx.progress(0.0, "checking the new release")
    attempts = _until_healthy(ctx, "the new release", 0.0, 0.5)
    ctx.event(f"healthy: {count} check{'s' if count != 1 else ''} passed (attempt {attempts})")
    ctx.progress(0.5, "checks passed")
    if ctx.facts.get("maintenance_since") is not None:
        maintenance.leave(ctx)
        ctx.progress(0.6, "in service again")
        attempts = _until_healthy(ctx, "in service", 0.6, 0.7)
        if attempts > 1:
            ctx.event(f"healthy in service (attempt {attempts})")
    if config.verify.soak_seconds > 0:
        _soak(ctx, 0.7, 0.95)
    _prune(ctx)
    ctx.progress(1.0, "verified")
