"""How fast, and in how much memory, the nightly job downloads an archive, compared with `curl -o`.

    .venv/bin/python bench/fetch.py --size-mib 1024

Serves a file of SIZE MiB (random bytes: nothing to compress) from a real HTTPS
server on loopback (nginx with a certificate from a test CA, or the tests'
Python server with `--server python`), then measures in child processes, each
with the file in the server's page cache:

- dropgate: `Fetcher.download` — the code path of the nightly job: streamed
  into `<name>.part`, bounded by the signed length, SHA-256 computed as bytes
  arrive, fsync'd at the end;
- curl: `curl --cacert CA -sS -o OUT URL` (no hash at all), and curl followed
  by `sha256sum OUT`, which is what an admin would need to check the bytes.

It prints wall time, throughput and peak RSS of each, and the ratios; several
sizes (`--size-mib 256 --size-mib 1024`) show that dropgate's memory does not
grow with the download.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
import trustme  # noqa: E402

from tests.conftest import free_port  # noqa: E402

CHUNK = 2**20

DOWNLOAD = """
import sys, time
from pathlib import Path
from pipeline.fetcher import Fetcher
url, length, sha256, part, ca, report = sys.argv[1:7]
part_path = Path(part)
started = time.perf_counter()
Fetcher(ca_file=Path(ca)).download(url, length=int(length), sha256=sha256, part=part_path, reject_dir=part_path.parent)
Path(report).write_text(str(time.perf_counter() - started))
"""

IDLE = """
from pipeline.fetcher import Fetcher
"""

NGINX = """
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {prefix}/cert.pem;
        ssl_certificate_key {prefix}/key.pem;
        root {root};
    }}
}}
"""


@dataclass
class Measure:
    seconds: float
    peak_rss: int  # bytes
    cpu: float = 0.0  # user + system seconds: steadier than wall time on a shared machine
    inside: float = 0.0  # dropgate: seconds inside download(), without the interpreter's start (the daemon's case)


def run_child(argv: list[str]) -> Measure:
    """Run `argv` to completion: its wall time, peak RSS (VmHWM sampled every few ms) and CPU time."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "HTTPS_PROXY": ""})
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, harness.high_water(proc.pid))
        time.sleep(0.005)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} … failed with exit code {proc.returncode}")
    return Measure(seconds, peak, usage.ru_utime + usage.ru_stime)


@contextmanager
def nginx_server(root: Path, workdir: Path, ca: trustme.CA) -> Iterator[str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = workdir / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(prefix / "cert.pem"))
    cert.private_key_pem.write_to_path(str(prefix / "key.pem"))
    port = free_port()
    (prefix / "nginx.conf").write_text(NGINX.format(prefix=prefix, port=port, root=root))
    proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"])
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["curl", "-s", "-o", "/dev/null", "--cacert", str(workdir / "ca.pem"),
                              f"https://127.0.0.1:{port}/"], check=False).returncode not in (0, 22):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"nginx did not start: {(prefix / 'error.log').read_text()}")
            time.sleep(0.1)
        yield f"https://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def python_server(root: Path, workdir: Path, ca: trustme.CA) -> Iterator[str]:
    from tests.vendor_server import VendorServer

    server = VendorServer(root, ca).start()
    try:
        yield server.url().rstrip("/")
    finally:
        server.stop()


def warm(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(8 * CHUNK):
            pass


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            piece = os.urandom(min(8 * CHUNK, left))
            handle.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def bench(size_mib: int, workdir: Path, server: str, repeat: int) -> dict[str, Measure]:
    served = workdir / "served"
    served.mkdir()
    for folder in (workdir, served):
        folder.chmod(0o755)  # nginx's workers run as another user
    size = size_mib * 2**20
    archive = served / "gts.9.9.9.tgz"
    sha256 = make_file(archive, size)
    archive.chmod(0o644)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    curl, sha256sum = shutil.which("curl"), shutil.which("sha256sum")
    if curl is None or sha256sum is None:
        raise SystemExit("the comparison needs curl and sha256sum")
    best: dict[str, Measure] = {}
    serve = nginx_server if server == "nginx" else python_server
    with serve(served, workdir, ca) as base:
        url = f"{base}/{archive.name}"
        for _ in range(repeat):
            for name in ("dropgate", "curl", "curl + sha256sum"):
                out = workdir / "inbox" / "gts.9.9.9.tgz.part"
                shutil.rmtree(out.parent, ignore_errors=True)
                out.parent.mkdir()
                os.sync()
                warm(archive)
                if name == "dropgate":
                    report = workdir / "inside"
                    argv = [sys.executable, "-c", DOWNLOAD, url, str(size), sha256, str(out), str(workdir / "ca.pem"),
                            str(report)]
                    measure = run_child(argv)
                    measure.inside = float(report.read_text())
                else:
                    measure = run_child([curl, "--cacert", str(workdir / "ca.pem"), "-sS", "-o", str(out), url])
                    if name == "curl + sha256sum":
                        check = run_child([sha256sum, str(out)])
                        measure = Measure(measure.seconds + check.seconds, max(measure.peak_rss, check.peak_rss),
                                          measure.cpu + check.cpu)
                if out.stat().st_size != size:
                    raise SystemExit(f"{name} wrote {out.stat().st_size} bytes, expected {size}")
                if name not in best or measure.seconds < best[name].seconds:
                    best[name] = measure
    best["idle"] = run_child([sys.executable, "-c", IDLE])
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, action="append", help="download size in MiB (repeatable; default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool, the best is kept (default 3)")
    parser.add_argument("--server", choices=["nginx", "python"], default="nginx", help="HTTPS server (default nginx)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: the system's temporary one)")
    args = parser.parse_args()
    sizes = args.size_mib or [1024]
    mib = 2**20
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.server} over TLS on loopback; "
          f"times are the best of {args.repeat}")
    print()
    print(f"{'size':>8} {'tool':<38} {'seconds':>8} {'MB/s':>8} {'CPU s':>6} {'peak RSS':>9}")
    for size in sizes:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="dropgate-bench-") as scratch:
            result = bench(size, Path(scratch), args.server, args.repeat)
        ours, curl, checked, idle = result["dropgate"], result["curl"], result["curl + sha256sum"], result["idle"]
        for label, measure in (("dropgate (download + SHA-256 + fsync)", ours), ("curl -o", curl),
                               ("curl -o, then sha256sum", checked)):
            print(f"{size:>5}MiB {label:<38} {measure.seconds:>8.2f} {size * mib / measure.seconds / 1e6:>8.1f} "
                  f"{measure.cpu:>6.2f} {measure.peak_rss / mib:>6.1f}MiB")
        print(
            f"{'':>9}throughput dropgate / curl -o: {curl.seconds / ours.seconds:.2f}× "
            f"({curl.seconds / ours.inside:.2f}× counting only the time inside download(), as in the daemon; "
            f"CPU time {ours.cpu / curl.cpu:.1f}× curl's); "
            f"dropgate / curl + sha256sum: {checked.seconds / ours.seconds:.2f}×; peak RSS {ours.peak_rss / mib:.1f} "
            f"MiB ({(ours.peak_rss - idle.peak_rss) / mib:.1f} MiB above the interpreter with the fetcher imported)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
