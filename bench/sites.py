"""The sample site the update benchmarks share: releases with assets, signed archives, a dropgate site, the floor.

Used by bench/downtime.py and bench/update.py (not a benchmark itself).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.archive import pack  # noqa: E402
from pipeline.demo import drop_archive, running_daemon, sandbox_config, wait_for_run  # noqa: E402
from pipeline.journal import Journal, Run  # noqa: E402
from pipeline.release import release_dir, switch_current  # noqa: E402
from pipeline.sample_platform import release_files, service_commands  # noqa: E402
from pipeline.sample_platform import start as start_app  # noqa: E402
from pipeline.sample_platform import stop as stop_app  # noqa: E402
from pipeline.signing import generate_keypair  # noqa: E402

TEXT = b"".join(b"record %08d: the quick brown fox jumps over the lazy dog\n" % n for n in range(2048))

MIGRATION = """#!{python}
import os
# A migration: rewrites the records file of the platform's data (as a schema change would).
path = os.path.join(os.environ["SITE_DATA"], "records.txt")
with open(path, "a") as handle:
    handle.write("migrated to " + os.environ["DROPGATE_TO_VERSION"] + "\\n")
"""


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


def fill_assets(folder: Path, size: int, files: int, seed: int) -> None:
    """`size` bytes in `files` files under `folder/assets/`, half incompressible, half text-like."""
    rng = random.Random(seed)
    each = max(1, size // files)
    for n in range(files):
        path = folder / "assets" / f"{n // 500:03d}" / f"asset-{n:05d}.bin"
        if n % 500 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(each) if n % 2 else (TEXT * (each // len(TEXT) + 1))[:each])


def make_release(folder: Path, version: str, size: int, files: int, seed: int, migration: bool = False) -> None:
    """The sample platform's release `version` plus `size` bytes of assets in `files` files."""
    for name, content in release_files(version).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)
    if migration:
        script = folder / "migrations" / "001_records.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(MIGRATION.format(python=sys.executable))
        script.chmod(0o755)
    fill_assets(folder, size, files, seed)


def make_data(folder: Path, size: int, files: int, seed: int = 5) -> None:
    """The platform's data: `size` bytes in `files` files (log-normal sizes, random bytes), and records.txt."""
    rng = random.Random(seed)
    weights = [rng.lognormvariate(0, 1.5) for _ in range(files)]
    scale = size / sum(weights)
    block = os.urandom(64 << 20)
    for n, weight in enumerate(weights):
        path = folder / f"d{n % 50:02d}" / f"s{(n // 50) % 20:02d}" / f"f{n:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        left, offset = max(1, int(weight * scale)), rng.randrange(0, len(block) - 1)
        with open(path, "wb") as handle:
            while left:
                chunk = block[offset : offset + left]
                handle.write(chunk)
                left -= len(chunk)
                offset = 0
    (folder / "records.txt").write_text("the platform's data\n")


