"""How fast is a snapshot? First snapshot vs `cp -a` and `tar -czf`; second vs `rsync -a --link-dest`.

    .venv/bin/python bench/backup.py --files 20000 --total-mib 2048 --dir /var/tmp   # on disk (ext4 here)
    .venv/bin/python bench/backup.py --files 20000 --total-mib 2048 --dir /dev/shm   # on tmpfs

Builds a data set in a temporary folder (file sizes log-normally spread, random
bytes like the PDFs and images a platform stores), then measures each tool as a
child process: wall time including a final `sync` (a backup is only a backup
once it is on disk; dropgate's snapshot syncs its own filesystem, the others get
`sync` after them), and peak RSS. Then 1 % of the files change and the second
snapshot is measured against `rsync -a --link-dest` onto a first rsync copy.
Each measurement is repeated (`--repeat`, median shown), tools alternating.
Targets: first snapshot ≤ 1.0 × cp -a (it also hashes every byte, which cp
does not: `cp -a` + `sha256sum` of the copies is shown too, the same guarantee
by hand; and a bare Python copy that hashes every buffer and does nothing else, the
floor of any snapshot); second ≤ 0.5 × rsync --link-dest and ≥ 20 × faster than a full
tar -czf. The peak RSS of the second snapshot shows that reading the previous
manifest costs no memory per file.

Mind the filesystem under --dir: on an ext4 without a journal, the kernel skips
inodes freed in the last seconds (minutes, while their inode table block is not
yet written) when it allocates new ones, and this benchmark removes each tool's
copy just before the next runs: every folder and file created then costs a
search past the freed inodes, for every tool alike. A journaled ext4 (the
default of mkfs.ext4; a loop-mounted image will do) does not have this cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SNAPSHOT = """
import json, sys
from pathlib import Path
from pipeline.snapshot import take_snapshot
src, dest, previous, run, durable = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "sync"
info = take_snapshot([Path(src)], Path(dest), Path(previous) if previous else None, run_id=run, durable=durable)
print(json.dumps({"files": info.files, "shared": info.shared_files, "new_bytes": info.new_bytes}))
"""


VERIFIED_COPY = 'cp -a -- "$1" "$2" && find "$2" -type f -print0 | xargs -0 sha256sum > /dev/null'

# The floor of any copy that hashes what it stores, in this language on this machine: each file read a
# buffer at a time, the buffer hashed and written, on as many threads as snapshots use; no manifest, no
# metadata beyond the mode, no checks. A snapshot cannot be faster than this; `cp -a` hashes nothing.
BARE_COPY = """
import hashlib, os, sys
from concurrent.futures import ThreadPoolExecutor
src, dst = sys.argv[1], sys.argv[2]
files = []
for folder, _, names in os.walk(src):
    rel = os.path.relpath(folder, src)
    os.makedirs(os.path.join(dst, rel), exist_ok=True)
    files += [os.path.join(rel, name) for name in names]
