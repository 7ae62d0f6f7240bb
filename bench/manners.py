"""What a backup costs the platform's users: response times of the sample app while dropgate snapshots its data.

    .venv/bin/python bench/manners.py                                 # 2 GiB in 20,000 files, under /var/tmp
    .venv/bin/python bench/manners.py --total-mib 256 --files 4000    # a quick look

The sample application serves from its release while a client asks /health at
a steady 50 requests per second (one connection, kept alive) and records each
answer's time. Three phases, each as long as one first snapshot of the data:

- quiet: no backup;
- backup, background priority: dropgate's first snapshot of the data (its own
  process), lowered as the default configuration says (`background`: idle I/O
  class, nice 10);
- backup, no background priority (`io_class: none, nice: 0`): the same
  snapshot at the daemon's own priority, to show what the lowering buys.

Each backup runs as its own process; the client runs in this one. p50, p99 and
the worst answer are shown, with the snapshot's own time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import sites

SNAPSHOT = """
import json, sys, time
from pathlib import Path
from pipeline.config import Background
from pipeline.priority import lower_this_thread
from pipeline.snapshot import take_snapshot
src, dest, io_class, nice = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
problems = lower_this_thread(Background(io_class=io_class, nice=nice))
began = time.perf_counter()
take_snapshot([Path(src)], Path(dest), run_id=1)
print(json.dumps({"seconds": time.perf_counter() - began, "problems": problems}))
"""

RATE = 50  # requests per second


class Client:
    """Asks /health at RATE per second until stopped; the answer times in seconds."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.times: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        due = time.perf_counter()
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                connection.request("GET", "/health")
                connection.getresponse().read()
                self.times.append(time.perf_counter() - began)
            except OSError:
                self.failures += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            due += 1 / RATE
            self._stop.wait(max(0.0, due - time.perf_counter()))
        connection.close()

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def backup(src: Path, dest: Path, io_class: str, nice: int) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", SNAPSHOT, str(src), str(dest), io_class, str(nice)],
        capture_output=True,
        text=True,
        check=True,
        cwd=sites.ROOT,
    )
    result = json.loads(proc.stdout)
    if result["problems"]:
        print(f"  could not lower the backup: {result['problems']}")
    shutil.rmtree(dest)
    return float(result["seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--total-mib", type=int, default=2048)
    parser.add_argument("--dir", default="/var/tmp", help="where the data and the snapshots go (default /var/tmp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dropgate-manners-", dir=args.dir))
    try:
        print(f"building {args.total_mib} MiB in {args.files} files under {work} ...", flush=True)
        data = work / "data"
        sites.make_data(data, args.total_mib * 2**20, args.files)
        platform = work / "platform"
        sites.make_release(platform / "releases" / "1.0.0", "1.0.0", 1 << 20, 10, seed=1)
        (platform / "current").symlink_to("releases/1.0.0")
        port = sites.free_port()
        if sites.start(platform, port) != 0:
            raise SystemExit("the sample platform did not start")
        results: dict[str, tuple[list[float], int, float | None]] = {}
        try:
            for name, priority in (
                ("backup, background priority", ("idle", 10)),
                ("backup, no background priority", ("none", 0)),
            ):
                with Client(port) as client:
                    seconds = backup(data, work / "snapshot", *priority)
                results[name] = (client.times, client.failures, seconds)
                print(f"  {name}: snapshot {seconds:.1f} s; {sites.load()}", flush=True)
            quiet = statistics.median(s for _, _, s in results.values() if s is not None)
            with Client(port) as client:
                time.sleep(quiet)  # the quiet phase: as long as a snapshot, nothing else running
            results = {"quiet (no backup)": (client.times, client.failures, None), **results}
        finally:
            sites.stop(platform, port)
        print()
        print(
            f"/health at {RATE}/s while a first snapshot of {args.total_mib} MiB in {args.files} files runs "
            f"({sites.load()})"
        )
        print(f"{'':32}{'answers':>8}{'p50':>9}{'p99':>9}{'worst':>9}{'snapshot':>10}")
        for name, (times, failures, seconds) in results.items():
            shown = f"{seconds:.1f} s" if seconds is not None else "-"
            print(
                f"{name:32}{len(times):>8}{percentile(times, 0.5) * 1000:>7.1f}ms"
                f"{percentile(times, 0.99) * 1000:>7.1f}ms{max(times) * 1000:>7.1f}ms{shown:>10}"
                + (f"  ({failures} failed)" if failures else "")
            )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
