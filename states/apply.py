"""Step `apply` (SPEC 5.5): pre-apply hook, migrations, switch `current`, restart, post-apply hook.

In an update with downtime the services were stopped by `maintenance`: instead
of `restart`, the `start` commands run after the switch (leaving maintenance
then does not run them again), so the window holds stop, switch, start, check.

Everything slow happened before: `validate` staged the release into
`releases/<version>/` and `backup` took the snapshot while the platform was in
service. What is left here is what truly needs the platform: the vendor's hooks
and migrations (run from the new release folder, in the manifest's order,
each in its own process group under the step's time limit, output in the run
log) and one atomic rename of the `current` symlink.

The run records the release `current` pointed to, and that the platform is
being changed, before the first thing that may change it (the pre-apply hook).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

from pipeline.changes import services_stopped
from pipeline.config import CommandSpec
from pipeline.context import StepContext
from pipeline.errors import CommandFailed, RollbackFailed, StepFailed, StepTimeout
from pipeline.release import current_release, switch_current


def script_command(path: Path, runners: Mapping[str, CommandSpec]) -> CommandSpec:
    """How to run a hook or migration: its suffix's runner (path appended), else the file itself.

    A file without the executable bit but with a `#!` line runs with that
    interpreter, since archive payloads do not always keep modes.
    """
    runner = runners.get(path.suffix)
    if runner is not None:
        if runner.shell is not None:
            # The path is the shell's $1, never part of the script text.
            return CommandSpec(argv=("/bin/sh", "-c", f'{runner.shell} "$1"', "sh", str(path)))
        return CommandSpec(argv=(*runner.argv, str(path)))
    if os.access(path, os.X_OK):
        return CommandSpec(argv=(str(path),))
    with open(path, "rb") as handle:
        first = handle.readline(256)
    if first.startswith(b"#!"):
        interpreter = shlex.split(first[2:].decode("utf-8", "replace").strip())
        if interpreter:
            return CommandSpec(argv=(*interpreter, str(path)))
    suffix = path.suffix or "(no suffix)"
    raise CommandFailed(
        f"{path.name}: not executable, no #! line, and no platform.migration_runners entry for {suffix}"
    )


def release_file(release: Path, relative: str, what: str) -> Path:
    """A file the manifest names, confined to the release folder."""
    base = release.resolve()
    path = (base / relative).resolve()
    if base not in path.parents:
        raise StepFailed(f"{what} {relative!r} in the manifest points outside the release folder {release}")
    if not path.is_file():
        raise StepFailed(f"{what} {relative!r} named in the manifest is missing from {release}")
    return path


def run(ctx: StepContext) -> None:
    config = ctx.config
    root = config.platform.root
    facts = ctx.facts
    release = Path(facts["release_dir"])
    if not release.is_dir():
        raise StepFailed(f"the staged release {release} is missing; validate should have put it there")
    manifest = facts.get("manifest") or {}
    hooks = manifest.get("hooks") or {}
    runners = config.platform.migration_runners
    pre = release_file(release, hooks["pre_apply"], "pre-apply hook") if hooks.get("pre_apply") else None
    post = release_file(release, hooks["post_apply"], "post-apply hook") if hooks.get("post_apply") else None
    migrations = [release_file(release, rel, "migration") for rel in manifest.get("migrations") or []]
    # With downtime, maintenance stopped the services: they are started (as leaving maintenance would)
    # right after the switch, so that verify checks them and leaving has only the flag left to remove.
    stopped = services_stopped(facts) and bool(config.platform.services.start)
    restarts = config.platform.services.start if stopped else config.platform.services.restart
    verb = "start" if stopped else "restart"
    units = (pre is not None) + len(migrations) + 1 + len(restarts) + (post is not None)
    done = 0

    def advance(message: str) -> None:
        nonlocal done
        done += 1
        ctx.progress(done / units, message)

    def next_unit() -> AbstractContextManager[None]:
        """What a hook or migration reports on DROPGATE_PROGRESS_FD fills its own unit of the bar."""
        return ctx.share(done / units, (done + 1) / units)

    if "previous_release" not in facts:
        previous = current_release(root)
        ctx.save_facts(previous_release=str(previous) if previous is not None else None)
    ctx.update_run(platform_changed=True)

    if pre is not None:
        ctx.event(f"pre-apply hook {pre.name}")
        with next_unit():
            ctx.run_command(script_command(pre, runners), what=f"pre-apply {pre.name}", cwd=release)
        advance("pre-apply hook done")

    for index, migration in enumerate(migrations, start=1):
        label = f"migration {index}/{len(migrations)} {migration.relative_to(release.resolve())}"
        ctx.event(label)
        with next_unit():
            ctx.run_command(script_command(migration, runners), what=label, cwd=release)
        advance(f"{label} done")

    before = current_release(root)
    ctx.checkpoint()
    switch_current(root, release)
    was = f" (was {before.name})" if before is not None else ""
    ctx.event(f"current → releases/{release.name}{was}")
    advance("current switched")

    for index, command in enumerate(restarts, start=1):
        ctx.run_command(command, what=f"{verb} {index}/{len(restarts)}", progress=False, starts_services=True)
        advance(f"{verb}ed {index} of {len(restarts)}")
    if stopped:
        ctx.save_facts(services_started=ctx.now())
    if restarts:
        ctx.event(f"services {verb}ed ({len(restarts)} command{'s' if len(restarts) != 1 else ''})")

    if post is not None:
        ctx.event(f"post-apply hook {post.name}")
        with next_unit():
            ctx.run_command(script_command(post, runners), what=f"post-apply {post.name}", cwd=release)
        advance("post-apply hook done")


def revert(ctx: StepContext) -> None:
    """Point `current` back at the release it had before this run's apply, then restart the services.

    A no-op when apply never started (nothing was switched). Raises
    RollbackFailed naming what could not be done.
    """
    root = ctx.config.platform.root
    if "previous_release" not in ctx.facts:
        ctx.event("apply had not started: the release was not changed")
        return
    live = current_release(root)
    live_name = live.name if live is not None else "nothing"
    recorded = ctx.facts["previous_release"]
    if not recorded:
        raise RollbackFailed(f"there was no release before run {ctx.run_id}; current still → {live_name}")
    previous = Path(recorded)
    if not previous.is_dir():
        raise RollbackFailed(f"the previous release {previous} is missing; current still → {live_name}")
    if live != previous.resolve():
        try:
            switch_current(root, previous)
        except OSError as error:
            raise RollbackFailed(
                f"cannot point {root / 'current'} back at {previous}: {error.strerror}; current still → {live_name}"
            ) from error
        ctx.event(f"current → releases/{previous.name} again (was {live_name})")
    else:
        ctx.event(f"current still → releases/{previous.name}: nothing to switch back")
    restarts = ctx.config.platform.services.restart
    for index, command in enumerate(restarts, start=1):
        try:
            ctx.run_command(command, what=f"restart {index}/{len(restarts)}", progress=False, starts_services=True)
        except (CommandFailed, StepTimeout) as error:
            raise RollbackFailed(f"after switching back to {previous.name}: {error}") from error
    if restarts:
        ctx.event(f"services restarted on {previous.name}")
