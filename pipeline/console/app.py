"""The console's routes: sign-in, the pages, the import and the operator actions.

Every page but the sign-in needs a live session; every POST needs the
session's CSRF token. Actions go through `Console.dispatch`, i.e. the daemon's
own control dispatch: one implementation of approve, reject, retry, rollback,
resolve and auto-update, whether asked on the shell or in the browser.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message

from pipeline.console import views
from pipeline.console.auth import REFUSED
from pipeline.console.sessions import Session
from pipeline.console.upload import FORM_OVERHEAD, Receiver, Upload
from pipeline.console.web import (
    COOKIE,
    SIGNIN_COOKIE,
    Console,
    SecurityHeaders,
    new_csrf,
    static_file,
)
from pipeline.errors import UploadRefused

log = logging.getLogger("dropgate")

MAX_FORM_BYTES = 64 * 1024  # a form of the console without a file
STALL_SECONDS = 120.0  # an upload that sends nothing for this long is dropped
NOTE_MAX = 2000
REFUSAL_SECONDS = 3.0
CONSENT = "release notes read, date agreed with IT"  # the two boxes of the review page
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
CONFIRM = {
    "reject": "Reject run {id}: it ends as rejected; the platform is not touched. The same archive is refused "
    "if dropped again, unless someone retries this run.",
    "retry": "Run the archive of run {id} again as a new run, from the start (validate, checks, approval…).",
    "rollback": "Put the platform back as it was before run {id}: the previous release and the data of its "
    "backup (changes made since that backup are lost). The gate stays blocked until someone resolves it.",
    "resolve": "Confirm that the platform is fine after run {id}: the gate opens and queued archives run.",
}
NEEDS_NOTE = {"reject", "resolve"}

Page = Callable[[Request, Session], Awaitable[Response]]


def build_app(console: Console) -> Starlette:
    def signed_in(page: Page) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = await console.session(request)
            if session is None:
                return console.to_signin(request)
            return await page(request, session)

        return endpoint

    async def form_of(request: Request, session: Session) -> FormData | None:
        """The posted form when it is small and carries the session's CSRF token, else None."""
        length = request.headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > MAX_FORM_BYTES:
            return None
        form = await request.form(max_files=0, max_fields=10)
        token = form.get("csrf")
        return form if session.csrf_ok(token if isinstance(token, str) else None) else None

    def refused(request: Request, session: Session) -> Response:
        log.warning(
            "console: a form without a valid CSRF token from %s (%s)", console.address(request), session.account
        )
        return console.render(
            request,
            "message.html",
            session,
            status=403,
            title="Refused",
            message="The form's security token is missing or out of date. Reload the page and try again.",
        )

    # -- sign-in ----------------------------------------------------------------
    async def signin_page(request: Request, *, error: str = "", status: int = 200) -> Response:
        token = new_csrf()
        response = console.render(
            request,
            "signin.html",
            None,
            status=status,
            signin_csrf=token,
            error=error,
            next=request.query_params.get("next", ""),
        )
        console.set_cookie(request, response, SIGNIN_COOKIE, token, max_age=3600)
        return response

    async def signin_get(request: Request) -> Response:
        if await console.session(request) is not None:
            return console.redirect(request, "/")
        return await signin_page(request)

    async def signin_post(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > MAX_FORM_BYTES:
            return await signin_page(request, error="The sign-in form was not understood.", status=400)
        form = await request.form(max_files=0, max_fields=10)
        token, cookie = form.get("csrf"), request.cookies.get(SIGNIN_COOKIE)
        if not isinstance(token, str) or not cookie or not hmac.compare_digest(token.encode(), cookie.encode()):
            return await signin_page(request, error="The sign-in form is out of date: try again.", status=403)
        account, password = str(form.get("account") or "").strip(), str(form.get("password") or "")
        address = console.address(request)
        started = asyncio.get_running_loop().time()
        ok, message = await run_in_threadpool(console.signin.check, account, password, address)
        if not ok:
            if message == REFUSED:
                # Every refusal PAM saw takes as long as its failure delay at least (pam_unix: about 2 s), so
                # the time does not tell a right password of an account outside the group from a wrong one.
                await asyncio.sleep(max(0.0, REFUSAL_SECONDS - (asyncio.get_running_loop().time() - started)))
            return await signin_page(request, error=message, status=403)
        session_token, _session = console.sessions.open(account, address)
        target = str(form.get("next") or "/")
        if not target.startswith("/") or target.startswith("//") or "\\" in target:
            target = "/"
        response = console.redirect(request, target)
        console.set_cookie(request, response, COOKIE, session_token, max_age=None)
        response.delete_cookie(SIGNIN_COOKIE, path=console.prefix(request) or "/")
        return response

    async def signout(request: Request, session: Session) -> Response:
        if await form_of(request, session) is None:
            return refused(request, session)
        console.sessions.close(console.token(request))
        log.info("console: %s signed out", session.account)
        response = console.redirect(request, "/signin")
        response.delete_cookie(COOKIE, path=console.prefix(request) or "/")
        return response

    # -- pages ------------------------------------------------------------------
    async def overview(request: Request, session: Session) -> Response:
        status = await run_in_threadpool(console.status)
        waiting = await run_in_threadpool(views.waiting_for_approval, console.config)
        auto = status.get("auto_update")
        if isinstance(auto, dict) and "enabled" in auto:
            auto_update = {"enabled": bool(auto["enabled"]), "source": "the site's switch"}
        else:
            auto_update = {"enabled": console.config.auto_update.enabled, "source": "the configuration"}
        return console.render(
            request,
            "overview.html",
            session,
            status=200,
            st=status,
            waiting=waiting,
            uploads=[u.to_dict() for u in console.uploads.receiving()],
            auto_update=auto_update,
            limits=console.config.policy.timeouts,
        )

    async def import_page(request: Request, session: Session) -> Response:
        return console.render(request, "import.html", session, max_bytes=console.config.limits.max_archive_bytes)

    async def upload_page(request: Request, session: Session) -> Response:
        upload = console.uploads.get(int(request.path_params["upload"]))
        if upload is None:
            return console.render(
                request, "message.html", session, status=404, title="Unknown upload", message="No such upload."
            )
        run = None
        if upload.state == "complete" and upload.sha256 is not None:
            run = await run_in_threadpool(views.run_of_upload, console.config, upload.sha256, upload.first_run)
        verdict = views.verdict(run) if run is not None else None
        in_inbox = (console.config.paths.inbox / upload.name).exists() if upload.name else False
        return console.render(
            request, "upload.html", session, upload=upload.to_dict(), run=run, verdict=verdict, in_inbox=in_inbox
        )

    async def check_page(request: Request, session: Session) -> Response:
        report = await run_in_threadpool(views.server_check, console.config)
        return console.render(request, "check.html", session, report=report)

    async def history_page(request: Request, session: Session) -> Response:
        runs = await run_in_threadpool(views.history, console.config)
        return console.render(request, "history.html", session, runs=runs)

    async def backups_page(request: Request, session: Session) -> Response:
        snapshots = await run_in_threadpool(views.backups, console.config)
        return console.render(request, "backups.html", session, snapshots=snapshots)

    async def run_page(request: Request, session: Session) -> Response:
        run = await run_in_threadpool(views.run_page, console.config, int(request.path_params["run"]))
        if run is None:
            return console.render(
                request, "message.html", session, status=404, title="Unknown run", message="There is no such run."
            )
        return console.render(request, "run.html", session, run=run, limits=console.config.policy.timeouts)

    async def review_page(request: Request, session: Session, *, error: str = "", status: int = 200) -> Response:
        run_id = int(request.path_params["run"])
        run = await run_in_threadpool(views.run_page, console.config, run_id)
        if run is None:
            return console.render(
                request, "message.html", session, status=404, title="Unknown run", message="There is no such run."
            )
        review = await run_in_threadpool(console.reviews.get, run) if run["step"] == "approval" else None
        allowed = run["channel"] in console.config.policy.channels if run["channel"] else True
        return console.render(
            request, "review.html", session, status=status, run=run, review=review, allowed=allowed, error=error
        )

    # -- actions ------------------------------------------------------------------
    async def approve(request: Request, session: Session) -> Response:
        form = await form_of(request, session)
        if form is None:
            return refused(request, session)
        run_id = int(request.path_params["run"])
        if form.get("read_notes") != "yes" or form.get("date_agreed") != "yes":
            log.warning("console: approval of run %d by %s refused: consent boxes not ticked", run_id, session.account)
            return await review_page(
                request,
                session,
                status=400,
                error=f"Not approved: tick both boxes ({CONSENT}) to approve.",
            )
        ok, message = await console.dispatch(
            request, session, {"command": "approve", "id": run_id}, affirmed=CONSENT
        )
        session.flash.append(("good" if ok else "bad", message))
        return console.redirect(request, f"/runs/{run_id}")

    async def confirm_page(request: Request, session: Session) -> Response:
        action, run_id = request.path_params["action"], int(request.path_params["run"])
        if action not in CONFIRM:
            return console.render(
                request, "message.html", session, status=404, title="Unknown action", message="No such action."
            )
        return console.render(
            request,
            "confirm.html",
            session,
            action=action,
            run_id=run_id,
            consequence=CONFIRM[action].format(id=run_id),
            needs_note=action in NEEDS_NOTE,
            target=f"/runs/{run_id}/{action}",
        )

    async def act(request: Request, session: Session) -> Response:
        action, run_id = request.path_params["action"], int(request.path_params["run"])
        form = await form_of(request, session)
        if form is None:
            return refused(request, session)
        if action not in CONFIRM:
            return console.render(
                request, "message.html", session, status=404, title="Unknown action", message="No such action."
            )
        command: dict[str, Any] = {"command": action, "id": run_id}
        if action in NEEDS_NOTE:
            note = str(form.get("note") or "").strip()
            if not note or len(note) > NOTE_MAX:
                session.flash.append(
                    ("bad", f"{action} needs a note (what was checked or why), at most {NOTE_MAX} characters")
                )
                return console.redirect(request, f"/runs/{run_id}/{action}")
            command["note"] = note
        ok, message = await console.dispatch(request, session, command)
        session.flash.append(("good" if ok else "bad", message))
        target = f"/runs/{run_id}"
        if ok and action == "retry":
            target = "/history"
        return console.redirect(request, target)

    async def auto_update_confirm(request: Request, session: Session) -> Response:
        enabled = request.query_params.get("enabled") == "true"
        consequence = (
            "Turn automatic updates ON: the nightly fetch downloads what the vendor's feed offers into the inbox; "
            "each archive then goes through every check (and approval, if required) like a drop."
            if enabled
            else "Turn automatic updates OFF: nothing is fetched any more; archives dropped by hand still run."
        )
        return console.render(
            request,
            "confirm.html",
            session,
            action="auto-update",
            run_id=None,
            consequence=consequence,
            needs_note=False,
            target="/auto-update",
            enabled="true" if enabled else "false",
        )

    async def auto_update(request: Request, session: Session) -> Response:
        form = await form_of(request, session)
        if form is None:
            return refused(request, session)
        enabled = form.get("enabled") == "true"
        ok, message = await console.dispatch(request, session, {"command": "auto-update", "enabled": enabled})
        session.flash.append(("good" if ok else "bad", message))
        return console.redirect(request, "/")

    # -- import ---------------------------------------------------------------------
    async def import_post(request: Request, session: Session) -> Response:
        wants_json = request.headers.get("x-requested-with") == "dropgate-console"
        config = console.config
        try:
            upload = await receive_upload(console, request, session)
        except ClientDisconnect:
            log.warning("console: upload by %s cut off by the browser; nothing kept", session.account)
            return Response(status_code=400)
        except UploadRefused as error:
            log.warning("console: upload by %s refused: %s", session.account, error)
            if wants_json:
                return JSONResponse({"ok": False, "message": str(error)}, status_code=error.status)
            return console.render(
                request,
                "import.html",
                session,
                status=error.status,
                max_bytes=config.limits.max_archive_bytes,
                error=str(error),
            )
        log.info(
            "console: %s uploaded %s (%d bytes) into %s",
            console.who(request, session),
            upload.name,
            upload.received,
            config.paths.inbox,
        )
        if wants_json:
            return JSONResponse({"ok": True, "location": console.url(request, f"/uploads/{upload.id}")})
        return console.redirect(request, f"/uploads/{upload.id}")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found\n", status_code=404, media_type="text/plain")
        return Response(static_file(name), media_type=STATIC[name], headers={"cache-control": "max-age=3600"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return Response("not found\n", status_code=404, media_type="text/plain")

    routes = [
        Route("/static/{name}", static),
        Route("/signin", signin_get, methods=["GET"]),
        Route("/signin", signin_post, methods=["POST"]),
        Route("/signout", signed_in(signout), methods=["POST"]),
        Route("/", signed_in(overview), methods=["GET"]),
        Route("/import", signed_in(import_page), methods=["GET"]),
        Route("/import", signed_in(import_post), methods=["POST"]),
        Route("/uploads/{upload:int}", signed_in(upload_page), methods=["GET"]),
        Route("/check", signed_in(check_page), methods=["GET"]),
        Route("/history", signed_in(history_page), methods=["GET"]),
        Route("/backups", signed_in(backups_page), methods=["GET"]),
        Route("/auto-update", signed_in(auto_update_confirm), methods=["GET"]),
        Route("/auto-update", signed_in(auto_update), methods=["POST"]),
        Route("/runs/{run:int}", signed_in(run_page), methods=["GET"]),
        Route("/runs/{run:int}/review", signed_in(review_page), methods=["GET"]),
        Route("/runs/{run:int}/approve", signed_in(approve), methods=["POST"]),
        Route("/runs/{run:int}/{action}", signed_in(confirm_page), methods=["GET"]),
        Route("/runs/{run:int}/{action}", signed_in(act), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found})
    app.add_middleware(SecurityHeaders, tls=console.tls)
    return app


def _announced_length(request: Request, max_bytes: int) -> int:
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise UploadRefused("the upload must announce its length (Content-Length)", status=411)
    if int(length) > max_bytes + FORM_OVERHEAD:
        raise UploadRefused(f"the file is larger than limits.max_archive_bytes ({max_bytes} bytes)", status=413)
    return int(length)


async def _next_message(request: Request) -> Message:
    try:
        message = await asyncio.wait_for(request.receive(), STALL_SECONDS)
    except TimeoutError:
        raise UploadRefused(f"nothing arrived for {STALL_SECONDS:.0f} s; the upload was dropped") from None
    if message["type"] == "http.disconnect":
        raise ClientDisconnect
    return message


async def receive_upload(console: Console, request: Request, session: Session) -> Upload:
    """Stream the request's archive into the inbox; on any failure nothing is left there."""
    config = console.config
    length = _announced_length(request, config.limits.max_archive_bytes)
    first_run = await run_in_threadpool(views.last_run_id, config)
    upload = console.uploads.begin(
        account=session.account, address=console.address(request), expected=length, first_run=first_run
    )
    receiver: Receiver | None = None
    try:
        receiver = Receiver(
            upload,
            content_type=request.headers.get("content-type", ""),
            inbox=config.paths.inbox,
            max_bytes=config.limits.max_archive_bytes,
            csrf_ok=session.csrf_ok,
        )
        more = True
        while more:
            message = await _next_message(request)
            blocks = receiver.feed(message.get("body", b""))
            if blocks:
                await run_in_threadpool(receiver.write, blocks)
            more = bool(message.get("more_body", False))
        await run_in_threadpool(receiver.finish)
    except BaseException as error:
        if receiver is not None:
            receiver.abandon()
        upload.state, upload.finished = "failed", time.time()
        upload.error = str(error) if isinstance(error, UploadRefused) else "the upload was cut off"
        raise
    upload.state, upload.finished = "complete", time.time()
    return upload
