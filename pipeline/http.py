"""The metrics listener: `/metrics`, `/status.json`, `/history.json` and the status page `/`.

Read-only by construction: the handler answers GET and HEAD only. Bound to
`metrics.listen` (loopback by default); TLS when `metrics.tls` is set. The
page is static markup with its script and style served beside it, so its
Content-Security-Policy allows no inline script or style; it may not be
framed, and the `Server` header names no Python version.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pipeline.config import Config

log = logging.getLogger("dropgate")

StatusSource = Callable[[], dict[str, Any]]
HistorySource = Callable[[], list[dict[str, Any]]]


# The page and what it loads: path -> (file in the package, content type).
ASSETS = {
    "/": ("status.html", "text/html; charset=utf-8"),
    "/index.html": ("status.html", "text/html; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
BACKLOG = 64  # connections the kernel queues for the listener (http.server's default is 5)


def _assets() -> dict[str, tuple[bytes, str]]:
    package = resources.files("pipeline")
    return {path: (package.joinpath(name).read_bytes(), kind) for path, (name, kind) in ASSETS.items()}


class _Server(ThreadingHTTPServer):
    request_queue_size = BACKLOG


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class StatusServer(threading.Thread):
    def __init__(
        self, config: Config, registry: CollectorRegistry, status: StatusSource, history: HistorySource
    ) -> None:
        super().__init__(name="dropgate-http", daemon=True)
        assets = _assets()

        class Handler(BaseHTTPRequestHandler):
            server_version = "dropgate"
            timeout = 10  # seconds a client may take to send its request

            def version_string(self) -> str:
                return self.server_version  # not "BaseHTTP/0.6 Python/3.11.x"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

            def end_headers(self) -> None:
                for name, value in SECURITY_HEADERS.items():  # on every answer, errors included
                    self.send_header(name, value)
                super().end_headers()

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                    elif path == "/status.json":
                        self._send(200, json.dumps(status(), default=str).encode(), "application/json")
                    elif path == "/history.json":
                        self._send(200, json.dumps(history(), default=str).encode(), "application/json")
                    elif path in assets:
                        self._send(200, *assets[path])
                    else:
                        self._send(404, b"not found\n", "text/plain")
                except Exception:
                    log.exception("http: %s failed", path)
                    self._send(500, b"internal error\n", "text/plain")

            do_HEAD = do_GET

        host, port = config.listen_address
        server_class = _IPv6Server if ":" in host else _Server
        self.httpd = server_class((host, port), Handler)
        self.httpd.daemon_threads = True
        if config.metrics.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(config.metrics.tls.cert, config.metrics.tls.key)
            # The handshake happens in the request's own thread (on its first read), so a client that
            # connects and says nothing cannot stall the listener for everyone else.
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def run(self) -> None:
        self.httpd.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
