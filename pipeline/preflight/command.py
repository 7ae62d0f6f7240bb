"""`dropgate preflight [ARCHIVE]`: the report as a table, or as JSON with `--json`, and the exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import config_path, load_config
from pipeline.preflight.report import build_report
from pipeline.preflight.table import render
from pipeline.terminal import printable

EXIT_OK, EXIT_CRITICAL, EXIT_USAGE = 0, 1, 2


def cmd_preflight(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    archive = Path(args.archive) if args.archive else None
    if archive is not None and not archive.is_file():
        print(f"dropgate: {printable(archive)}: no such archive", file=sys.stderr)
        return EXIT_USAGE
    report = build_report(config, archive)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render(report))
    return EXIT_CRITICAL if report.critical else EXIT_OK
