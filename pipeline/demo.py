"""`dropgate demo`: a sandbox site in one folder, for a first look at dropgate at work.

It builds a site (the sample platform on release 1.0.0 with its front, a
vendor key pair, a configuration), starts the sample platform and the daemon,
then drops three archives one after another and shows what happens:

1. a patch 1.0.0 → 1.0.1: applied live, the platform never shows maintenance;
2. a minor update 1.0.1 → 1.1.0 with a migration: downtime behind the
   maintenance page, measured;
3. a download damaged in transit: rejected, nothing touched.

With `--once` it stops everything afterwards and exits 0 only if every run
ended as expected; otherwise the site keeps running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import grp
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from pipeline.archive import pack, write_build_dir
from pipeline.errors import DropgateError, JournalError
from pipeline.journal import Journal, Run
from pipeline.release import release_dir, switch_current
from pipeline.report import JOURNAL_NAME, daemon_pid
from pipeline.sample_platform import front_command, release_files, service_commands, start, stop, write_release
from pipeline.signing import generate_keypair

MARKER = ".dropgate-demo"
RUN_TIMEOUT = 180.0


@dataclass(frozen=True)
class Sample:
    """One archive the demo drops, and how its run must end."""

    name: str
    what: str
    expected: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare_folder(folder: Path) -> None:
    """An empty folder, or a previous demo's folder (wiped) — never someone else's files."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise DropgateError(f"{folder} is not empty and is not a demo site; choose another folder with --dir")
        pid = daemon_pid(folder / "state")
        if pid is not None:
            raise DropgateError(f"a demo is still running in {folder} (daemon pid {pid}); stop it first")
        ports = json.loads((folder / MARKER).read_text() or "{}")
        if "app_port" in ports:
            stop(folder / "platform", int(ports["app_port"]))
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def _migration(python: str) -> str:
    """A migration that takes a moment and reports its progress on DROPGATE_PROGRESS_FD (SPEC 5.5)."""
    return f"""#!{python}
import json, os, time
fd = int(os.environ.get("DROPGATE_PROGRESS_FD", "-1"))
for batch in range(1, 5):
    print(f"migrating records, batch {{batch}} of 4", flush=True)
    if fd >= 0:
        os.write(fd, (json.dumps({{"progress": batch / 4, "message": f"batch {{batch}} of 4"}}) + "\\n").encode())
    time.sleep(0.25)
"""


def _build_archive(site: Path, key: Path, version: str, manifest: dict[str, Any], files: dict[str, str]) -> Path:
    body = {"product": "gts", "version": version, "channel": "stable", "min_version": "1.0.0", **manifest}
    return pack(write_build_dir(site / "vendor" / version, body, files), key, site / "archives")


def sandbox_config(platform: Path, app_port: int, status_port: int) -> dict[str, Any]:
    """The configuration of a sandbox site whose folder holds `platform` (paths relative to that folder)."""
    return {
        "paths": {"inbox": "inbox", "state": "state", "backups": "backups"},
        "platform": {
            "product": "gts",
            "root": "platform",
            "data": ["data"],
            "keep_releases": 3,
            "services": service_commands(platform.absolute(), app_port),
        },
        "trust": {"keys": ["keys/vendor.pub"]},
        "inbox": {"settle_seconds": 0.3, "rescan_seconds": 2},
        # The sandbox runs on any laptop: the production thresholds (4 cores, 8 GiB) are lowered.
        "prereq": {
            "min_cpus": 1,
            "recommended_cpus": 1,
            "min_memory_gib": 0.25,
            "recommended_memory_gib": 0.25,
            "min_free_percent": 1,
        },
        "maintenance": {"flag_file": "run/maintenance", "retry_after": "5m"},
        "verify": {
            "http": [{"url": f"http://127.0.0.1:{app_port}/health", "version": True}],
            "interval_seconds": 0.2,
        },
        "policy": {"timeouts": {"validate": "2m", "backup": "5m", "apply": "2m", "verify": "1m"}},
        "metrics": {"listen": f"127.0.0.1:{status_port}"},
        "control": {"admin_group": grp.getgrgid(os.getgid()).gr_name},
    }