def copy(rel):
    buf = bytearray(1 << 20)
    view, digest = memoryview(buf), hashlib.sha256()
    fi = os.open(os.path.join(src, rel), os.O_RDONLY)
    fo = os.open(os.path.join(dst, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    while n := os.readv(fi, [buf]):
        digest.update(view[:n])
        os.write(fo, view[:n])
    os.close(fi)
    os.close(fo)
    return digest.hexdigest()
with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
    list(pool.map(copy, files, chunksize=64))
"""


@dataclass
class Measure:
    seconds: float
    peak_rss_kib: int
    output: str


SYNC = True


def run_timed(argv: list[str]) -> Measure:
    """Run `argv` then `sync` (unless --no-sync); wall time, and the tool's peak RSS as GNU time reports it.

    (GNU time execs the tool from its own small process; the rusage of a child forked
    from this benchmark would count the benchmark's own pages.)
    """
    with tempfile.NamedTemporaryFile("r") as report:
        started = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", report.name, *argv], capture_output=True, text=True, check=False
        )
        if SYNC:
            os.sync()
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        peak = int(report.read().split()[-1])
    return Measure(seconds, peak, proc.stdout)


def make_dataset(root: Path, files: int, total: int, seed: int = 7) -> list[Path]:
    rng = random.Random(seed)
    weights = [rng.lognormvariate(0, 1.5) for _ in range(files)]
    scale = total / sum(weights)
    block = os.urandom(64 << 20)
    paths = []
    for n, weight in enumerate(weights):
        size = max(1, int(weight * scale))
        folder = root / f"d{n % 50:02d}" / f"s{(n // 50) % 20:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"f{n:05d}.bin"
        offset = rng.randrange(0, len(block) - 1)
        with open(path, "wb") as handle:
            left = size
            while left:
                chunk = block[offset : offset + left]
                handle.write(chunk)
                left -= len(chunk)
                offset = 0
        paths.append(path)
    return paths


def change_files(paths: list[Path], fraction: float, seed: int = 11) -> int:
    """Rewrite `fraction` of the files with new content (same size); returns the bytes changed."""
    rng = random.Random(seed)
    changed = 0
    for path in rng.sample(paths, max(1, int(len(paths) * fraction))):
        size = path.stat().st_size
        path.write_bytes(os.urandom(size))
        changed += size
    return changed


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


def drop_caches(cold: bool) -> None:
    os.sync()
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def median_of(repeat: int, cold: bool, measure: Callable[[], Measure], cleanup: Callable[[], None]) -> Measure:
    runs = []
    for n in range(repeat):
        drop_caches(cold)
        runs.append(measure())
        if n < repeat - 1:
            cleanup()
    middle = sorted(runs, key=lambda m: m.seconds)[len(runs) // 2]
    return Measure(statistics.median(m.seconds for m in runs), max(m.peak_rss_kib for m in runs), middle.output)


Tool = tuple[list[str], Callable[[], None]]


def alternate(tools: dict[str, Tool], repeat: int, cold: bool) -> dict[str, Measure]:
    """Measure each tool `repeat` times, taking turns (so a slow spell of the machine hits all); medians."""
    collected: dict[str, list[Measure]] = {name: [] for name in tools}
    for n in range(repeat):
        for name, (argv, cleanup) in tools.items():
            drop_caches(cold)
            collected[name].append(run_timed(argv))
            if n < repeat - 1:
                cleanup()
    results = {}
    for name, runs in collected.items():
        seconds = [m.seconds for m in runs]
        middle = sorted(runs, key=lambda m: m.seconds)[len(runs) // 2]
        results[name] = Measure(statistics.median(seconds), max(m.peak_rss_kib for m in runs), middle.output)
        print(f"  {name}: " + ", ".join(f"{value:.2f}s" for value in seconds))
    return results


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--total-mib", type=int, default=2048)
    parser.add_argument("--changed", type=float, default=0.01, help="fraction changed before the second snapshot")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to build the data set (default: a temporary folder)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (root)")
    parser.add_argument("--keep", action="store_true", help="keep the data set afterwards")
    parser.add_argument(
        "--no-sync",
        action="store_true",
        help="measure up to the page cache only: no sync after the tools, the snapshot does not sync either",
    )
    args = parser.parse_args()
    global SYNC  # noqa: PLW0603 - one switch for every measurement
    SYNC = not args.no_sync
    durable = "sync" if SYNC else "nosync"
    for tool in ("cp", "tar", "rsync", "/usr/bin/time"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed for this benchmark")

    work = Path(tempfile.mkdtemp(prefix="dropgate-bench-", dir=args.dir))
    src = work / "data"
    python = sys.executable
    try:
        started = time.perf_counter()
        paths = make_dataset(src, args.files, args.total_mib * 2**20)
        total = sum(p.stat().st_size for p in paths)
        os.sync()
        took = time.perf_counter() - started
        print(f"data set: {len(paths):,} files, {total / 2**20:,.0f} MiB in {work} ({took:.0f}s to build)")
        cache = "cold" if args.cold else "warm"
        flush = "each tool then sync" if SYNC else "page cache only, no sync"
        print(f"cpus {os.cpu_count()}, python {sys.version.split()[0]}, repeat {args.repeat}, cache {cache}, {flush}")
        print(load())

        results: dict[str, Measure] = {}
        snap1, cp_dst, tgz = work / "snapshots" / "1", work / "cp", work / "full.tgz"
        verified_dst, bare_dst = work / "cp-verified", work / "bare"
        (work / "snapshots").mkdir()
        # First copies, tools alternating within each repeat. Each tool has a destination of its own: the last
        # round leaves them in place (snapshot 1 is the previous one of snapshot 2).
        firsts = {
            "cp -a": (["cp", "-a", str(src), str(cp_dst)], lambda: remove(cp_dst)),
            "dropgate snapshot 1": (
                [python, "-c", SNAPSHOT, str(src), str(snap1), "", "1", durable],
                lambda: remove(snap1),
            ),
            # The same guarantee by hand: a copy, then the SHA-256 of every file copied (paths are arguments).
            "cp -a + sha256sum": (
                ["sh", "-c", VERIFIED_COPY, "sh", str(src), str(verified_dst)],
                lambda: remove(verified_dst),
            ),
            "bare copy + SHA-256": ([python, "-c", BARE_COPY, str(src), str(bare_dst)], lambda: remove(bare_dst)),
        }
        results.update(alternate(firsts, args.repeat, args.cold))
        for leftover in (cp_dst, verified_dst, bare_dst):
            remove(leftover)
        results["tar -czf"] = median_of(
            1, args.cold, lambda: run_timed(["tar", "-czf", str(tgz), "-C", str(src), "."]), lambda: remove(tgz)
        )
        remove(tgz)
        rsync1 = work / "rsync" / "1"
        rsync1.parent.mkdir()
        results["rsync -a (first)"] = median_of(
            1, args.cold, lambda: run_timed(["rsync", "-a", f"{src}/", str(rsync1)]), lambda: remove(rsync1)
        )

        changed = change_files(paths, args.changed)
        os.sync()
        print(f"changed {int(len(paths) * args.changed):,} files ({changed / 2**20:,.1f} MiB)")
        snap2, rsync2 = work / "snapshots" / "2", work / "rsync" / "2"
        seconds = {
            "rsync -a --link-dest": (
                ["rsync", "-a", f"--link-dest={rsync1}", f"{src}/", str(rsync2)],
                lambda: remove(rsync2),
            ),
            "dropgate snapshot 2": (
                [python, "-c", SNAPSHOT, str(src), str(snap2), str(snap1), "2", durable],
                lambda: remove(snap2),
            ),
        }
        results.update(alternate(seconds, args.repeat, args.cold))

        print()
        print(f"{'tool':<24} {'seconds':>9} {'peak RSS':>10}  notes")
        for name, measure in results.items():
            note = ""
            if name.startswith("dropgate"):
                info = json.loads(measure.output)
                written = info["new_bytes"] / 2**20
                note = f"{info['files']:,} files, {info['shared']:,} shared, {written:,.1f} MiB written"
            print(f"{name:<24} {measure.seconds:>9.2f} {measure.peak_rss_kib / 1024:>8.1f} MiB  {note}")
        first, second = results["dropgate snapshot 1"].seconds, results["dropgate snapshot 2"].seconds
        cp, tar = results["cp -a"].seconds, results["tar -czf"].seconds
        verified = results["cp -a + sha256sum"].seconds
        link = results["rsync -a --link-dest"].seconds
        print()
        print(f"first snapshot / cp -a                 {first / cp:6.2f}x   (target <= 1.0)")
        print(f"first snapshot / cp -a + sha256sum     {first / verified:6.2f}x   (the same guarantee by hand)")
        bare = results["bare copy + SHA-256"].seconds
        print(f"first snapshot / bare copy + SHA-256   {first / bare:6.2f}x   (the floor of a copy that hashes)")
        print(f"bare copy + SHA-256 / cp -a            {bare / cp:6.2f}x")
        print(f"second snapshot / rsync --link-dest    {second / link:6.2f}x   (target <= 0.5)")
        print(f"tar -czf / second snapshot             {tar / second:6.1f}x   (target >= 20)")
        print(f"first snapshot / tar -czf              {first / tar:6.2f}x")
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"(this benchmark's own peak RSS: {own / 1024:.0f} MiB, not counted above; {load()})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
