"""A sample platform for the tests, the demo and the bench: the smallest thing that updates like the real one.

Two processes, as on a site:

- the *application*: its code (`app.py`) and a `VERSION` file live in the
  release folder; it is started, stopped and restarted by the commands the
  configuration names (`start`, `stop`, `restart` below), always from
  `root/current`. It answers `/` with a page naming its version and `/health`
  with `{"status": "ok", "version": "..."}`; every answer carries the header
  `X-Platform-Version`. `restart` is graceful: the running process re-executes
  itself from `current` keeping its listening socket, so no request is refused
  while a patch goes live.
- the *front* (`front` below), standing in for nginx and the snippet in
  `deploy/nginx/`: while the maintenance flag exists it answers 503 with
  `Retry-After` (from the flag), except under `/dropgate/`, which goes to the
  status page; otherwise it passes requests to the application.

    python -m pipeline.sample_platform release DIR --version V [--health-status 500]
    python -m pipeline.sample_platform start|stop|restart|status --root ROOT --port PORT
    python -m pipeline.sample_platform front --port PORT --backend PORT --flag FILE [--status URL]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the service commands start fast: the front's HTTP machinery is imported by the front
    from http.server import ThreadingHTTPServer

START_TIMEOUT = 15.0

APP_SOURCE = '''\
"""The sample platform's application, release {version}: stdlib only, runs from root/current."""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "VERSION").read_text(encoding="utf-8").strip()
HEALTH_STATUS = {health_status}
GENERATION = str(time.time_ns())
active = 0
active_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms delayed-ACK stall)

    def handle_one_request(self):
        global active
        with active_lock:
            active += 1
        try:
            super().handle_one_request()
        finally:
            with active_lock:
                active -= 1

    def do_GET(self):
        if self.path.split("?")[0] == "/health":
            status = HEALTH_STATUS
            body = json.dumps({{"status": "ok" if status == 200 else "failing", "version": VERSION}})
            kind = "application/json"
        else:
            status = 200
            body = f"<!doctype html><title>Sample platform</title><h1>Sample platform {{VERSION}}</h1>\\n"
            kind = "text/html; charset=utf-8"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Platform-Version", VERSION)
        self.send_header("X-Platform-Generation", GENERATION)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--listen-fd", type=int)
    args = parser.parse_args()
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(128)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler, bind_and_activate=False)
    server.socket = sock
    server.daemon_threads = True
    tmp = args.pidfile + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(f"{{os.getpid()}}\\n")
    os.replace(tmp, args.pidfile)
    wanted = []
    stop = threading.Event()

    def on_signal(signum, frame):
        wanted.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    print(f"release {{VERSION}} serving on 127.0.0.1:{{args.port}} (pid {{os.getpid()}})", flush=True)
    while not stop.wait(0.1):  # a signal taken by another thread only runs its handler here
        pass
    server.shutdown()
    deadline = time.monotonic() + 5
    while active and time.monotonic() < deadline:
        time.sleep(0.01)
    if wanted[-1] == signal.SIGHUP:
        print(f"release {{VERSION}} reloading from {{args.root}}/current", flush=True)
        os.set_inheritable(sock.fileno(), True)
        script = os.path.join(args.root, "current", "app.py")
        os.execv(sys.executable, [sys.executable, script, "--root", args.root, "--port", str(args.port),
                                  "--pidfile", args.pidfile, "--listen-fd", str(sock.fileno())])
    sock.close()
    os.unlink(args.pidfile)
    print(f"release {{VERSION}} stopped", flush=True)