def build_site(folder: Path, status_port: int) -> dict[str, Any]:
    """Write the whole sandbox; returns what the demo needs to run it."""
    _prepare_folder(folder)
    app_port, front_port = _free_port(), _free_port()
    (folder / MARKER).write_text(json.dumps({"app_port": app_port}))
    platform = folder / "platform"
    for name in ("inbox", "state", "backups", "data", "keys", "archives", "run"):
        (folder / name).mkdir()
    (folder / "data" / "records.txt").write_text("the platform's data: backed up before every update\n")
    write_release(release_dir(platform, "1.0.0"), "1.0.0")
    switch_current(platform, release_dir(platform, "1.0.0"))
    private, _public = generate_keypair(folder / "keys" / "vendor")

    samples = [
        Sample(
            _build_archive(folder, private, "1.0.1", {"notes": "A patch: fixes only."}, release_files("1.0.1")).name,
            "a patch: applied live, the platform stays in service",
            "succeeded",
        ),
        Sample(
            _build_archive(
                folder,
                private,
                "1.1.0",
                {"notes": "New features; migrates the records.", "migrations": ["migrations/001_records.py"]},
                {**release_files("1.1.0"), "migrations/001_records.py": _migration(sys.executable)},
            ).name,
            "a minor update with a migration: downtime behind the maintenance page",
            "succeeded",
        ),
    ]
    good = _build_archive(folder, private, "1.2.0", {"notes": "Damaged on the way."}, release_files("1.2.0"))
    data = bytearray(good.read_bytes())
    data[-200] ^= 0xFF  # one byte flipped in transit, deep in the payload
    good.write_bytes(bytes(data))
    samples.append(Sample(good.name, "a download damaged in transit: rejected, nothing touched", "rejected"))

    config = sandbox_config(platform, app_port, status_port)
    config_path = folder / "dropgate.yaml"
    header = "# The demo site's configuration, written by `dropgate demo`.\n"
    config_path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return {
        "config": config_path,
        "platform": platform,
        "app_port": app_port,
        "front_port": front_port,
        "samples": samples,
    }


class Console:
    """Timestamped lines on the terminal."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)


def _platform_answer(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
    except OSError:
        return "not answering"
    finally:
        connection.close()
    if response.status == 503:
        return f"503 maintenance page (Retry-After {response.getheader('Retry-After')})"
    return f"{response.status} (release {response.getheader('X-Platform-Version', '?')})"


def _find_run(journal: Journal, name: str) -> Run | None:
    return next((run for run in journal.runs(limit=20) if run.archive == name), None)


def _describe(run: Run) -> str:
    versions = f"{run.from_version or '?'} → {run.to_version or '?'}"
    if run.outcome == "succeeded":
        downtime = run.facts.get("downtime_seconds")
        window = f"downtime {float(downtime):.2f}s" if run.facts.get("downtime") and downtime else "no downtime"
        return f"{versions}, {window}"
    return run.error or versions


def wait_for_run(
    journal_path: Path, name: str, *, timeout: float = RUN_TIMEOUT, on_poll: Callable[[Run | None], None] | None = None
) -> Run:
    """Poll the journal (read-only, as `status` does) until the run of archive `name` has an outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = None
        try:
            journal = Journal(journal_path, readonly=True)
        except JournalError:
            pass
        else:
            try:
                run = _find_run(journal, name)
            except JournalError:  # the daemon is still creating it
                run = None
            finally:
                journal.close()
        if on_poll is not None:
            on_poll(run)
        if run is not None and run.outcome:
            return run
        time.sleep(0.1)
    raise DropgateError(f"{name} did not finish within {timeout:g}s; see the daemon's log")