def pack_update(
    work: Path, key: Path, version: str, size: int, files: int, seed: int, *, migration: bool = False
) -> Path:
    """A signed archive of release `version` (compression level 1, as a vendor's build might use)."""
    source = work / "build" / version
    make_release(source / "release", version, size, files, seed, migration)
    manifest: dict[str, Any] = {"product": "gts", "version": version, "channel": "stable", "min_version": "1.0.0"}
    if migration:
        manifest["migrations"] = ["migrations/001_records.py"]
    (source / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    archive = pack(source, key, work / "build", compresslevel=1)
    shutil.rmtree(source)
    return archive


def make_key(work: Path) -> tuple[Path, Path]:
    return generate_keypair(work / "build" / "vendor")


def dropgate_site(work: Path, installed: Path, public: Path, data: Path | None = None) -> dict[str, Any]:
    """A site running release 1.0.0 (a copy of `installed`) with dropgate configured; the app not started yet."""
    site = work / "dropgate"
    platform = site / "platform"
    for name in ("inbox", "state", "backups", "keys", "run"):
        (site / name).mkdir(parents=True)
    if data is None:
        (site / "data").mkdir()
        (site / "data" / "records.txt").write_text("the platform's data\n")
    else:
        data.rename(site / "data")
    shutil.copy(public, site / "keys" / "vendor.pub")
    shutil.copytree(installed, release_dir(platform, "1.0.0"), symlinks=True)
    switch_current(platform, release_dir(platform, "1.0.0"))
    app_port = free_port()
    config = sandbox_config(platform, app_port, free_port())
    config["policy"]["timeouts"] = {"validate": "1h", "backup": "1h", "apply": "10m", "verify": "5m"}
    config["verify"]["interval_seconds"] = 0.5
    config["backup"] = {"keep": 2}
    (site / "dropgate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return {"site": site, "platform": platform, "port": app_port, "config": site / "dropgate.yaml"}


@contextlib.contextmanager
def running(site: dict[str, Any]) -> Iterator[None]:
    """The sample application started, the daemon running; both stopped afterwards."""
    env_data = str(site["site"] / "data")
    os.environ["SITE_DATA"] = env_data  # the migration finds the data there (hooks inherit the environment)
    if start(site["platform"], site["port"]) != 0:
        raise SystemExit("the sample platform did not start")
    try:
        with running_daemon(site["config"], site["site"] / "state", site["site"] / "daemon.log"):
            yield
    finally:
        stop(site["platform"], site["port"])


def update(site: dict[str, Any], archive: Path) -> tuple[Run, float]:
    """Drop `archive` into the site's inbox and wait for its run; the run and the whole time from the drop."""
    began = time.perf_counter()
    drop_archive(archive, site["site"] / "inbox")
    run = wait_for_run(site["site"] / "state" / "journal.db", archive.name, timeout=7200)
    total = time.perf_counter() - began
    if run.outcome != "succeeded":
        raise SystemExit(f"the dropgate run ended {run.outcome}: {run.error} (see {site['site'] / 'daemon.log'})")
    return run, total


def step_seconds(site: dict[str, Any], run_id: int) -> dict[str, float]:
    """How long each step of the run took, from the journal."""
    journal = Journal(site["site"] / "state" / "journal.db", readonly=True)
    try:
        return {row["step"]: row["finished"] - row["started"] for row in journal.step_timings(run_id)}
    finally:
        journal.close()


def healthy(port: int, version: str | None = None) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            body = json.loads(answer.read())
    except (OSError, ValueError):
        return False
    return body.get("status") == "ok" and (version is None or body.get("version") == version)


def floor(site: dict[str, Any], version: str) -> float:
    """The platform's own floor, by hand: its stop and start commands (as dropgate runs them), then the first
    healthy answer (polled every millisecond)."""
    commands = service_commands(site["platform"], site["port"])
    began = time.perf_counter()
    subprocess.run(commands["stop"][0], check=True, capture_output=True)
    subprocess.run(commands["start"][0], check=True, capture_output=True)
    while not healthy(site["port"], version):
        time.sleep(0.001)
        if time.perf_counter() - began > 60:
            raise SystemExit("the sample platform did not come back within 60 s")
    return time.perf_counter() - began


def the_usual_way(work: Path, archive: Path, installed: Path, data: Path | None = None) -> dict[str, Any]:
    """The update as vendor updaters do it: maintenance on and stop, `tar` backup of the installation (and the
    data), extract, copy over, start, wait for the new version to answer, maintenance off."""
    site = work / "usual"
    root = site / "root"
    flag = site / "maintenance"
    shutil.copytree(installed, root / "current", symlinks=True)  # a plain folder, updated in place
    port = free_port()
    if start(root, port) != 0:
        raise SystemExit("the sample platform did not start")
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = now - since
        return now

    try:
        began = t = time.perf_counter()
        flag.write_text(json.dumps({"retry_after": 900}))
        stop(root, port)
        t = phase("maintenance on, stop", t)
        targets = ["-C", str(root / "current"), "."]
        if data is not None:
            targets += ["-C", str(data.parent), data.name]
        subprocess.run(["tar", "-cf", str(site / "backup.tar"), *targets], check=True)
        t = phase("backup (tar -cf)", t)
        extracted = site / "extracted"
        shutil.rmtree(extracted, ignore_errors=True)
        extracted.mkdir()
        subprocess.run(["tar", "-xzf", str(archive), "-C", str(extracted)], check=True)
        t = phase("extract (tar -xzf)", t)
        subprocess.run(["cp", "-a", f"{extracted / 'payload'}/.", str(root / "current")], check=True)
        t = phase("copy over (cp -a)", t)
        migration = root / "current" / "migrations" / "001_records.py"
        if migration.exists():
            subprocess.run([str(migration)], check=True, env={**os.environ, "DROPGATE_TO_VERSION": "new"})
            t = phase("migrate", t)
        if start(root, port) != 0:
            raise SystemExit("the sample platform did not start after the usual update")
        flag.unlink()
        phase("start, maintenance off", t)
        window = time.perf_counter() - began
    finally:
        stop(root, port)
        shutil.rmtree(site / "extracted", ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (site / "backup.tar").unlink()
    shutil.rmtree(site)
    return {"window": window, "phases": phases}


def load() -> str:
    """The machine's load averages, as `uptime` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cpus"
