"""How long the platform is down for an update: dropgate against the usual way, on the same update.

    .venv/bin/python bench/downtime.py                               # 1 GiB payload, 20,000 files
    .venv/bin/python bench/downtime.py --size-mib 64 --files 2000    # a quick look

The same update (the sample platform, 1.0.0 → 1.1.0, plus SIZE MiB of assets
in FILES files, half incompressible, half text-like) is applied twice, with
the sample application serving from the installed tree:

- dropgate: the real daemon takes the archive from its inbox. Authentication,
  staging into releases/1.1.0 and the backup of the data happen while the
  platform is in service; the maintenance window holds only stop, the switch
  of `current`, restart, the health check and start. The window is the time
  the maintenance flag existed (the run's `downtime_seconds`, also timed from
  outside by watching the flag).
- the usual way, as vendor updaters do it: maintenance on and stop, back up
  the installed tree (`tar -cf`, uncompressed: the kind variant), extract the
  archive (`tar -xzf`), copy it over the installation (`cp -a`), start,
  wait for the new version to answer, maintenance off.

The target is dropgate's window under 2 s plus the hooks' time (the update
has no hooks). Both runs see a warm page cache (the archive was just
written); the ratio is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.archive import pack  # noqa: E402
from pipeline.demo import drop_archive, running_daemon, sandbox_config, wait_for_run  # noqa: E402
from pipeline.release import release_dir, switch_current  # noqa: E402
from pipeline.sample_platform import release_files  # noqa: E402
from pipeline.sample_platform import start as start_app  # noqa: E402
from pipeline.sample_platform import stop as stop_app  # noqa: E402
from pipeline.signing import generate_keypair  # noqa: E402

TARGET_SECONDS = 2.0


def start(root: Path, port: int) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return start_app(root, port)


def stop(root: Path, port: int) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return stop_app(root, port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_release(folder: Path, version: str, size: int, files: int, seed: int) -> None:
    """The sample platform's release `version` plus `size` bytes of assets in `files` files."""
    rng = random.Random(seed)
    for name, content in release_files(version).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)
    each = max(1, size // files)
    text = b"".join(b"record %08d: the quick brown fox jumps over the lazy dog\n" % n for n in range(2048))
    for n in range(files):
        path = folder / "assets" / f"{n // 500:03d}" / f"asset-{n:05d}.bin"
        if n % 500 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(each) if n % 2 else (text * (each // len(text) + 1))[:each])


@dataclass
class FlagWatch:
    """Times, from outside, how long a file exists (polled every 2 ms)."""

    flag: Path
    appeared: float | None = None
    vanished: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.is_set():
            exists = self.flag.exists()
            now = time.perf_counter()
            if exists and self.appeared is None:
                self.appeared = now
            if not exists and self.appeared is not None and self.vanished is None:
                self.vanished = now
            time.sleep(0.002)

    def seconds(self) -> float | None:
        self.stop.set()
        self.thread.join()
        if self.appeared is None or self.vanished is None:
            return None
        return self.vanished - self.appeared


def with_dropgate(work: Path, archive: Path, installed: Path, public: Path) -> dict[str, Any]:
    site = work / "dropgate"
    platform = site / "platform"
    for name in ("inbox", "state", "backups", "data", "keys", "run"):
        (site / name).mkdir(parents=True)
    (site / "data" / "records.txt").write_text("the platform's data\n")
    shutil.copy(public, site / "keys" / "vendor.pub")
    shutil.copytree(installed, release_dir(platform, "1.0.0"), symlinks=True)
    switch_current(platform, release_dir(platform, "1.0.0"))
    app_port = free_port()
    config = sandbox_config(platform, app_port, free_port())
    config["policy"]["timeouts"] = {"validate": "1h", "backup": "1h", "apply": "10m", "verify": "5m"}
    config["verify"]["interval_seconds"] = 0.05
    (site / "dropgate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if start(platform, app_port) != 0:
        raise SystemExit("the sample platform did not start")
    try:
        with running_daemon(site / "dropgate.yaml", site / "state", site / "daemon.log"):
            watch = FlagWatch(site / "run" / "maintenance")
            began = time.perf_counter()
            drop_archive(archive, site / "inbox")
            run = wait_for_run(site / "state" / "journal.db", archive.name, timeout=3600)
            total = time.perf_counter() - began
            outside = watch.seconds()
    finally:
        stop(platform, app_port)
    if run.outcome != "succeeded":
        raise SystemExit(f"the dropgate run ended {run.outcome}: {run.error} (see {site / 'daemon.log'})")
    return {"window": float(run.facts["downtime_seconds"]), "watched": outside, "total": total}


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def the_usual_way(work: Path, archive: Path, installed: Path) -> dict[str, Any]:
    site = work / "usual"
    root = site / "root"
    flag = site / "maintenance"
    shutil.copytree(installed, root / "current", symlinks=True)  # a plain folder, updated in place
    port = free_port()
    if start(root, port) != 0:
        raise SystemExit("the sample platform did not start")
    phases: dict[str, float] = {}

    def phase(name: str, began: float) -> float:
        now = time.perf_counter()
        phases[name] = now - began
        return now

    try:
        began = t = time.perf_counter()
        flag.write_text(json.dumps({"retry_after": 900}))
        stop(root, port)
        t = phase("maintenance on, stop", t)
        sh("tar", "-cf", str(site / "backup.tar"), "-C", str(root / "current"), ".")
        t = phase("backup (tar -cf)", t)
        extracted = site / "extracted"
        extracted.mkdir()
        sh("tar", "-xzf", str(archive), "-C", str(extracted))
        t = phase("extract (tar -xzf)", t)
        sh("cp", "-a", f"{extracted / 'payload'}/.", str(root / "current"))
        t = phase("copy over (cp -a)", t)
        if start(root, port) != 0:
            raise SystemExit("the sample platform did not start after the usual update")
        flag.unlink()
        phase("start, maintenance off", t)
        window = time.perf_counter() - began
    finally:
        stop(root, port)
    return {"window": window, "phases": phases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="payload size (default 1024)")
    parser.add_argument("--files", type=int, default=20_000, help="payload files (default 20000)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dropgate-downtime-", dir=args.dir))
    try:
        size = args.size_mib * 2**20
        print(f"building releases 1.0.0 and 1.1.0: {args.size_mib} MiB in {args.files} files each ...", flush=True)
        installed = work / "build" / "installed"
        make_release(installed, "1.0.0", size, args.files, seed=1)
        source = work / "build" / "1.1.0"
        make_release(source / "release", "1.1.0", size, args.files, seed=2)
        manifest = {"product": "gts", "version": "1.1.0", "channel": "stable", "min_version": "1.0.0"}
        (source / "manifest.yaml").write_text(yaml.safe_dump(manifest))
        private, public = generate_keypair(work / "build" / "vendor")
        print("packing and signing the archive ...", flush=True)
        archive = pack(source, private, work / "build", compresslevel=1)
        print(f"archive {archive.name}: {archive.stat().st_size / 2**20:.0f} MiB", flush=True)

        print("updating with dropgate ...", flush=True)
        dropgate = with_dropgate(work, archive, installed, public)
        print("updating the usual way ...", flush=True)
        usual = the_usual_way(work, archive, installed)

        ratio = usual["window"] / dropgate["window"] if dropgate["window"] > 0 else float("inf")
        watched = f"{dropgate['watched']:.2f}s" if dropgate["watched"] is not None else "not seen"
        print()
        mib = archive.stat().st_size / 2**20
        print(f"update 1.0.0 → 1.1.0: {args.size_mib} MiB in {args.files} files (archive {mib:.0f} MiB)")
        print(f"{'':24}{'maintenance window':>20}{'whole update':>16}")
        print(f"{'dropgate':24}{dropgate['window']:>19.2f}s{dropgate['total']:>15.1f}s", end="")
        print(f"   (flag watched from outside: {watched})")
        print(f"{'the usual way':24}{usual['window']:>19.2f}s{usual['window']:>15.1f}s")
        for name, seconds in usual["phases"].items():
            print(f"  {name:22}{seconds:>19.2f}s")
        print(f"ratio: dropgate's maintenance window is {ratio:.1f}x shorter")
        met = "met" if dropgate["window"] < TARGET_SECONDS else "NOT met"
        print(f"target: under {TARGET_SECONDS:g}s plus hook time (no hooks here): {met}")
        return 0 if dropgate["window"] < TARGET_SECONDS else 1
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
