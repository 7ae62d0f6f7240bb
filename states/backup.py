"""`backup`: snapshot the platform's data and run the dump commands; `restore` puts them back.

The platform stays in service: the step only reads the data paths. The snapshot
goes to `paths.backups/<run id>/` (layout in `pipeline.snapshot`), shares every
unchanged file with the newest verified snapshot, and is verified before the
step succeeds, so the backup is known good before the platform is first changed.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import Dump
from pipeline.context import StepContext
from pipeline.errors import CommandFailed, NoSpace, RollbackFailed, SnapshotError, StepFailed, StepTimeout
from pipeline.snapshot import (
    DUMPS,
    DumpWriter,
    format_bytes,
    latest_snapshot,
    prune_snapshots,
    restore_snapshot,
    snapshot_dir,
    take_snapshot,
    verify_snapshot,
)

BACKGROUND = True  # runs while the platform serves users: at `background` priority (pipeline/priority.py)
DATA_SHARE = 0.9  # of the step's progress bar, when dumps follow the data copy


def run(ctx: StepContext) -> None:
    """Take this run's snapshot (verified), prune old ones, record where it is in the facts."""
    config = ctx.config
    backups = config.paths.backups
    dest = snapshot_dir(backups, ctx.run_id)
    previous = latest_snapshot(backups, before=ctx.run_id)
    # The data copy comes first, then the dumps: the bar must not read 100 % while a dump still runs.
    data_share = DATA_SHARE if config.backup.dumps else 1.0
    count = len(config.backup.dumps)
    each = (1.0 - data_share) / count if count else 0.0
    dumps = [
        (dump.name, _dump_writer(ctx, dump, (data_share + each * index, data_share + each * (index + 1)), index, count))
        for index, dump in enumerate(config.backup.dumps)
    ]

    def progress(done: int, expected: int) -> None:
        ratio = done / expected if expected else 1.0
        ctx.progress(ratio * data_share, f"{format_bytes(done)} of {format_bytes(expected)}")

    try:
        info = take_snapshot(
            config.platform.data,
            dest,
            previous.path if previous is not None else None,
            run_id=ctx.run_id,
            dumps=dumps,
            checkpoint=ctx.checkpoint,
            progress=progress,
        )
    except NoSpace as error:
        raise StepFailed(f"backup: {error} (the platform was not changed)") from error
    except SnapshotError as error:
        raise StepFailed(f"backup: {error}") from error
    except OSError as error:  # never `dest`: it exists only once the snapshot is complete
        raise StepFailed(f"backup: {error.filename or backups}: {error.strerror or error}") from error
    if previous is not None and info.previous is None:
        ctx.event(f"the snapshot of run {previous.run} could not be read to share files with: this one is a full copy")
    shared = f", {info.shared_files:,} shared with run {info.previous}" if info.previous is not None else ""
    ctx.event(
        f"snapshot of {len(info.sources)} path{'s' if len(info.sources) != 1 else ''}: {info.files:,} files, "
        f"{format_bytes(info.bytes)}{shared}, {format_bytes(info.new_bytes)} written, verified"
    )
    if info.changing_files:
        ctx.event(
            f"{info.changing_files:,} files kept changing while they were copied (the platform is in service); "
            "their copies may be torn: databases must be backed up by a dump"
        )
    if info.vanished_files:
        ctx.event(f"{info.vanished_files:,} files were removed by the platform before they could be copied")
    for name, size in info.dumps.items():
        ctx.event(f"dump {name}: {format_bytes(size)}")
    removed = prune_snapshots(backups, config.backup.keep, protect={*ctx.protected_runs, ctx.run_id})
    finished = [path.name for path in removed if path.name.isdigit()]
    if finished:
        ctx.event(f"pruned the snapshots of run{'s' if len(finished) > 1 else ''} {', '.join(finished)}")
    ctx.progress(1.0, "snapshot and dumps verified")
    ctx.save_facts(
        backup_dir=str(dest),
        backup_bytes=info.bytes,
        backup_files=info.files,
        backup_at=info.finished,
    )


def _dump_writer(ctx: StepContext, dump: Dump, share: tuple[float, float], index: int, count: int) -> DumpWriter:
    def write(target: Path) -> None:
        with ctx.share(*share):  # what the dump reports on DROPGATE_PROGRESS_FD fills its own share
            ctx.progress(0.0, f"dump {dump.name} ({index + 1} of {count}) running")
            ctx.run_command(dump.command, what=f"dump {dump.name}", stdout_path=target)

    return write


def restore(ctx: StepContext) -> None:
    """Put the data paths and dumps back exactly as this run's snapshot holds them.

    The whole snapshot is verified before any live file is touched; whatever fails
    raises RollbackFailed naming what could not be restored, and the snapshot is
    left as it is. StepAborted (a shutdown) passes through unchanged.
    """
    raw = ctx.facts.get("backup_dir")
    if not raw:
        raise RollbackFailed(f"run {ctx.run_id} has no backup to restore the data from")
    backup_dir = Path(raw)
    with ctx.share(0.0, 0.3):
        problems = verify_snapshot(
            backup_dir,
            checkpoint=ctx.checkpoint,
            progress=lambda done, expected: ctx.progress(done / expected, "verifying the backup"),
        )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RollbackFailed(f"the backup {backup_dir} failed verification, no data was restored: {problems[0]}{more}")
    ctx.event(f"backup {backup_dir} verified; restoring {len(ctx.config.platform.data)} data paths")
    started = time.monotonic()
    try:
        with ctx.share(0.3, 0.9):
            report = restore_snapshot(
                backup_dir,
                verify=False,
                checkpoint=ctx.checkpoint,
                progress=lambda done, expected: ctx.progress(done / expected, "restoring data"),
            )
    except (SnapshotError, StepTimeout) as error:
        raise RollbackFailed(f"the data could not be restored from {backup_dir}: {error}") from error
    except OSError as error:
        where = error.filename or backup_dir
        raise RollbackFailed(f"the data could not be restored: {where}: {error.strerror or error}") from error
    ctx.event(
        f"data restored in {time.monotonic() - started:.1f}s: {report.restored_files:,} files rewritten "
        f"({format_bytes(report.bytes)}), {report.kept_files:,} untouched, {report.removed:,} removed"
    )
    dumps = ctx.config.backup.dumps
    for index, dump in enumerate(dumps):
        with ctx.share(0.9 + 0.1 * index / len(dumps), 0.9 + 0.1 * (index + 1) / len(dumps)):
            _restore_dump(ctx, backup_dir, dump)


def _restore_dump(ctx: StepContext, backup_dir: Path, dump: Dump) -> None:
    source = backup_dir / DUMPS / dump.name
    if dump.restore is None:
        ctx.event(f"dump {dump.name} has no restore command; it is kept at {source}")
        return
    if not source.is_file():
        raise RollbackFailed(f"the dump {dump.name} cannot be restored: {source} is missing")
    try:
        ctx.run_command(
            dump.restore,
            what=f"restore {dump.name}",
            stdin_path=source,
            env={"DROPGATE_DUMP_FILE": str(source)},
        )
    except (CommandFailed, StepTimeout) as error:
        raise RollbackFailed(f"the dump {dump.name} could not be restored from {source}: {error}") from error
    ctx.event(f"dump {dump.name} restored from {source}")
