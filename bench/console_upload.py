"""How an import through the console costs the daemon: its peak RSS while a large archive streams in.

    sudo .venv/bin/python bench/console_upload.py --size-mib 256 --size-mib 2048

Starts the real daemon with its console on loopback (a sandbox site under
--dir), signs in as a temporary local account made for the run (root: useradd,
chpasswd; removed afterwards), then for each size streams a form upload of
that many MiB to /import with a plain HTTP client, sampling the daemon's RSS
every 20 ms. It prints, per size: the upload's wall time and throughput, the
daemon's RSS before and its peak during the upload, and `cp` of the same
bytes on the same filesystem for comparison. Flat peak RSS across sizes is the
point: the body is parsed as it arrives and written to `<inbox>/<name>.part`.
The uploaded bytes are no archive: the daemon takes and rejects each (kept in
state/rejected/ as always), which the bench waits for before the next size.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 1 << 20
BOUNDARY = "dropgate-bench-boundary"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_site(root: Path, console_port: int, metrics_port: int, group: str, max_bytes: int) -> Path:
    for name in ("inbox", "state", "backups", "data", "platform/releases/1.0.0"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "platform/releases/1.0.0/VERSION").write_text("1.0.0\n")
    os.symlink("releases/1.0.0", root / "platform/current")
    config = {
        "paths": {"inbox": "inbox", "state": "state", "backups": "backups"},
        "platform": {"product": "gts", "root": "platform", "data": ["data"]},
        "inbox": {"settle_seconds": 0.3, "rescan_seconds": 2},
        "limits": {"max_archive_bytes": max_bytes},
        "maintenance": {"flag_file": "run/maintenance"},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "control": {"admin_group": group},
        "console": {"listen": f"127.0.0.1:{console_port}"},
    }
    path = root / "dropgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def body(size: int, token: str, name: str) -> tuple[int, Iterator[bytes]]:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{token}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="archive"; filename="{name}"\r\n'
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    block = os.urandom(BLOCK)

    def chunks() -> Iterator[bytes]:
        yield head
        left = size
        while left:
            piece = block[: min(BLOCK, left)]
            left -= len(piece)
            yield piece
        yield tail

    return len(head) + size + len(tail), chunks()


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)


def mib(count: float) -> str:
    return f"{count / 2**20:.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, action="append", help="upload size (repeatable; default 256, 2048)")
    parser.add_argument("--dir", default="/var/tmp", help="where the sandbox goes (needs the largest size free)")
    args = parser.parse_args()
    sizes = args.size_mib or [256, 2048]
    if os.geteuid() != 0:
        print("bench/console_upload.py: needs root (a temporary local account signs in through PAM)", file=sys.stderr)
        return 2
    tag = secrets.token_hex(3)
    group, user, password = f"dgbench-{tag}", f"dgbench-u-{tag}", "B3nch-" + secrets.token_urlsafe(9)
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", group, user], check=True)
    subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True)
    root = Path(tempfile.mkdtemp(prefix="dropgate-bench-console-", dir=args.dir))
    daemon = None
    try:
        console_port, metrics_port = free_port(), free_port()
        config = make_site(root, console_port, metrics_port, group, max(sizes) * 2**20)
        log = open(root / "daemon.log", "wb")  # noqa: SIM115 (kept open while the daemon runs)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--config", str(config), "run"], stdout=log, stderr=log, cwd=ROOT
        )
        base = f"http://127.0.0.1:{console_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/signin", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print((root / "daemon.log").read_text()[-2000:], file=sys.stderr)
                return 1
            time.sleep(0.1)
        with httpx.Client(base_url=base, timeout=600, follow_redirects=False) as http:
            token = re.search(r'name="csrf" value="([^"]+)"', http.get("/signin").text).group(1)  # type: ignore[union-attr]
            signed = http.post("/signin", data={"csrf": token, "account": user, "password": password, "next": ""})
            assert signed.status_code == 303, signed.text[:300]
            token = re.search(r'name="csrf" value="([^"]+)"', http.get("/import").text).group(1)  # type: ignore[union-attr]
            print(f"{'size':>9}  {'upload':>8}  {'MiB/s':>6}  {'RSS before':>10}  {'peak RSS':>9}  {'cp':>6}")
            for index, size_mib in enumerate(sizes, start=1):
                size = size_mib * 2**20
                length, chunks = body(size, token, f"gts.9.0.{index}.tgz")
                before = psutil.Process(daemon.pid).memory_info().rss
                sampler = Sampler(daemon.pid)
                sampler.start()
                started = time.perf_counter()
                answer = http.post(
                    "/import",
                    content=chunks,
                    headers={
                        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                        "Content-Length": str(length),
                    },
                )
                seconds = time.perf_counter() - started
                sampler.stop.set()
                sampler.join()
                assert answer.status_code == 303, answer.text[:300]
                # the same bytes by hand: cp on the same filesystem
                source = root / "cp-source"
                with open(source, "wb") as handle:
                    for piece in body(size, token, "x")[1]:
                        handle.write(piece)
                os.sync()
                started = time.perf_counter()
                shutil.copyfile(source, root / "cp-target")
                os.sync()
                cp_seconds = time.perf_counter() - started
                (root / "cp-target").unlink()
                source.unlink()
                print(
                    f"{size_mib:>5} MiB  {seconds:>7.1f}s  {size / 2**20 / seconds:>6.0f}  {mib(before):>10}"
                    f"  {mib(sampler.peak):>9}  {cp_seconds:>5.1f}s"
                )
                # wait until the daemon has taken (and rejected) it, so the next size starts clean
                deadline = time.monotonic() + 600
                while any((root / "inbox").iterdir()) and time.monotonic() < deadline:
                    time.sleep(0.2)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["userdel", user], check=False)
        subprocess.run(["groupdel", group], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
