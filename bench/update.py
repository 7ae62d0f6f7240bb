"""A whole update, end to end: each step's time, the total and the downtime, against the usual way.

    .venv/bin/python bench/update.py                                  # 2 GiB of data, 1 GiB release, 3 updates
    .venv/bin/python bench/update.py --data-mib 256 --release-mib 128 --files 4000 --repeat 1   # a quick look

The site: the sample platform with DATA MiB of data in FILES files (log-normal
sizes, random bytes: documents and images) and release 1.0.0 of RELEASE MiB in
FILES files. Each update is a minor version (downtime) of RELEASE MiB in FILES
files with one migration (it rewrites a file of the data). The real daemon
takes each archive from its inbox:

- the first update has no earlier snapshot to share with: its backup copies
  all the data;
- then, `--repeat` times: 1 % of the data files change, and the next update
  runs (its backup shares the unchanged files with the previous snapshot), as
  on a site that updates with dropgate. Medians of these are shown.

The usual way, on the same data and release: maintenance on and stop, `tar -cf`
of the installation and the data, `tar -xzf` of the archive, `cp -a` over the
installation, the migration, start, maintenance off (all of it downtime).

Targets: the next update's total at most the usual way's; its downtime at most
1/50 of the usual way's.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from pathlib import Path

import harness
import sites

STEPS = ("validate", "prereq", "backup", "maintenance", "apply", "verify")


def change_data(data: Path, fraction: float, seed: int) -> int:
    """Rewrite `fraction` of the data files with new bytes (same size); the bytes changed."""
    rng = random.Random(seed)
    files = sorted(path for path in data.rglob("*.bin"))
    changed = 0
    for path in rng.sample(files, max(1, int(len(files) * fraction))):
        size = path.stat().st_size
        path.write_bytes(os.urandom(size))
        changed += size
    os.sync()
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-mib", type=int, default=2048, help="the platform's data (default 2048)")
    parser.add_argument("--release-mib", type=int, default=1024, help="each release's payload (default 1024)")
    parser.add_argument("--files", type=int, default=20_000, help="files in the data and in each release")
    parser.add_argument("--repeat", type=int, default=3, help="next updates (default 3; medians shown)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    release = args.release_mib * 2**20
    with harness.work_folder("dropgate-update-", args.dir, args.keep) as work:
        print(
            f"building: data {args.data_mib} MiB in {args.files} files; release 1.0.0 and "
            f"{args.repeat + 1} updates of {args.release_mib} MiB in {args.files} files ...",
            flush=True,
        )
        data = work / "build" / "data"
        sites.make_data(data, args.data_mib * 2**20, args.files)
        installed = work / "build" / "installed"
        sites.make_release(installed, "1.0.0", release, args.files, seed=1)
        private, public = sites.make_key(work)
        versions = [f"1.{n}.0" for n in range(1, args.repeat + 2)]
        archives = [
            sites.pack_update(work, private, version, release, args.files, seed=n + 2, migration=True)
            for n, version in enumerate(versions)
        ]
        os.sync()
        print(f"archives: {archives[0].stat().st_size / 2**20:.0f} MiB each; {sites.load()}", flush=True)

        site = sites.dropgate_site(work, installed, public, data)
        data = site["site"] / "data"
        runs: list[tuple[dict[str, float], float, float]] = []  # (step seconds, total, downtime)
        with sites.running(site):
            for n, archive in enumerate(archives):
                if n:
                    changed = change_data(data, 0.01, seed=n)
                    print(f"  changed 1 % of the data files ({changed / 2**20:.1f} MiB)", flush=True)
                run, total = sites.update(site, archive)
                steps = sites.step_seconds(site, run.id)
                downtime = float(run.facts["downtime_seconds"])
                runs.append((steps, total, downtime))
                shown = ", ".join(f"{step} {steps.get(step, 0):.1f}" for step in STEPS)
                print(
                    f"  update {n + 1} → {versions[n]}: {total:.1f} s ({shown}); downtime {downtime:.2f} s; "
                    f"{sites.load()}",
                    flush=True,
                )
        usual = []
        for _ in range(args.repeat):
            usual.append(sites.the_usual_way(work, archives[0], installed, data))
            print(f"  the usual way: {usual[-1]['window']:.1f} s; {sites.load()}", flush=True)

        first, nexts = runs[0], runs[1:]
        usual_total = statistics.median(u["window"] for u in usual)
        print()
        print(
            f"update to a minor version with one migration: data {args.data_mib} MiB in {args.files} files, "
            f"release {args.release_mib} MiB in {args.files} files (archive "
            f"{archives[0].stat().st_size / 2**20:.0f} MiB); next updates: median of {len(nexts)}"
        )
        print(f"{'step':14}{'first update':>14}{'next update':>14}")
        for step in STEPS:
            median = statistics.median(steps.get(step, 0.0) for steps, _, _ in nexts)
            print(f"{step:14}{first[0].get(step, 0.0):>13.2f}s{median:>13.2f}s")
        total = statistics.median(t for _, t, _ in nexts)
        downtime = statistics.median(d for _, _, d in nexts)
        print(f"{'total':14}{first[1]:>13.2f}s{total:>13.2f}s   (from the drop into the inbox to succeeded)")
        print(f"{'downtime':14}{first[2]:>13.2f}s{downtime:>13.2f}s")
        print(f"{'the usual way':14}{usual_total:>13.2f}s{'':>14}   (all of it downtime)")
        for name in usual[0]["phases"]:
            print(f"  {name:26}{statistics.median(u['phases'][name] for u in usual):>13.2f}s")
        slowest = max(STEPS, key=lambda step: statistics.median(s.get(step, 0.0) for s, _, _ in nexts))
        print(
            f"next update: total {total / usual_total:.2f}x the usual way's (target <= 1), downtime "
            f"1/{usual_total / downtime:.0f} of it (target <= 1/50); slowest step: {slowest}"
        )
        return 0 if total <= usual_total and downtime * 50 <= usual_total else 1


if __name__ == "__main__":
    harness.exit_timed(main)
