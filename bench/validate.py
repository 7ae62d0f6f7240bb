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

    .venv/bin/python bench/validate.py --daemon [--payload-mib 512]

runs the real daemon, with the default limits, on archives at and past those
limits (signed with the trusted key: the attacker holds a vendor key), one
fresh daemon per archive dropped into its inbox, and prints each run's
outcome, time and the daemon's peak RSS (VmHWM), against the 100 MiB budget:
200,000 entries (limits.max_members, accepted) with short and with long paths
(a manifest near limits.max_manifest_bytes), 200,000 folders, one entry more, a 56 MiB
manifest of 520,000 files, 250,000 entries within limits.max_manifest_bytes,
manifest.json nested 32 MiB deep, manifest.sig nested 4 KiB deep (unsigned),
and a large payload.
"""

from __future__ import annotations

import argparse
import base64
import grp
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402

from pipeline.archive import pack  # noqa: E402
from pipeline.demo import drop_archive, running_daemon, wait_for_run  # noqa: E402
from pipeline.signing import SigningKey, generate_keypair, load_signing_key  # noqa: E402

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


def run_child(argv: list[str]) -> Measure:
    """Run `argv` to completion; its wall time and peak resident set size.

    The peak is VmHWM sampled every few milliseconds: wait4's ru_maxrss would
    include this (large) parent's memory, which Linux carries across fork and exec.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, harness.high_water(proc.pid))
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


# -- the daemon at and past the default limits -------------------------------------

BUDGET_MIB = 100
ENTRY_DIRS = 300


def _head(manifest: bytes, signature: bytes) -> bytes:
    blocks = b""
    for name, data in (("manifest.json", manifest), ("manifest.sig", signature)):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        blocks += info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)
    return gzip.compress(blocks, compresslevel=0, mtime=0)


def _signature(key: SigningKey, manifest: bytes) -> bytes:
    raw = base64.b64encode(key.sign(manifest)).decode()
    return json.dumps({"algorithm": "ed25519", "key_id": key.key_id, "signature": raw}).encode()


def forge(out: Path, text: object, payload: Path, key: SigningKey, signature: bytes | None = None) -> Path:
    """An archive: a level-0 head (its size then depends only on the length's digits) and `payload` as it is."""
    assert callable(text)
    size = payload.stat().st_size
    length = size
    for _ in range(10):
        manifest: bytes = text(length)
        head = _head(manifest, signature if signature is not None else _signature(key, manifest))
        if len(head) + size == length:
            break
        length = len(head) + size
    with open(out, "wb") as archive, open(payload, "rb") as body:
        archive.write(head)
        shutil.copyfileobj(body, archive, CHUNK)
    return out


def _entries(count: int) -> tuple[list[str], list[tuple[str, bytes]]]:
    """`count` entries: ENTRY_DIRS folders and small files spread over them."""
    dirs = [f"m{index:03d}" for index in range(ENTRY_DIRS)]
    files = [(f"m{index % ENTRY_DIRS:03d}/f{index:07d}", b"%d\n" % index) for index in range(count - ENTRY_DIRS)]
    return dirs, files


def _manifest_text(dirs: list[str], files: list[tuple[str, bytes]], *, sha: bool = True) -> object:
    entries = ",".join(
        f'"{path}":{{"size":{len(data)},"sha256":"{hashlib.sha256(data).hexdigest() if sha else "0" * 64}",'
        '"mode":"0644"}'
        for path, data in files
    )
    head = '"format":1,"product":"gts","version":"2.0.0","channel":"stable"'
    rest = f'{head},"dirs":{json.dumps(dirs)},"files":{{{entries}}}}}'
    return lambda length: f'{{"length":{length},{rest}'.encode()