main()
'''


def release_files(version: str, *, health_status: int = 200) -> dict[str, str]:
    """The files of a sample release (its code and its VERSION): relative path → content."""
    return {
        "app.py": APP_SOURCE.format(version=version, health_status=health_status),
        "VERSION": version + "\n",
    }


def write_release(folder: Path, version: str, *, health_status: int = 200) -> Path:
    """A release folder of the sample platform whose /health answers `health_status`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in release_files(version, health_status=health_status).items():
        (folder / name).write_text(content, encoding="utf-8")
    return folder


def service_commands(root: Path, port: int, python: str = sys.executable) -> dict[str, list[list[str]]]:
    """`platform.services` for a sample platform under `root` listening on `port`."""

    def command(action: str) -> list[str]:
        return [python, "-m", "pipeline.sample_platform", action, "--root", str(root), "--port", str(port)]

    return {"stop": [command("stop")], "start": [command("start")], "restart": [command("restart")]}


def front_command(port: int, backend_port: int, flag: Path, status_url: str | None = None) -> list[str]:
    """The argv of a front (the nginx stand-in) for a sample platform."""
    argv = [sys.executable, "-m", "pipeline.sample_platform", "front", "--port", str(port)]
    argv += ["--backend", str(backend_port), "--flag", str(flag)]
    if status_url:
        argv += ["--status", status_url]
    return argv


# -- the application's service commands ------------------------------------


def _pidfile(root: Path) -> Path:
    return root / "run" / "app.pid"


def _running_pid(root: Path) -> int | None:
    """The application's pid if it runs (and is our application, not a reused pid)."""
    try:
        pid = int(_pidfile(root).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"app.py" in cmdline else None


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie left to a parent that does not reap does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _probe(port: int, path: str = "/") -> tuple[int, dict[str, str]] | None:
    """One GET on loopback: status and headers, or None when nothing answers (a plain socket: no
    HTTP library to import, so that the service commands start fast)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    lines = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest.partition(" ")[0]
    if not version.startswith("HTTP/") or not code.isdigit():
        return None
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(code), headers


def _log_tail(root: Path) -> str:
    try:
        lines = (root / "run" / "app.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-3:])


def start(root: Path, port: int) -> int:
    if _running_pid(root) is not None:
        print(f"sample platform already running (pid {_running_pid(root)})")
        return 0
    script = root / "current" / "app.py"
    if not script.is_file():
        print(f"sample platform: no {script}", file=sys.stderr)
        return 1
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(script), "--root", str(root), "--port", str(port), "--pidfile", str(_pidfile(root))]
    with open(run / "app.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def started() -> int | None:
        if proc.poll() is not None:
            print(f"sample platform exited with {proc.returncode} at start: {_log_tail(root)}", file=sys.stderr)
            return 1
        answer = _probe(port)
        if answer is not None and "x-platform-version" in answer[1]:
            print(f"sample platform {answer[1]['x-platform-version']} started on port {port} (pid {proc.pid})")
            return 0
        return None

    code = _poll(started, START_TIMEOUT)
    if code is None:
        print(f"sample platform did not answer on port {port} within {START_TIMEOUT:g}s", file=sys.stderr)
        return 1
    return code


def _poll(check: Callable[[], int | None], seconds: float) -> int | None:
    """Call `check` until it returns an exit code (after 2 ms, then twice as late, at most every 50 ms).

    None once `seconds` have passed.
    """
    deadline = time.monotonic() + seconds
    delay = 0.002
    while time.monotonic() < deadline:
        code = check()
        if code is not None:
            return code
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return None


def stop(root: Path, port: int) -> int:
    pid = _running_pid(root)
    if pid is None:
        print("sample platform not running")
        return 0
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _poll(lambda: None if _alive(pid) else 0, wait) == 0:
            print(f"sample platform stopped (pid {pid})")
            return 0
    print(f"sample platform (pid {pid}) did not stop", file=sys.stderr)
    return 1


def restart(root: Path, port: int) -> int:
    pid = _running_pid(root)
    if pid is None:
        return start(root, port)
    before = _probe(port)
    generation = before[1].get("x-platform-generation") if before else None
    os.kill(pid, signal.SIGHUP)

    def reloaded() -> int | None:
        if not _alive(pid):  # not _running_pid: its command line is briefly empty during exec
            print(f"sample platform died while reloading: {_log_tail(root)}", file=sys.stderr)
            return 1
        answer = _probe(port)
        if answer is not None and answer[1].get("x-platform-generation") not in (None, generation):
            print(f"sample platform reloaded: {answer[1].get('x-platform-version')} (pid {pid})")
            return 0
        return None

    code = _poll(reloaded, START_TIMEOUT)
    if code is None:
        print(f"sample platform did not come back within {START_TIMEOUT:g}s: {_log_tail(root)}", file=sys.stderr)
        return 1
    return code


def status(root: Path, port: int) -> int:
    answer = _probe(port, "/health")
    if answer is None:
        print("sample platform not answering")
        return 1
    print(f"sample platform {answer[1].get('x-platform-version')}: /health answers {answer[0]}")
    return 0 if answer[0] == 200 else 1


# -- the front: the nginx stand-in -----------------------------------------

MAINTENANCE_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>Maintenance</title></head><body>"
    "<h1>The platform is being updated</h1><p>It will be back shortly. Please try again in a few minutes.</p>"
    "<p><a href='/dropgate/'>Update progress</a></p></body></html>\n"
)


def _retry_after(flag: Path) -> int | None:
    """Seconds of Retry-After while the flag exists; None when it does not."""
    try:
        text = flag.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return 900
    try:
        return int(json.loads(text).get("retry_after", 900))
    except (ValueError, AttributeError, TypeError):
        return 900


def make_front(port: int, backend_port: int, flag: Path, status_url: str | None) -> ThreadingHTTPServer:
    import http.client
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    status = urlsplit(status_url) if status_url else None

    class Front(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def _answer(self, code: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
            self.send_response(code)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _pass(self, host: str, port: int, path: str) -> None:
            connection = http.client.HTTPConnection(host, port, timeout=30)
            try:
                connection.request(self.command, path, headers={"X-Forwarded-Prefix": "/dropgate"})
                response = connection.getresponse()
                body = response.read()
            except OSError as error:
                self._answer(502, f"bad gateway: {error}\n".encode(), [("Content-Type", "text/plain")])
                return
            finally:
                connection.close()
            keep = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date")
            ]
            self._answer(response.status, body, keep)

        def do_GET(self) -> None:
            if status is not None and (self.path == "/dropgate" or self.path.startswith("/dropgate/")):
                rest = self.path[len("/dropgate") :] or "/"
                self._pass(status.hostname or "127.0.0.1", status.port or 80, status.path.rstrip("/") + rest)
                return
            retry_after = _retry_after(flag)
            if retry_after is not None:
                self._answer(
                    503,
                    MAINTENANCE_PAGE.encode(),
                    [
                        ("Retry-After", str(retry_after)),
                        ("Content-Type", "text/html; charset=utf-8"),
                        ("Cache-Control", "no-store"),
                    ],
                )
                return
            self._pass("127.0.0.1", backend_port, self.path)

        do_HEAD = do_GET

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Front)
    server.daemon_threads = True
    return server


def front(port: int, backend_port: int, flag: Path, status_url: str | None) -> int:
    server = make_front(port, backend_port, flag, status_url)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"front on 127.0.0.1:{server.server_address[1]} → platform on port {backend_port}, flag {flag}", flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sample_platform", description=__doc__.split("\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    sub = actions.add_parser("release", help="write a release folder (app.py + VERSION)")
    sub.add_argument("dir", type=Path)
    sub.add_argument("--version", required=True)
    sub.add_argument("--health-status", type=int, default=200)
    for name in ("start", "stop", "restart", "status"):
        sub = actions.add_parser(name, help=f"{name} the application of root/current")
        sub.add_argument("--root", type=Path, required=True)
        sub.add_argument("--port", type=int, required=True)
    sub = actions.add_parser("front", help="the nginx stand-in: 503 while the flag exists, else pass to the platform")
    sub.add_argument("--port", type=int, required=True)
    sub.add_argument("--backend", type=int, required=True, help="the application's port")
    sub.add_argument("--flag", type=Path, required=True)
    sub.add_argument("--status", help="the status page, served under /dropgate/")
    args = parser.parse_args(argv)
    if args.action == "release":
        write_release(args.dir, args.version, health_status=args.health_status)
        return 0
    if args.action == "front":
        return front(args.port, args.backend, args.flag, args.status)
    actions_by_name = {"start": start, "stop": stop, "restart": restart, "status": status}
    return actions_by_name[args.action](args.root.absolute(), args.port)


if __name__ == "__main__":
    sys.exit(main())
