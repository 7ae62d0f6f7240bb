"""Shared fixtures: a sandbox site on the real filesystem, the real daemon and CLI as subprocesses.

Nothing here is mocked: `site` writes a real configuration, platform tree and
vendor key pair under tmp_path; `daemon` starts `python -m pipeline run` and
stops it with SIGTERM; `site.cli` runs the real command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import psutil
import pytest
import yaml

from pipeline.archive import write_build_dir

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))


def cannot_run(reason: str) -> NoReturn:
    """Skip a test this machine cannot run; under CI fail instead, since CI must run everything."""
    if IN_CI:
        pytest.fail(f"{reason}, and CI must run every test (.ci/run installs what the tests need)")
    pytest.skip(reason)  # only outside CI: under CI the line above has failed the test


def require_tool(name: str) -> str:
    """The path of a system tool; skip when missing locally, fail when CI is set (CI runs everything)."""
    path = shutil.which(name)
    if path is None:
        cannot_run(f"{name} is not installed")
    return path


def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class DaemonProcess:
    def __init__(self, site: Site, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.site = site
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the daemon did not stop within {timeout}s of SIGTERM:\n{self.output()[-3000:]}")
        return -1

    def kill(self) -> None:
        """SIGKILL: the daemon dies at once, as on a crash or power loss (its children live on)."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=10)


class Site:
    """A sandbox site: config, inbox, state, platform with release 1.0.0, a vendor key pair."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.state = root / "state"
        self.backups = root / "backups"
        self.platform = root / "platform"
        self.data = root / "data"
        self.keys = root / "keys"
        self.config_path = root / "dropgate.yaml"
        self.port = free_port()
        self.daemons: list[DaemonProcess] = []
        for folder in (self.inbox, self.state, self.backups, self.data, self.keys):
            folder.mkdir(parents=True, exist_ok=True)
        release = self.platform / "releases" / "1.0.0"
        release.mkdir(parents=True)
        (release / "VERSION").write_text("1.0.0\n")
        (release / "app.txt").write_text("the platform, release 1.0.0\n")
        os.symlink("releases/1.0.0", self.platform / "current")
        (self.data / "records.txt").write_text("patient records\n")
        self.config: dict[str, Any] = {
            "paths": {"inbox": "inbox", "state": "state", "backups": "backups"},
            "platform": {"product": "gts", "root": "platform", "data": ["data"]},
            "trust": {"keys": ["keys/vendor.pub"]},
            "inbox": {"settle_seconds": 0.3, "rescan_seconds": 2},
            "prereq": {
                "min_cpus": 1,
                "recommended_cpus": 1,
                "min_memory_gib": 0.25,
                "recommended_memory_gib": 0.25,
                "min_free_percent": 1,
            },
            "maintenance": {"flag_file": "run/maintenance"},
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
            "control": {"admin_group": "root"},
            "policy": {"timeouts": {"backup": "2m", "apply": "2m", "verify": "1m"}},
        }
        self.write_config()
        self._keypair: tuple[Path, Path] | None = None

    # -- configuration -----------------------------------------------------
    def write_config(self, **sections: Any) -> Path:
        self.config = deep_merge(self.config, sections)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return self.config_path

    # -- the command line ----------------------------------------------------
    def cli(
        self, *args: str, timeout: float = 120.0, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            input=input_text,
        )

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    def history(self) -> list[dict[str, Any]]:
        result = self.cli("history", "--json", "--limit", "1000")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def show(self, run_id: int) -> dict[str, Any]:
        result = self.cli("show", str(run_id), "--json", "--log")
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    def run(self, run_id: int) -> dict[str, Any] | None:
        result = self.cli("show", str(run_id), "--json")
        return dict(json.loads(result.stdout)) if result.returncode == 0 else None

    def wait_outcome(self, run_id: int, timeout: float = 60.0) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            run = self.run(run_id)
            return run if run is not None and run["outcome"] else None

        return dict(wait_for(finished, timeout=timeout, what=f"run {run_id} to finish"))

    def wait_step(self, run_id: int, step: str, timeout: float = 60.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            run = self.run(run_id)
            if run is not None and run["outcome"]:
                pytest.fail(f"run {run_id} ended {run['outcome']} before reaching {step}: {run['error']}")
            return run if run is not None and run["step"] == step else None

        return dict(wait_for(reached, timeout=timeout, what=f"run {run_id} to reach {step}"))

    # -- archives ------------------------------------------------------------
    def keypair(self) -> tuple[Path, Path]:
        if self._keypair is None:
            result = self.cli("keygen", "-o", str(self.keys / "vendor"))
            assert result.returncode == 0, result.stderr
            self._keypair = (self.keys / "vendor.key", self.keys / "vendor.pub")
        return self._keypair

    def pack(self, version: str, files: dict[str, str | bytes] | None = None, **manifest: Any) -> Path:
        """A signed archive `gts.<version>.tgz` built with the real `dropgate pack`."""
        private, _ = self.keypair()
        body = {"product": "gts", "version": version, "channel": "stable", "min_version": "1.0.0", **manifest}
        payload = {"VERSION": f"{version}\n", "app.txt": f"the platform, release {version}\n", **(files or {})}
        source = write_build_dir(self.root / "build" / version, body, payload)
        out = self.root / "build" / f"gts.{version}.tgz"
        result = self.cli("pack", str(source), "--key", str(private), "-o", str(out))
        assert result.returncode == 0, result.stderr
        return out

    def drop(self, source: Path | bytes, name: str | None = None) -> Path:
        """Upload into the inbox the way sftp clients do: a hidden .part file renamed when complete."""
        name = name or (source.name if isinstance(source, Path) else "upload.bin")
        part = self.inbox / f".{name}.part"
        if isinstance(source, Path):
            shutil.copyfile(source, part)
        else:
            part.write_bytes(source)
        target = self.inbox / name
        os.rename(part, target)
        return target

    # -- the daemon ------------------------------------------------------------
    def start_daemon(
        self, *, wait: bool = True, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> DaemonProcess:
        log_path = self.root / f"daemon-{len(self.daemons)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "--config", str(self.config_path), "run", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
            )
        daemon = DaemonProcess(self, proc, log_path)
        self.daemons.append(daemon)
        if wait:

            def ready() -> bool:
                if not daemon.alive():
                    pytest.fail(f"the daemon exited with {proc.returncode}:\n{daemon.output()[-3000:]}")
                return (self.state / "control.sock").exists() and self.metrics_text() is not None

            wait_for(ready, timeout=30, what="the daemon to be ready")
        return daemon

    def metrics_text(self) -> str | None:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return None

    def metric(self, name: str, labels: str = "") -> float | None:
        text = self.metrics_text() or ""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    sandbox = Site(tmp_path / "site")
    yield sandbox
    for daemon in sandbox.daemons:
        if daemon.alive():
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves child processes or threads behind (and clean them up)."""
    threads_before = set(threading.enumerate())
    yield
    me = psutil.Process()
    children = me.children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    leaked_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive() and not t.daemon]
    names = [f"{c.pid}" for c in children]
    assert not names, f"the test left child processes running: {names}"
    assert not leaked_threads, f"the test left threads running: {leaked_threads}"
