"""Helpers shared by the step tests: a recording Reporter and a whole-tree fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RecordingReporter:
    """What a step reported, as the runner would have recorded it (the runner's side, not a mock of the step)."""

    events: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)

    def event(self, run_id: int, step: str, message: str) -> None:
        self.events.append(message)

    def log(self, run_id: int, line: str) -> None:
        self.logs.append(line)

    def progress(self, run_id: int, step: str, ratio: float, message: str | None) -> None:
        self.ratios.append(ratio)

    def update_run(self, run_id: int, **fields: Any) -> None:
        self.updates.append(fields)

    @property
    def facts(self) -> dict[str, Any]:
        """The facts as the journal holds them after the last save."""
        merged: dict[str, Any] = {}
        for update in self.updates:
            merged.update(update.get("facts", {}))
        return merged


def tree_digest(root: Path, *, dir_times: bool = True) -> str:
    """One hash over `root` and every entry under it: path, type, mode, owner, mtime, content or link target.

    Two trees with the same digest are byte-identical, modes and times included
    (folder times only with `dir_times`: creating a file inside changes them).
    """
    digest = hashlib.sha256()
    info = root.lstat()
    digest.update(f".|{stat.S_IMODE(info.st_mode):o}|{info.st_mtime_ns if dir_times else 0}|".encode())
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted([*dirs, *files]):
            path = Path(folder, name)
            info = path.lstat()
            rel = path.relative_to(root).as_posix()
            digest.update(os.fsencode(rel) + f"|{stat.S_IFMT(info.st_mode)}|{stat.S_IMODE(info.st_mode):o}|".encode())
            digest.update(f"{info.st_uid}:{info.st_gid}|".encode())
            if stat.S_ISLNK(info.st_mode):
                digest.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(info.st_mode):
                digest.update(f"{info.st_mtime_ns}|".encode() + hashlib.sha256(path.read_bytes()).digest())
            elif dir_times:
                digest.update(f"{info.st_mtime_ns}".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` at `mount` for full-disk tests (root only), unmounted afterwards."""
    from tests.conftest import cannot_run

    mount.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        cannot_run(f"cannot mount a tmpfs for a full-disk test: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_filesystem(path: Path) -> Path:
    """Write the file `path` until its filesystem has no space left (another writer taking it all).

    Unbuffered: a partial last write leaves nothing in a buffer for close() to fail on.
    """
    with open(path, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
    return path


class SilentServer:
    """A real TCP server on loopback that accepts connections and never answers (a hung backend).

    The first `answer_first` connections get a plain `200 ok` (a platform healthy
    until it hangs). Used as a context manager; it closes every connection it
    holds on exit.
    """

    def __init__(self, answer_first: int = 0) -> None:
        import socket
        import threading

        self.answer_first = answer_first
        self.answered = 0
        self._socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._socket.settimeout(0.2)
        self.port = int(self._socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/health"
        self.connections: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.answered < self.answer_first:
                self.answered += 1
                with conn:
                    conn.settimeout(5)
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                continue
            self.connections.append(conn)  # held open, never read from, never answered

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()
        for conn in self.connections:
            conn.close()


def rendered(url: str, profile: Path) -> str:
    """A page's DOM after its scripts ran, as headless chromium built it (enforcing the page's CSP)."""
    from tests.conftest import require_tool

    chromium = require_tool("chromium")
    result = subprocess.run(
        [
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
