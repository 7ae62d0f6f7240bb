"""The console's listener: uvicorn serving the Starlette app on its own thread inside the daemon.

The socket is bound (and the TLS certificate loaded) in the daemon's thread,
so a taken port or a bad certificate stops start-up with a clear message.
`stop` asks uvicorn to exit: uploads still running get a few seconds, then
are cut (and leave nothing in the inbox).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading

import uvicorn

from pipeline.config import Config
from pipeline.console.app import build_app
from pipeline.console.upload import remove_stale_parts
from pipeline.console.web import Console, Handler, StatusSource
from pipeline.errors import ConfigError

log = logging.getLogger("dropgate")

STOP_SECONDS = 3  # what requests still running get when the daemon stops


class ConsoleServer(threading.Thread):
    def __init__(self, config: Config, handler: Handler, status: StatusSource) -> None:
        super().__init__(name="dropgate-console", daemon=True)
        assert config.console.address is not None
        self.config = config
        self.console = Console(config, handler, status)
        self.sock: socket.socket | None = None
        tls = config.console.tls
        self.server = uvicorn.Server(
            uvicorn.Config(
                build_app(self.console),
                lifespan="off",
                access_log=False,
                log_config=None,
                proxy_headers=False,  # X-Forwarded-* are read by the app, from trusted proxies only
                server_header=False,
                timeout_keep_alive=5,
                timeout_graceful_shutdown=STOP_SECONDS,
                limit_concurrency=64,
                h11_max_incomplete_event_size=16 * 1024,
                ssl_certfile=str(tls.cert) if tls is not None else None,
                ssl_keyfile=str(tls.key) if tls is not None else None,
            )
        )

    def bind(self) -> None:
        """Open the listening socket (ConfigError naming console.listen or console.tls when it cannot)."""
        assert self.config.console.address is not None
        host, port = self.config.console.address
        tls = self.config.console.tls
        if tls is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
            except (OSError, ssl.SSLError) as error:
                raise ConfigError([f"console.tls: cannot load {tls.cert} / {tls.key}: {error}"]) from None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            where = self.config.console.listen
            raise ConfigError([f"console.listen: cannot listen on {where}: {error.strerror}"]) from None
        sock.listen(128)
        sock.set_inheritable(False)
        self.sock = sock
        for name in remove_stale_parts(self.config.paths.inbox):
            log.warning("console: removed %s, an upload cut off when the daemon last stopped", name)

    @property
    def address(self) -> tuple[str, int]:
        assert self.sock is not None
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def run(self) -> None:
        assert self.sock is not None
        try:
            self.server.run(sockets=[self.sock])
        except Exception:
            log.exception("console: the listener stopped on an error")

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(timeout=STOP_SECONDS + 5)
        if self.is_alive():
            self.server.force_exit = True
            self.join(timeout=5)
        self.console.close()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