def follow(journal_path: Path, sample: Sample, front_port: int, console: Console) -> Run:
    """Print the run's steps and what visitors see until it ends; the finished run."""
    seen = {"step": "", "answer": ""}

    def show(run: Run | None) -> None:
        answer = _platform_answer(front_port)
        if answer != seen["answer"]:
            console.say(f"    visitors get: {answer}")
            seen["answer"] = answer
        if run is not None and not run.outcome:
            step = f"{run.step} ({run.progress_message})" if run.progress_message else run.step
            if step != seen["step"]:
                console.say(f"  run {run.id}: {step}")
                seen["step"] = step

    return wait_for_run(journal_path, sample.name, on_poll=show)


@contextmanager
def background_process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process for the duration of the block (output to `log`), sent SIGTERM at the end."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@contextmanager
def running_daemon(config: Path, state: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`dropgate run` on `config`, ready (lock held, journal open) when the block starts."""
    with background_process([sys.executable, "-m", "pipeline", "--config", str(config), "run"], log) as daemon:
        deadline = time.monotonic() + 30
        while daemon_pid(state) is None or not (state / JOURNAL_NAME).exists():
            if daemon.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise DropgateError(f"the daemon exited with {daemon.returncode}: {' | '.join(tail)}")
            if time.monotonic() > deadline:
                raise DropgateError(f"the daemon did not start within 30s; see {log}")
            time.sleep(0.1)
        yield daemon


def drop_archive(archive: Path, inbox: Path) -> None:
    """As an SFTP client would: a hidden partial file, renamed when complete."""
    part = inbox / f".{archive.name}.part"
    shutil.copyfile(archive, part)
    part.rename(inbox / archive.name)


def run_demo(folder: Path, *, once: bool, status_port: int, console: Console) -> int:
    site = build_site(folder, status_port or _free_port())
    config: Path = site["config"]
    platform: Path = site["platform"]
    app_port: int = site["app_port"]
    front_port: int = site["front_port"]
    listen = yaml.safe_load(config.read_text())["metrics"]["listen"]
    with ExitStack() as stack:
        if start(platform, app_port) != 0:
            raise DropgateError(f"the sample platform did not start; see {platform / 'run' / 'app.log'}")
        stack.callback(stop, platform, app_port)
        stack.enter_context(
            background_process(
                front_command(front_port, app_port, folder / "run" / "maintenance", f"http://{listen}/"),
                folder / "front.log",
            )
        )
        daemon_log = folder / "daemon.log"
        daemon = stack.enter_context(running_daemon(config, folder / "state", daemon_log))
        print(f"dropgate demo: a sandbox site in {folder}")
        print(f"  status page   http://{listen}/")
        print(f"  the platform  http://127.0.0.1:{front_port}/   (the status page also at /dropgate/)")
        print(f"  inbox         {folder / 'inbox'}")
        print(f"  try           dropgate --config {config} status")
        print()
        results = []
        for sample in site["samples"]:
            console.say(f"drop {sample.name}: {sample.what}")
            drop_archive(folder / "archives" / sample.name, folder / "inbox")
            run = follow(folder / "state" / JOURNAL_NAME, sample, front_port, console)
            verdict = "as expected" if run.outcome == sample.expected else f"EXPECTED {sample.expected}"
            console.say(f"run {run.id} {sample.name}: {run.outcome}: {_describe(run)}  [{verdict}]")
            console.say(f"    visitors get: {_platform_answer(front_port)}")
            results.append(run.outcome == sample.expected)
        ok = all(results)
        print()
        print(f"{sum(results)} of {len(results)} runs ended as expected." + ("" if ok else f" See {daemon_log}."))
        if once:
            return 0 if ok else 1
        print(f"The site keeps running: drop archives into {folder / 'inbox'}")
        print(f"(build them with `dropgate pack DIR --key {folder / 'keys' / 'vendor.key'} -o OUT`). Ctrl-C stops.")
        try:
            while daemon.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print()
        return 0 if ok else 1
    return 1  # unreachable: the with block returns


def cmd_demo(args: argparse.Namespace) -> int:
    """`dropgate demo [--dir DIR] [--once] [--port N]`."""
    folder = Path(args.dir or "demo-site").absolute()

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the demo like Ctrl-C: everything it started is stopped

    signal.signal(signal.SIGTERM, interrupted)
    return run_demo(folder, once=args.once, status_port=args.port, console=Console())
