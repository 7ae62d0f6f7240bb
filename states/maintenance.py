"""Step `maintenance` (SPEC 5.3): the flag for the web server, then stop what must stop.

Only taken when the update needs downtime (SPEC 5.4, decided in `validate`).
The flag file is what the web server tests (see `deploy/nginx/`): while it
exists, visitors get a 503 maintenance page with `Retry-After`. Its content is
JSON saying which run set it, since when and the Retry-After in seconds.

The run's journal always says whether maintenance is on: it is recorded before
the flag is written and cleared only once the flag is gone, so a crash in
between errs on the side of "still on", which `leave` then puts right.

Entering maintenance changes the platform (`platform_changed`), recorded before
the flag is written; how far the stop commands got is the fact `services_stop`
(started/done/total, saved before and after each), so a rollback after a crash
starts the services only if stopping them had begun (`pipeline.changes`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.changes import apply_began, services_stopped
from pipeline.config import Config
from pipeline.context import StepContext
from pipeline.errors import StepFailed


def required(config: Config, facts: Mapping[str, Any]) -> bool:
    """Downtime was decided in `validate` (the archive asks for it, or major/minor changes)."""
    return bool(facts.get("downtime"))


def run(ctx: StepContext) -> None:
    enter(ctx)


def is_on(config: Config) -> bool:
    """Whether the maintenance flag exists (whoever set it)."""
    return config.maintenance.flag_file.exists()


def write_flag(flag: Path, content: Mapping[str, Any]) -> None:
    """Write the flag atomically: a complete file renamed into place, then the folder synced."""
    flag.parent.mkdir(parents=True, exist_ok=True)
    tmp = flag.with_name(f".{flag.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(dict(content), handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(flag)
    fd = os.open(flag.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def enter(ctx: StepContext) -> None:
    """Write the flag, then run `platform.services.stop`; entering again keeps the first `maintenance_since`."""
    config = ctx.config
    flag = config.maintenance.flag_file
    since = ctx.facts.get("maintenance_since")
    commands = config.platform.services.stop
    if since is None or not flag.exists():
        since = since if since is not None else ctx.now()
        ctx.save_facts(maintenance_since=since, services_stop={"started": 0, "done": 0, "total": len(commands)})
        ctx.update_run(maintenance=True, platform_changed=True)
        retry_after = int(config.maintenance.retry_after)
        content = {
            "run_id": ctx.run_id,
            "since": since,
            "retry_after": retry_after,
            "from_version": ctx.facts.get("from_version"),
            "to_version": ctx.facts.get("to_version"),
        }
        try:
            write_flag(flag, content)
        except OSError as error:
            changed = flag.exists() or apply_began(ctx.facts)
            ctx.update_run(maintenance=flag.exists(), platform_changed=changed)
            raise StepFailed(f"cannot write the maintenance flag {flag}: {error.strerror}") from error
        ctx.event(f"maintenance on: {flag} written (Retry-After {retry_after}s)")
    else:
        ctx.update_run(maintenance=True)
        ctx.save_facts(services_stopped=ctx.now())  # stopped again: services started before count no more
        ctx.event(f"maintenance already on since {_clock(since)} ({flag})")
    for index, command in enumerate(commands, start=1):
        ctx.save_facts(services_stop={"started": index, "done": index - 1, "total": len(commands)})
        ctx.run_command(command, what=f"stop {index}/{len(commands)}", progress=False)
        ctx.save_facts(services_stop={"started": index, "done": index, "total": len(commands)})
        ctx.progress(index / len(commands), f"stopped {index} of {len(commands)}")
    if commands:
        ctx.event(f"services stopped ({len(commands)} command{'s' if len(commands) != 1 else ''})")
    ctx.progress(1.0)


def leave(ctx: StepContext) -> None:
    """Run `platform.services.start` (if stopping them had begun), then remove the flag; record the downtime.

    The start commands are not run again when `apply` ran them after the switch
    (fact `services_started`, later than the last stop).

    Idempotent, and a no-op when this run never entered maintenance (a flag
    set by someone else is left alone). If a start command fails, the flag
    stays and the run keeps saying maintenance is on.
    """
    config = ctx.config
    flag = config.maintenance.flag_file
    since = ctx.facts.get("maintenance_since")
    if since is None:
        return
    commands = config.platform.services.start if services_stopped(ctx.facts) else []
    stopped = max(float(since), float(ctx.facts.get("services_stopped") or 0.0))
    already = bool(commands) and float(ctx.facts.get("services_started") or 0.0) >= stopped
    if already:
        commands = []  # apply started them after the switch (and verify found them healthy): not again
    for index, command in enumerate(commands, start=1):
        ctx.run_command(command, what=f"start {index}/{len(commands)}", progress=False, starts_services=True)
    flag.unlink(missing_ok=True)
    window = max(0.0, ctx.now() - float(since))
    total = float(ctx.facts.get("downtime_seconds") or 0.0) + window
    ctx.save_facts(maintenance_since=None, services_stop=None, downtime_seconds=round(total, 3))
    ctx.update_run(maintenance=False)
    started = "services started, " if commands else "services started after the switch, " if already else ""
    ctx.event(f"maintenance off after {window:.1f}s: {started}{flag} removed")


@contextmanager
def maintenance_mode(ctx: StepContext) -> Iterator[None]:
    """Maintenance for the duration of the block, always left on exit.

    If leaving fails while the block raised, the block's error is the one that
    propagates (the failure to leave is an event, and the run still says
    maintenance is on).
    """
    enter(ctx)
    try:
        yield
    except BaseException:
        try:
            leave(ctx)
        except Exception as error:  # the original error matters more
            ctx.event(f"could not leave maintenance: {error}")
        raise
    leave(ctx)


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))
