"""`rollback`: put the platform back as it was before the run.

Maintenance on (the data must not change under the restore), the previous
release back in `current`, the data and dumps restored from the run's own
snapshot, maintenance off. Each part runs only if the run got that far.
"""

from __future__ import annotations

from pipeline.context import StepContext
from pipeline.errors import RollbackFailed, StepFailed
from states import apply, backup, maintenance


def run(ctx: StepContext) -> None:
    changed_release = bool(ctx.facts.get("previous_release"))
    restore_data = bool(ctx.facts.get("backup_dir"))
    try:
        maintenance.enter(ctx)
        if changed_release:
            apply.revert(ctx)
            ctx.event(f"release {ctx.facts['previous_release']} is live again")
        if restore_data:
            backup.restore(ctx)
            ctx.event(f"data restored from {ctx.facts['backup_dir']}")
        maintenance.leave(ctx)
    except RollbackFailed:
        raise
    except StepFailed as error:
        raise RollbackFailed(str(error)) from error
    ctx.update_run(platform_changed=False)