def _payload(out: Path, dirs: list[str], files: list[tuple[str, bytes]]) -> Path:
    with (
        open(out, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in dirs:
            info = tarfile.TarInfo(f"payload/{name}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(f"payload/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out


def _site(folder: Path) -> tuple[Path, SigningKey]:
    """A site with release 1.0.0 live and the default limits; the daemon needs no platform services."""
    for name in ("inbox", "state", "backups", "data", "keys", "platform/releases/1.0.0"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / "platform/releases/1.0.0/VERSION").write_text("1.0.0\n")
    (folder / "platform/current").symlink_to("releases/1.0.0")
    (folder / "data/records.txt").write_text("records\n")
    private, _public = generate_keypair(folder / "keys" / "vendor")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = {
        "paths": {"inbox": "inbox", "state": "state", "backups": "backups"},
        "platform": {"product": "gts", "root": "platform", "data": ["data"]},
        "trust": {"keys": ["keys/vendor.pub"]},
        "inbox": {"settle_seconds": 0.3, "rescan_seconds": 2},
        "prereq": {"min_cpus": 1, "recommended_cpus": 1, "min_memory_gib": 0.25, "recommended_memory_gib": 0.25,
                   "min_free_percent": 1},
        "maintenance": {"flag_file": "run/maintenance"},
        "metrics": {"listen": f"127.0.0.1:{port}"},
        "control": {"admin_group": grp.getgrgid(os.getgid()).gr_name},
        "policy": {"timeouts": {"validate": "1h", "backup": "1h"}},
    }  # fmt: skip
    (folder / "dropgate.yaml").write_text(yaml.safe_dump(config))
    return folder / "dropgate.yaml", load_signing_key(private)


def _through_daemon(folder: Path, archive: Path) -> tuple[str, float, int, int]:
    """Drop `archive` into a fresh daemon's inbox: outcome (and reason), seconds, daemon peak RSS, idle RSS."""
    config = folder / "dropgate.yaml"
    with running_daemon(config, folder / "state", folder / "daemon.log") as daemon:
        time.sleep(2)
        idle = harness.high_water(daemon.pid)
        started = time.perf_counter()
        drop_archive(archive, folder / "inbox")
        run = wait_for_run(folder / "state" / "journal.db", archive.name, timeout=7200)
        seconds = time.perf_counter() - started
        peak = harness.high_water(daemon.pid)
    outcome = run.outcome or "?"
    if run.error:
        outcome += f": {run.error[:90]}"
    return outcome, seconds, peak, idle


def daemon_cases(workdir: Path, payload_mib: int, only: str = "") -> int:
    mib = 2**20
    cases: list[tuple[str, object]] = []

    def case(name: str) -> object:
        def register(build: object) -> object:
            cases.append((name, build))
            return build

        return register

    @case("200,000 entries (limits.max_members)")
    def at_max_members(folder: Path, key: SigningKey) -> Path:
        dirs, files = _entries(200_000)
        payload = _payload(folder / "payload.gz", dirs, files)
        return forge(folder / "gts.2.0.0.tgz", _manifest_text(dirs, files), payload, key)

    @case("200,000 entries in a 31 MiB manifest (long paths)")
    def at_max_manifest(folder: Path, key: SigningKey) -> Path:
        dirs, files = _entries(200_000)
        files = [(f"{path}-{'long-name-' * 4}{'x' * 6}.js", data) for path, data in files]
        payload = _payload(folder / "payload.gz", dirs, files)
        return forge(folder / "gts.2.0.0.tgz", _manifest_text(dirs, files), payload, key)

    @case("199,999 folders and a file")
    def many_folders(folder: Path, key: SigningKey) -> Path:
        dirs = [f"d{index // 1000:03d}" for index in range(0, 199_000, 1000)]
        dirs += [f"d{index // 1000:03d}/s{index:06d}" for index in range(199_999 - len(dirs))]
        files = [("VERSION", b"2.0.0\n")]
        payload = _payload(folder / "payload.gz", dirs, files)
        return forge(folder / "gts.2.0.0.tgz", _manifest_text(dirs, files), payload, key)

    @case("200,001 entries (one past max_members)")
    def past_max_members(folder: Path, key: SigningKey) -> Path:
        dirs, files = _entries(200_001)
        payload = _payload(folder / "payload.gz", dirs, files)
        return forge(folder / "gts.2.0.0.tgz", _manifest_text(dirs, files), payload, key)

    @case("a 56 MiB manifest of 520,000 files")
    def huge_manifest(folder: Path, key: SigningKey) -> Path:
        dirs, files = _entries(520_000)
        payload = _payload(folder / "payload.gz", dirs[:1], [])
        return forge(folder / "gts.2.0.0.tgz", _manifest_text(dirs, files, sha=False), payload, key)

    @case("250,000 entries within max_manifest_bytes")
    def many_entries(folder: Path, key: SigningKey) -> Path:
        dirs, files = _entries(250_000)
        payload = _payload(folder / "payload.gz", dirs[:1], [])
        return forge(folder / "gts.2.0.0.tgz", _manifest_text(dirs, files, sha=False), payload, key)

    @case("manifest.json nested 32 MiB deep")
    def deep_manifest(folder: Path, key: SigningKey) -> Path:
        depth = 32 * mib - 200
        payload = _payload(folder / "payload.gz", [], [])
        return forge(
            folder / "gts.2.0.0.tgz", lambda n: f'{{"length":{n},"notes":'.encode() + b"[" * depth, payload, key
        )

    @case("manifest.sig nested 4 KiB deep (unsigned)")
    def deep_signature(folder: Path, key: SigningKey) -> Path:
        dirs, files = _entries(ENTRY_DIRS + 10)
        payload = _payload(folder / "payload.gz", dirs, files)
        return forge(folder / "gts.2.0.0.tgz", _manifest_text(dirs, files), payload, key, signature=b"[" * 4096)

    @case(f"a {payload_mib} MiB payload")
    def big_payload(folder: Path, key: SigningKey) -> Path:
        source = folder / "src"
        make_tree(source / "release", payload_mib * mib, 400)
        (source / "manifest.yaml").write_text('product: gts\nversion: "2.0.0"\n')
        private = folder / "keys" / "vendor.key"
        archive = pack(source, private, folder)
        shutil.rmtree(source)
        return archive

    print(f"the real daemon, default limits, one fresh daemon per archive; budget {BUDGET_MIB} MiB peak RSS")
    print(f"{'archive':<44} {'size':>8} {'seconds':>8} {'idle':>7} {'peak RSS':>9}  outcome")
    worst = 0
    for name, build in cases:
        if only not in name:
            continue
        with tempfile.TemporaryDirectory(dir=workdir, prefix="dropgate-bench-") as scratch:
            folder = Path(scratch)
            _config, key = _site(folder)
            assert callable(build)
            archive = build(folder, key)
            (folder / "payload.gz").unlink(missing_ok=True)
            outcome, seconds, peak, idle = _through_daemon(folder, archive)
            worst = max(worst, peak)
            print(
                f"{name:<44} {archive.stat().st_size / mib:>6.1f}MB {seconds:>8.1f} {idle / mib:>5.1f}MB "
                f"{peak / mib:>7.1f}MB  {outcome}",
                flush=True,
            )
    verdict = "within" if worst < BUDGET_MIB * mib else "ABOVE"
    print(f"highest peak {worst / mib:.1f} MiB: {verdict} the {BUDGET_MIB} MiB budget")
    return 0 if worst < BUDGET_MIB * mib else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, action="append", help="payload size in MiB (repeatable; default 256)")
    parser.add_argument("--files", type=int, default=400, help="number of payload files (default 400)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool, the best is kept (default 1)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="scratch folder (default: the system's temporary folder)"
    )
    parser.add_argument("--daemon", action="store_true", help="the real daemon on archives at and past the limits")
    parser.add_argument("--payload-mib", type=int, default=512, help="with --daemon: the large payload (default 512)")
    parser.add_argument("--only", default="", help="with --daemon: only the cases whose name contains this")
    args = parser.parse_args()
    if args.daemon:
        return daemon_cases(args.dir or Path(tempfile.gettempdir()), args.payload_mib, args.only)
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
