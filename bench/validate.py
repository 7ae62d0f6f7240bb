"""How fast, and in how much memory, dropgate validates an archive, compared with doing it by hand.

    .venv/bin/python bench/validate.py --size-mib 2048

Builds a release tree of SIZE MiB (half incompressible, half text-like),
packs and signs it, then measures in child processes, each on a warm page cache:

- dropgate: authenticate + stage_payload (signature, every member checked,
  hashed and written into a staging folder), one pass over the archive;
- by hand: `sha256sum ARCHIVE` then `tar -xzf ARCHIVE -C DIR`, the least a
  careful admin would do (and it checks far less).

It prints wall time, throughput (archive bytes per second) and peak RSS of
each, and the ratios. Several sizes (`--size-mib 256 --size-mib 1024`) show
that dropgate's memory does not grow with the archive.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.archive import pack  # noqa: E402
from pipeline.signing import generate_keypair  # noqa: E402

CHUNK = 2**20

STAGE = """
import sys
from pathlib import Path
from pipeline.archive import authenticate, load_trusted_keys, stage_payload
from pipeline.config import Limits
archive, public, dest = map(Path, sys.argv[1:4])
manifest = authenticate(archive, load_trusted_keys([public]))
limits = Limits(max_archive_bytes=2**50, max_unpacked_bytes=2**50, max_file_bytes=2**50)
stage_payload(archive, manifest, dest, limits)
"""

IDLE = """
from pipeline.archive import authenticate, load_trusted_keys, stage_payload
from pipeline.config import Limits
"""


@dataclass
class Measure:
    seconds: float
    peak_rss: int  # bytes


def _high_water(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM of its current program), in bytes."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_child(argv: list[str]) -> Measure:
    """Run `argv` to completion; its wall time and peak resident set size.

    The peak is VmHWM sampled every few milliseconds: wait4's ru_maxrss would
    include this (large) parent's memory, which Linux carries across fork and exec.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _high_water(proc.pid))
        time.sleep(0.005)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} … failed with exit code {proc.returncode}")
    return Measure(seconds, peak)


def make_tree(root: Path, size: int, files: int, seed: int = 7) -> None:
    """`files` files totalling `size` bytes: odd ones random bytes, even ones compressible text."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    text_block = b" ".join(rng.choice(words) for _ in range(CHUNK // 5))[:CHUNK]
    per_file = max(1, size // files)
    written = 0
    for index in range(files):
        folder = root / f"module{index % 16:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        length = per_file if index < files - 1 else size - written
        with open(folder / f"file{index:05d}.bin", "wb") as handle:
            left = length
            while left > 0:
                piece = min(CHUNK, left)
                handle.write(os.urandom(piece) if index % 2 else text_block[:piece])
                left -= piece
        written += length


def warm(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(8 * CHUNK):
            pass


def bench(size_mib: int, files: int, workdir: Path, repeat: int) -> dict[str, Measure | float]:
    source = workdir / "src"
    make_tree(source / "release", size_mib * 2**20, files)
    (source / "manifest.yaml").write_text('product: bench\nversion: "1.0.0"\n')
    private, public = generate_keypair(workdir / "bench-key")
    started = time.perf_counter()
    archive = pack(source, private, workdir)
    pack_seconds = time.perf_counter() - started
    shutil.rmtree(source)
    tar = shutil.which("tar")
    sha256sum = shutil.which("sha256sum")
    if tar is None or sha256sum is None:
        raise SystemExit("the comparison needs tar and sha256sum")
    best: dict[str, Measure] = {}
    for _ in range(repeat):
        for name in ("dropgate", "by hand"):
            dest = workdir / f"staged-{name.replace(' ', '-')}"
            shutil.rmtree(dest, ignore_errors=True)
            os.sync()  # no writeback of an earlier run is left to slow this one down
            warm(archive)
            if name == "dropgate":
                measure = run_child([sys.executable, "-c", STAGE, str(archive), str(public), str(dest)])
            else:
                dest.mkdir()
                first = run_child([sha256sum, str(archive)])
                second = run_child([tar, "-xzf", str(archive), "-C", str(dest)])
                measure = Measure(first.seconds + second.seconds, max(first.peak_rss, second.peak_rss))
            shutil.rmtree(dest, ignore_errors=True)
            if name not in best or measure.seconds < best[name].seconds:
                best[name] = measure
    idle = run_child([sys.executable, "-c", IDLE])
    return {
        "archive_bytes": float(archive.stat().st_size),
        "pack_seconds": pack_seconds,
        "dropgate": best["dropgate"],
        "by hand": best["by hand"],
        "idle": idle,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, action="append", help="payload size in MiB (repeatable; default 256)")
    parser.add_argument("--files", type=int, default=400, help="number of payload files (default 400)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool, the best is kept (default 1)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="scratch folder (default: the system's temporary folder)"
    )
    args = parser.parse_args()
    sizes = args.size_mib or [256]
    mib = 2**20
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; times are the best of {args.repeat}")
    print()
    print(f"{'payload':>9} {'archive':>9} {'tool':<34} {'seconds':>8} {'MB/s':>7} {'peak RSS':>9}")
    for size in sizes:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="dropgate-bench-") as scratch:
            result = bench(size, args.files, Path(scratch), args.repeat)
        archive_bytes = float(result["archive_bytes"])  # type: ignore[arg-type]
        ours, theirs, idle = result["dropgate"], result["by hand"], result["idle"]
        assert isinstance(ours, Measure) and isinstance(theirs, Measure) and isinstance(idle, Measure)
        for label, measure in (
            ("dropgate authenticate + stage", ours),
            ("sha256sum + tar -xzf", theirs),
        ):
            print(
                f"{size:>6}MiB {archive_bytes / mib:>6.0f}MiB {label:<34} {measure.seconds:>8.2f} "
                f"{archive_bytes / measure.seconds / 1e6:>7.1f} {measure.peak_rss / mib:>6.1f}MiB"
            )
        print(
            f"{'':>20} ratio dropgate / by hand: time {ours.seconds / theirs.seconds:.2f}×, "
            f"peak RSS {ours.peak_rss / mib:.1f} MiB of which {(ours.peak_rss - idle.peak_rss) / mib:.1f} MiB "
            f"above the bare interpreter with dropgate imported ({idle.peak_rss / mib:.1f} MiB); "
            f"pack took {float(result['pack_seconds']):.1f}s"  # type: ignore[arg-type]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
