"""What becomes of a run's archive and staged release once the run has an outcome.

A rejected archive is set aside in `<state>/rejected/` with its reason and its
staged release is removed; after a success, the archives of succeeded runs
beyond `platform.keep_releases` go with their releases. Rejected and failed
archives are never removed: they are evidence, and `retry` needs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.journal import Journal, Run
from pipeline.release import current_release

RecordEvent = Callable[[int, str, str], None]  # (run id, step, message), recorded in the journal and the run's log


def discard_staged_release(
    validate: ModuleType, platform_root: Path, run_id: int, facts: dict[str, Any], event: RecordEvent
) -> None:
    """A rejected run leaves no trace among the releases: remove what its validate staged."""
    discard: Callable[[Path, dict[str, Any]], Path | None] | None = getattr(validate, "discard_staged", None)
    if discard is not None and discard(platform_root, facts) is not None:
        event(run_id, "rejected", "removed the staged release (never made live)")
    staged = facts.get("release_dir")
    if not staged:
        return
    staged_path = Path(staged)
    if staged_path == current_release(platform_root) or not staged_path.is_dir():
        return
    shutil.rmtree(staged_path, ignore_errors=True)
    facts.pop("release_dir", None)
    event(run_id, "rejected", f"removed the staged release {staged_path.name} (never made live)")


def prune_archives(journal: Journal, state_dir: Path, keep: int, event: RecordEvent) -> None:
    """Keep the archives of as many succeeded runs as releases are kept; older ones go.

    Only archives that were installed successfully are ever removed: rejected
    and failed ones stay (they are evidence, and `retry` needs them).
    """
    succeeded = [run for run in journal.runs(limit=1000) if run.outcome == "succeeded"]
    for old in succeeded[keep:]:
        folder = state_dir / "spool" / str(old.id)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            event(old.id, "succeeded", f"archive removed from {folder} (its release is no longer kept)")


def set_aside(run: Run, state_dir: Path, reason: str) -> Path:
    """Move a rejected archive to `<state>/rejected/` with a `.reason` file beside it."""
    source = Path(run.path)
    target = state_dir / "rejected" / f"{run.id}-{run.archive}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except FileNotFoundError:
        return source
    target.with_name(target.name + ".reason").write_text(reason + "\n", encoding="utf-8")
    with contextlib.suppress(OSError):
        source.parent.rmdir()
    return target
