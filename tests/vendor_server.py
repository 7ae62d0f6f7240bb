"""The vendor's side in tests: a real HTTPS server on loopback and a tiny CONNECT proxy.

`VendorServer` serves the files of a folder over TLS with a certificate from a
test CA (`trustme`), answers Range requests like nginx does, and logs every
request (path, Range header, status, bytes sent) so that tests can check what
the fetcher asked for. Faults are real socket behaviour, set per file:
`drop_after` closes the connection after N bytes of the body (once),
`rate` sends slowly. `ConnectProxy` relays CONNECT tunnels and logs them.
Nothing here replaces the HTTP layer of the code under test.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme

from pipeline.archive import authenticate
from pipeline.feed import Feed, FeedEntry, sign_feed
from pipeline.signing import SigningKey, TrustStore

_RANGE = re.compile(r"bytes=(\d+)-")


@dataclass
class Served:
    path: str
    range: str | None
    status: int
    sent: int = 0


@dataclass
class Faults:
    drop_after: dict[str, int] = field(default_factory=dict)  # name -> body bytes before the connection is cut
    rate: dict[str, float] = field(default_factory=dict)  # name -> bytes per second
    status: dict[str, int] = field(default_factory=dict)  # name -> status to answer instead
    redirect: dict[str, str] = field(default_factory=dict)  # name -> Location of a 302
    ignore_range: set[str] = field(default_factory=set)  # names served whole (200) whatever the Range


class VendorServer:
    """HTTPS on 127.0.0.1 serving `root`; `url(name)` is where a file is."""

    def __init__(self, root: Path, ca: trustme.CA, *, port: int = 0) -> None:
        self.root = root
        self.log: list[Served] = []
        self.faults = Faults()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/").split("?", 1)[0]
                requested = self.headers.get("Range")
                entry = Served(name, requested, 0)
                with server._lock:
                    server.log.append(entry)
                    status_override = server.faults.status.get(name)
                    location = server.faults.redirect.get(name)
                    drop = server.faults.drop_after.pop(name, None)
                    rate = server.faults.rate.get(name)
                path = server.root / name
                if location is not None:
                    entry.status = 302
                    self.send_response(302)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if status_override is not None or "/" in name or not path.is_file():
                    entry.status = status_override or 404
                    self.send_response(entry.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start = 0
                match = None if name in server.faults.ignore_range else _RANGE.fullmatch(requested or "")
                if match:
                    start = int(match.group(1))
                    if start >= len(data):
                        entry.status = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    entry.status = 206
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    entry.status = 200
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                limit = len(body) if drop is None else min(drop, len(body))
                step = 16 * 1024 if rate else 256 * 1024
                try:
                    for offset in range(0, limit, step):
                        chunk = body[offset : min(offset + step, limit)]
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        entry.sent += len(chunk)
                        if rate:
                            time.sleep(len(chunk) / rate)
                except OSError:
                    return  # the client went away
                if drop is not None:
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def url(self, name: str = "") -> str:
        return f"https://127.0.0.1:{self.port}/{name}"

    def requests(self, name: str) -> list[Served]:
        with self._lock:
            return [entry for entry in self.log if entry.path == name]

    def start(self) -> VendorServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket: new connections are refused, as with a server that is down."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


class ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT host:port), logging each target."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ConnectProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            self.targets.append(target)
            host, _, port = target.rpartition(":")
            try:
                upstream = socket.create_connection((host, int(port)), timeout=10)
            except OSError:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            with upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                ends = [client, upstream]
                while not self._stop.is_set():
                    readable, _, _ = select.select(ends, [], [], 0.2)
                    for end in readable:
                        data = end.recv(65536)
                        if not data:
                            return
                        (upstream if end is client else client).sendall(data)


# -- the vendor's feed ------------------------------------------------------------------------


def entry_for(archive: Path, keys: TrustStore, *, url: str | None = None, **overrides: Any) -> FeedEntry:
    """The feed entry a vendor would publish for `archive` (from its signed head and its bytes)."""
    manifest = authenticate(archive, keys)
    fields: dict[str, Any] = {
        "product": manifest.product, "version": manifest.version, "channel": manifest.channel,
        "url": url if url is not None else archive.name, "length": archive.stat().st_size,
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(), "published": 1_790_000_000.0,
        "notes": manifest.notes, "min_version": manifest.min_version,
    }
    fields.update(overrides)
    return FeedEntry(**fields)


def publish(
    folder: Path, key: SigningKey, entries: list[FeedEntry], *, sequence: int, now: float,
    expires_in: float = 7 * 86400, product: str = "gts", name: str = "feed.json",
) -> Path:
    """Sign a feed listing `entries` and put it where the server serves it."""
    feed = Feed(product, sequence, float(int(now)), float(int(now + expires_in)), tuple(entries))
    path = folder / name
    path.write_bytes(sign_feed(feed, key))
    return path
