"""How long a rollout in waves takes across a fleet, and how much of it is dropgate's own work.

    .venv/bin/python bench/fleet.py                  # 20 sites, waves 1, 10 %, the rest
    .venv/bin/python bench/fleet.py --sites 6        # a quick look

Builds SITES real sites on this machine (tests/fleet.py: each a dropgate daemon
in front of the sample application on 1.0.0, with its own config, inbox,
journal and ports), then runs the shipped deploy/ansible/rollout.yml with the
real ansible-playbook to bring them all to 1.1.0 (a minor update: backup,
maintenance, restart, verify), with the playbook's own defaults (poll every 5 s).

Wall time is ansible-playbook's, start to end. dropgate's share comes from the
sites' journals: for each wave, from the first archive's arrival in an inbox to
the last run's outcome — the time the wave waited on dropgate. The rest is
Ansible's: reading each site's state, copying the archive, the delay between
a run's end and the next look at it, and starting each wave. The machine is
shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fleet import Fleet  # noqa: E402


def wave_spans(fleet: Fleet, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per wave: its sites, and the span from its first arrival to its last outcome (from the journals)."""
    waves: dict[int, list[dict[str, Any]]] = {}
    for line in summary["sites"]:
        run = fleet[line["site"]].site.show(int(line["run"]))
        waves.setdefault(int(line["wave"]), []).append(run)
    result = []
    for number in sorted(waves):
        runs = waves[number]
        result.append({
            "wave": number,
            "sites": len(runs),
            "span": max(r["finished"] for r in runs) - min(r["arrived"] for r in runs),
            "longest_run": max(r["finished"] - r["started"] for r in runs),
            "run_seconds": sum(r["finished"] - r["started"] for r in runs),
            "downtime": [float(r["facts"].get("downtime_seconds") or 0.0) for r in runs],
        })
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--waves", default='[1, "10%", "100%"]', help="Ansible's serial, as JSON")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between two looks at a run (default 5)")
    parser.add_argument("--dir", help="where to build the fleet (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dropgate-fleet-", dir=args.dir) as folder:
        print(f"building {args.sites} sites in {folder} ...", flush=True)
        started = time.monotonic()
        fleet = Fleet(Path(folder) / "fleet", args.sites)
        try:
            print(f"  built in {time.monotonic() - started:.0f} s", flush=True)
            archive = fleet.archive("1.1.0")
            load_before = os.getloadavg()
            rollout = fleet.rollout(archive, waves=json.loads(args.waves),
                                    extra={"dropgate_poll_seconds": args.poll, "dropgate_site_timeout": 3600},
                                    timeout=7200)
            load_after = os.getloadavg()
            if rollout.returncode != 0 or rollout.summary["result"] != "done":
                print(rollout.output[-5000:])
                print(f"the rollout did not succeed: {rollout.summary['result']}")
                return 1
            waves = wave_spans(fleet, rollout.summary)
        finally:
            fleet.close()

    dropgate = sum(w["span"] for w in waves)
    wall = rollout.seconds
    print()
    print(f"rollout of gts 1.0.0 → 1.1.0 to {args.sites} sites, waves {args.waves}, poll {args.poll:g} s, "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"{'wave':>4}  {'sites':>5}  {'dropgate span':>13}  {'longest run':>11}  {'downtime mean/max':>17}")
    for w in waves:
        mean = sum(w["downtime"]) / len(w["downtime"])
        print(f"{w['wave']:>4}  {w['sites']:>5}  {w['span']:>11.1f} s  {w['longest_run']:>9.1f} s  "
              f"{mean:>7.2f} / {max(w['downtime']):.2f} s")
    print(f"wall time (ansible-playbook):      {wall:7.1f} s")
    print(f"  dropgate (waves' spans, journals): {dropgate:7.1f} s  ({dropgate / wall:.0%})")
    print(f"  Ansible (the rest):                {wall - dropgate:7.1f} s  ({(wall - dropgate) / wall:.0%})")
    print(f"site-seconds in runs: {sum(w['run_seconds'] for w in waves):.1f} s over {args.sites} sites")
    return 0


if __name__ == "__main__":
    sys.exit(main())
