"""`dropgate backups`: list the snapshots; `backups verify ID` re-checks one against its manifest.

Both work from the backups folder alone (no daemon needed). `verify` re-reads
every file of the snapshot and records the outcome in its summary, which
`list` then shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline.config import config_path, load_config
from pipeline.errors import SnapshotError
from pipeline.snapshot import (
    SnapshotInfo,
    format_bytes,
    list_snapshots,
    read_summary,
    record_verification,
    snapshot_dir,
    verify_snapshot,
)
from pipeline.terminal import printable

EXIT_OK, EXIT_NOT_OK = 0, 1


def cmd_backups(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    backups = config.paths.backups
    if args.action == "verify":
        return _verify(backups=backups, run_id=args.id, as_json=args.json)
    snapshots = list_snapshots(backups)
    if args.id is not None:
        snapshots = [info for info in snapshots if info.run == args.id]
    if args.json:
        print(json.dumps([info.as_dict() for info in reversed(snapshots)], indent=2))
        return EXIT_OK
    if not snapshots:
        print(f"no snapshots in {backups}")
        return EXIT_OK
    print(_table(list(reversed(snapshots))))
    return EXIT_OK


def _table(snapshots: list[SnapshotInfo]) -> str:
    rows = [("RUN", "TAKEN", "SIZE", "WRITTEN", "FILES", "SHARED", "VERIFIED")]
    for info in snapshots:
        if info.verify_problems:
            count = len(info.verify_problems)
            verified = f"FAILED ({count} problem{'s' if count != 1 else ''})"
        elif info.verified_at is not None:
            verified = "yes, " + _when(info.verified_at)
        else:
            verified = "no"
        rows.append(
            (
                str(info.run),
                _when(info.finished),
                format_bytes(info.bytes + sum(info.dumps.values())),
                format_bytes(info.new_bytes),
                f"{info.files:,}",
                f"{info.shared_files:,}",
                verified,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _verify(*, backups: Path, run_id: int | None, as_json: bool) -> int:
    """Re-check the snapshot of `run_id` (default: the newest) and record the outcome."""
    if run_id is None:
        snapshots = list_snapshots(backups)
        if not snapshots:
            print(f"dropgate: no snapshots in {backups}", file=sys.stderr)
            return EXIT_NOT_OK
        run_id = snapshots[-1].run
    dest = snapshot_dir(backups, run_id)
    try:
        read_summary(dest)
    except SnapshotError:
        print(f"dropgate: no complete snapshot of run {run_id} in {backups}", file=sys.stderr)
        return EXIT_NOT_OK
    problems = verify_snapshot(dest)
    record_verification(dest, problems)
    info = read_summary(dest)
    if as_json:
        print(json.dumps({"run": run_id, "path": str(dest), "ok": not problems, "problems": problems}, indent=2))
    elif problems:
        print(f"snapshot of run {run_id} ({dest}) FAILED verification:")
        for problem in problems:
            print(f"  {printable(problem)}")
    else:
        print(f"snapshot of run {run_id} ({dest}) verified: {info.files:,} files, {format_bytes(info.bytes)}")
    return EXIT_OK if not problems else EXIT_NOT_OK
