"""How long the platform is down for an update: dropgate against the platform's own floor and the usual way.

    .venv/bin/python bench/downtime.py                                   # 1 GiB payload, 20,000 files, 3 updates
    .venv/bin/python bench/downtime.py --size-mib 2048 --files 50000
    .venv/bin/python bench/downtime.py --size-mib 64 --files 2000 --repeat 1   # a quick look

The same kind of update (the sample platform, a minor version each time, plus
SIZE MiB of assets in FILES files, half incompressible, half text-like) is
applied `--repeat` times in a row (1.0.0 → 1.1.0 → 1.2.0 …), with the sample
application serving from the installed tree:

- the floor: before each update, the platform's own stop and start commands
  (the very commands dropgate is configured with) run by hand, then the first
  healthy answer of /health. No update can keep the platform down for less.
- dropgate: the real daemon takes the archive from its inbox. Authentication,
  staging and the backup happen while the platform is in service; the window
  (the run's `downtime_seconds`: from the flag written to the flag removed) holds
  stop, the switch of `current`, the restart, the health check and start.
  Its overhead is the window minus the floor measured just before.
- the usual way, as vendor updaters do it: maintenance on and stop, back up the
  installed tree (`tar -cf`), extract the archive (`tar -xzf`), copy it over the
  installation (`cp -a`), start, maintenance off.

Medians of the repeats are shown. Targets: dropgate's overhead over the floor
at most 50 ms; the usual way's window at least 50 times dropgate's.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import harness
import sites

OVERHEAD_TARGET = 0.050


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="payload size of each release (default 1024)")
    parser.add_argument("--files", type=int, default=20_000, help="payload files of each release (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="updates in a row (default 3; medians shown)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    size = args.size_mib * 2**20
    with harness.work_folder("dropgate-downtime-", args.dir, args.keep) as work:
        print(f"building release 1.0.0 and {args.repeat} updates: {args.size_mib} MiB in {args.files} files each ...")
        installed = work / "build" / "installed"
        sites.make_release(installed, "1.0.0", size, args.files, seed=1)
        private, public = sites.make_key(work)
        versions = [f"1.{n}.0" for n in range(1, args.repeat + 1)]
        archives = [
            sites.pack_update(work, private, version, size, args.files, seed=n + 2)
            for n, version in enumerate(versions)
        ]
        print(f"archives: {archives[0].stat().st_size / 2**20:.0f} MiB each; {sites.load()}", flush=True)

        site = sites.dropgate_site(work, installed, public)
        floors, windows, watched_totals = [], [], []
        with sites.running(site):
            for before, version, archive in zip(["1.0.0", *versions], versions, archives, strict=False):
                floors.append(sites.floor(site, before))
                run, total = sites.update(site, archive)
                windows.append(float(run.facts["downtime_seconds"]))
                watched_totals.append(total)
                print(
                    f"  {before} → {version}: floor {floors[-1] * 1000:.0f} ms, "
                    f"window {windows[-1] * 1000:.0f} ms, whole update {total:.1f} s",
                    flush=True,
                )
        usual = []
        for _ in range(args.repeat):
            usual.append(sites.the_usual_way(work, archives[0], installed))
        seconds = ", ".join(f"{u['window']:.1f} s" for u in usual)
        print(f"  the usual way: {seconds}; {sites.load()}")

        floor, window = statistics.median(floors), statistics.median(windows)
        overhead = statistics.median(w - f for w, f in zip(windows, floors, strict=True))
        usual_window = statistics.median(u["window"] for u in usual)
        phases = {name: statistics.median(u["phases"][name] for u in usual) for name in usual[0]["phases"]}
        print()
        mib = archives[0].stat().st_size / 2**20
        print(
            f"update to a minor version: {args.size_mib} MiB in {args.files} files (archive {mib:.0f} MiB), "
            f"median of {args.repeat}"
        )
        print(f"{'':34}{'platform down':>14}")
        print(f"{'floor (stop + start + healthy)':34}{floor * 1000:>11.0f} ms")
        print(f"{'dropgate maintenance window':34}{window * 1000:>11.0f} ms")
        print(
            f"{'  overhead over the floor':34}{overhead * 1000:>11.0f} ms   (target <= {OVERHEAD_TARGET * 1000:.0f} ms)"
        )
        print(f"{'the usual way':34}{usual_window:>12.2f} s   ({usual_window / window:.0f}x dropgate's window)")
        for name, seconds in phases.items():
            print(f"  {name:32}{seconds:>12.2f} s")
        print(f"dropgate's whole update (drop to succeeded): {statistics.median(watched_totals):.1f} s")
        return 0 if overhead <= OVERHEAD_TARGET else 1


if __name__ == "__main__":
    harness.exit_timed(main)
