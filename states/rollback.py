"""`rollback`: put the platform back as it was before the run.

Maintenance on (the data must not change under the restore), the previous
release back in `current`, the data and dumps restored from the run's own
snapshot, maintenance off. Each part runs only if the run got that far: the
data is restored only once `apply` had begun (its hooks and migrations are
what change data). A run that failed (or was interrupted) while entering
maintenance changed no data, and restoring the backup then would only lose
what users wrote since: its rollback starts the services (if stopping them had
begun) and removes the flag.
"""

from __future__ import annotations

from pipeline.changes import maintenance_changes
from pipeline.context import StepContext
from pipeline.errors import RollbackFailed, StepAborted, StepFailed
from states import apply, backup, maintenance


def run(ctx: StepContext) -> None:
    apply_began = bool(ctx.facts.get("previous_release"))  # saved by apply before its first change
    try:
        if not apply_began:
            entered = maintenance_changes(ctx.facts)
            undo = f"; undoing what maintenance changed: {', '.join(entered)}" if entered else ""
            ctx.event(f"apply had not begun: the release and the data are unchanged, nothing to restore{undo}")
            maintenance.leave(ctx)  # only if this run had entered it: services started, flag removed
            ctx.update_run(platform_changed=False)
            return
        with ctx.share(0.0, 0.1):  # each part fills its share of the bar, which never goes back
            maintenance.enter(ctx)
        with ctx.share(0.1, 0.2):
            apply.revert(ctx)
        ctx.event(f"release {ctx.facts['previous_release']} is live again")
        if ctx.facts.get("backup_dir"):
            with ctx.share(0.2, 0.95):
                backup.restore(ctx)
            ctx.event(f"data restored from {ctx.facts['backup_dir']}")
        maintenance.leave(ctx)
    except (RollbackFailed, StepAborted):  # stopped (a second SIGTERM) is not failed: it may simply be run again
        raise
    except StepFailed as error:
        raise RollbackFailed(str(error)) from error
    ctx.update_run(platform_changed=False)
