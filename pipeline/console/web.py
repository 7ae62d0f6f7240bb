"""The console's plumbing: who is asking (session, address behind a trusted proxy), rendering, headers.

`Console` holds what every page needs: the configuration, the daemon's
control dispatch (the same `handler(request, who)` the control socket calls),
the sessions, the sign-in rule, the uploads and the reviews.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config import Config
from pipeline.console.auth import SignIn, Throttle, in_group
from pipeline.console.sessions import Session, Sessions
from pipeline.console.upload import Uploads
from pipeline.console.views import Reviews
from pipeline.errors import ControlRefused

log = logging.getLogger("dropgate")

Handler = Callable[[dict[str, Any], str], str]
StatusSource = Callable[[], dict[str, Any]]

COOKIE = "dropgate_console"
SIGNIN_COOKIE = "dropgate_console_signin"
REFRESH_HEADER = "x-dropgate-refresh"
ACTION_WAIT_SECONDS = 10.0  # an action still running after this (a rollback) goes on; the page follows it
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


def size(count: float | None) -> str:
    from pipeline.snapshot import format_bytes

    return "-" if count is None else format_bytes(count)


class Console:
    def __init__(self, config: Config, handler: Handler, status: StatusSource) -> None:
        settings = config.console
        self.config = config
        self.handler = handler
        self.status = status
        self.sessions = Sessions(idle=settings.session_idle, absolute=settings.session_max)
        self.signin = SignIn(
            service=settings.pam_service, group=config.control.admin_group, throttle=Throttle(settings.throttle)
        )
        self.uploads = Uploads()
        self.reviews = Reviews(config)
        self.tls = settings.tls is not None
        self.trusted = {ipaddress.ip_address(p) for p in settings.trusted_proxies}
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("pipeline.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters.update(when=when, ago=ago, size=size)
        self._actions = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="dropgate-console-act")

    def close(self) -> None:
        self._actions.shutdown(wait=False, cancel_futures=True)

    # -- who is asking ------------------------------------------------------------
    def _from_proxy(self, request: Request) -> bool:
        host = request.client.host if request.client else ""
        try:
            return ipaddress.ip_address(host) in self.trusted
        except ValueError:
            return False

    def address(self, request: Request) -> str:
        """The client's address: the peer's, or the one a trusted proxy (nginx) saw."""
        peer = request.client.host if request.client else "unknown"
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded and self._from_proxy(request):
            last = forwarded.rsplit(",", 1)[-1].strip()
            try:
                return str(ipaddress.ip_address(last))
            except ValueError:
                return peer
        return peer

    def prefix(self, request: Request) -> str:
        """Where the console is mounted (`X-Forwarded-Prefix` from a trusted proxy), e.g. /dropgate/console."""
        prefix = request.headers.get("x-forwarded-prefix", "").rstrip("/")
        if prefix and self._from_proxy(request) and _PREFIX.match(prefix):
            return prefix
        return ""

    def secure(self, request: Request) -> bool:
        if self.tls:
            return True
        return self._from_proxy(request) and request.headers.get("x-forwarded-proto") == "https"

    def who(self, request: Request, session: Session) -> str:
        return f"{session.account} from {self.address(request)} (console)"

    def token(self, request: Request) -> str | None:
        return request.cookies.get(COOKIE)

    async def session(self, request: Request) -> Session | None:
        """The signed-in session of this request, if it is live and its account still in the admin group."""
        refresh = request.headers.get(REFRESH_HEADER) == "1"
        session = self.sessions.get(self.token(request), touch=not refresh)  # a refresh is not activity
        if session is None:
            return None
        if not await run_in_threadpool(in_group, session.account, self.config.control.admin_group):
            log.warning("console: %s is no longer in %s; signed out", session.account, self.config.control.admin_group)
            self.sessions.close_account(session.account)
            return None
        return session

    # -- answers -------------------------------------------------------------------
    def url(self, request: Request, path: str) -> str:
        return self.prefix(request) + path

    def redirect(self, request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(self.url(request, path), status_code=303)

    def to_signin(self, request: Request) -> Response:
        if request.headers.get(REFRESH_HEADER) == "1":
            return Response("signed out\n", status_code=401, media_type="text/plain")
        target = request.url.path if request.method == "GET" else "/"
        response = self.redirect(request, "/signin" + (f"?next={target}" if target not in ("/", "/signin") else ""))
        response.delete_cookie(COOKIE, path=self.prefix(request) or "/")
        return response

    def render(
        self, request: Request, template: str, session: Session | None, *, status: int = 200, **context: Any
    ) -> HTMLResponse:
        flash: list[tuple[str, str]] = []
        if session is not None and request.headers.get(REFRESH_HEADER) != "1":
            flash, session.flash = session.flash, []
        page = self.templates.get_template(template).render(
            u=lambda path: self.url(request, path),
            session=session,
            csrf=session.csrf if session is not None else "",
            flash=flash,
            now=time.time(),
            config=self.config,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(page, status_code=status)

    def set_cookie(self, request: Request, response: Response, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=self.prefix(request) or "/",
            secure=self.secure(request),
            httponly=True,
            samesite="strict",
        )

    # -- doing ---------------------------------------------------------------------
    async def dispatch(
        self, request: Request, session: Session, command: dict[str, Any], *, affirmed: str = ""
    ) -> tuple[bool, str]:
        """Send `command` through the daemon's control dispatch, as the control socket does.

        `affirmed` (what the administrator ticked) is recorded with who asked, in the run's events.
        """
        who = self.who(request, session) + (f", who affirmed: {affirmed}" if affirmed else "")
        log.info("console: %s asks %s", who, command)
        future = self._actions.submit(self.handler, command, who)
        try:
            message = await asyncio.wait_for(asyncio.wrap_future(future), ACTION_WAIT_SECONDS)
        except TimeoutError:
            future.add_done_callback(lambda done: _log_late(done, command, who))
            return True, f"{command['command']} is under way; this page follows it"
        except ControlRefused as refused:
            return False, str(refused)
        except (ValueError, KeyError, TypeError) as error:
            return False, f"bad request: {error}"
        except Exception as error:
            log.exception("console: %s by %s failed", command, who)
            return False, f"the daemon could not do it: {error}"
        return True, message


def _log_late(future: concurrent.futures.Future[str], command: dict[str, Any], who: str) -> None:
    error = future.exception()
    if error is None:
        log.info("console: %s by %s: %s", command["command"], who, future.result())
    else:
        log.warning("console: %s by %s: %s", command["command"], who, error)


def static_file(name: str) -> bytes:
    return resources.files("pipeline.console").joinpath("static", name).read_bytes()


def new_csrf() -> str:
    return secrets.token_urlsafe(32)


class SecurityHeaders:
    """Headers on every answer: CSP without inline script, no framing, no caching of pages."""

    def __init__(self, app: ASGIApp, *, tls: bool) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
                if self.tls:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


Endpoint = Callable[[Request], Awaitable[Response]]
