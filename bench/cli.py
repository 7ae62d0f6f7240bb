"""How fast the read-only commands answer, against starting the interpreter and doing nothing.

    .venv/bin/python bench/cli.py                      # 10,000 runs in the journal, 20 rounds
    .venv/bin/python bench/cli.py --runs 1000 --rounds 5

A fleet tool or a watch loop calls `dropgate status` often. The target is
`status --json` under 150 ms with 10,000 runs in the journal, on the same
machine as `python -c pass` (the floor every command pays). The sandbox is a
real site: a configuration, a platform with its `current` release, a journal
of RUNS finished runs (each with its events, step timings and facts, as the
daemon writes them) and one run busy in `apply` with a long run log.

Each command runs ROUNDS times as a fresh process, in turns, so that a busy
neighbour slows all of them alike; the median and the best are printed in
milliseconds. "checked" is the usual case: the daemon (or any full
validation) left the configuration's record in the state folder. "schema"
is the first command after the configuration changed, which validates it
all against the schema.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.journal import Journal  # noqa: E402
from pipeline.quickconfig import CHECKED_NAME, validate  # noqa: E402

TARGET_MS = 150.0
STEPS = ("validate", "prereq", "backup", "maintenance", "apply", "verify")


def build_site(folder: Path, runs: int) -> Path:
    """A site with `runs` finished runs and one in apply; returns its configuration file."""
    for name in ("inbox", "state/runs", "backups", "platform/releases/3.19.274", "data", "run"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    os.symlink("releases/3.19.274", folder / "platform" / "current")
    config = {
        "paths": {"inbox": "inbox", "state": "state", "backups": "backups"},
        "platform": {"product": "gts", "root": "platform", "data": ["data"]},
        "maintenance": {"flag_file": "run/maintenance"},
        "verify": {"http": [{"url": "http://127.0.0.1:8080/health", "version": True}]},
        "policy": {"timeouts": {"apply": "2h"}},
    }
    path = folder / "dropgate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    journal_path = folder / "state" / "journal.db"
    Journal(journal_path).close()  # the schema, its indexes, WAL, as the daemon creates them
    db = sqlite3.connect(journal_path, isolation_level=None)
    db.execute("BEGIN")
    now = time.time()
    facts = {
        "manifest": {"product": "gts", "version": "x", "notes": "Faster search.\n" * 20, "unpacked_bytes": 2**30},
        "prereq": [{"name": "cpus", "level": "ok", "subject": "", "message": "8 CPU cores"}] * 12,
        "downtime": True,
        "downtime_reason": "minor version changes",
    }
    for index in range(1, runs + 2):
        active = index == runs + 1
        arrived = now - (runs + 1 - index) * 3600
        version = f"3.19.{index}"
        db.execute(
            "INSERT INTO runs (id, archive, path, sha256, size, from_version, to_version, step, outcome, arrived,"
            " started, finished, step_started, step_deadline, progress, facts) VALUES"
            " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                index, f"gts.{version}.tgz", f"/var/lib/dropgate/state/spool/{index}/gts.{version}.tgz",
                f"{index:064x}", 2**28, f"3.19.{index - 1}", version,
                "apply" if active else "verify", None if active else "succeeded", arrived, arrived + 5,
                None if active else arrived + 600, arrived + 300 if active else None,
                arrived + 300 + 7200 if active else None, 0.4 if active else None, json.dumps(facts),
            ),
        )
        db.executemany(
            "INSERT INTO events (run_id, ts, step, message) VALUES (?, ?, ?, ?)",
            [(index, arrived + n, step, f"{step} done in 12.0s") for n, step in enumerate(STEPS)],
        )
        db.executemany(
            "INSERT INTO step_timings (run_id, step, started, finished, result) VALUES (?, ?, ?, ?, ?)",
            [(index, step, arrived + n, arrived + n + 1, "ok") for n, step in enumerate(STEPS)],
        )
    db.execute("COMMIT")
    db.close()
    log = folder / "state" / "runs" / f"{runs + 1}.log"
    log.write_text("".join(f"2026-11-20 03:{n % 60:02d}:00 [migration 1/1] row batch {n}\n" for n in range(5000)))
    return path


def command() -> list[str]:
    """The installed console script, as an operator runs it (else the module)."""
    script = Path(sys.executable).parent / "dropgate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def measure(argv: list[str], env: dict[str, str], before: object = None) -> float:
    if callable(before):
        before()
    started = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.decode()[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000, help="finished runs in the journal (default 10000)")
    parser.add_argument("--rounds", type=int, default=20, help="times each command runs (default 20)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: the system's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="dropgate-bench-cli-") as scratch:
        folder = Path(scratch)
        started = time.perf_counter()
        config = build_site(folder, args.runs)
        built = time.perf_counter() - started
        record = folder / "state" / CHECKED_NAME
        validate(config)  # what the daemon does when it starts: validate and record
        assert record.exists()
        saved = folder / "record.json"
        shutil.copy2(record, saved)
        env = {**os.environ, "NO_COLOR": "1"}
        dropgate = [*command(), "--config", str(config)]
        active = str(args.runs + 1)
        cases: list[tuple[str, list[str], object]] = [
            ("python -c pass", [sys.executable, "-c", "pass"], None),
            ("status --json (checked)", [*dropgate, "status", "--json"], None),
            ("status (checked)", [*dropgate, "status"], None),
            ("history --json (checked)", [*dropgate, "history", "--json"], None),
            (f"show {active} --json --log (checked)", [*dropgate, "show", active, "--json", "--log"], None),
            ("status --json (schema)", [*dropgate, "status", "--json"], record.unlink),
        ]
        times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        for _ in range(args.rounds):
            for label, argv, before in cases:
                times[label].append(measure(argv, env, before))
            shutil.copy2(saved, record)
    floor = statistics.median(times["python -c pass"])
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"{args.runs:,} finished runs + 1 active in the journal (built in {built:.1f}s); {args.rounds} rounds")
    print(f"{'command':<40} {'median ms':>10} {'best ms':>8} {'over pass':>10}")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:<40} {median:>10.1f} {min(values):>8.1f} {median - floor:>+10.1f}")
    status = statistics.median(times["status --json (checked)"])
    verdict = "meets" if status < TARGET_MS else "MISSES"
    print(f"status --json: {status:.0f} ms, {verdict} the target of {TARGET_MS:.0f} ms", end="")
    print(f" (python -c pass: {floor:.0f} ms)")
    return 0 if status < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
