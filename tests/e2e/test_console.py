"""The console over real HTTP: the real daemon, real local accounts through PAM, a plain HTTP client.

What a browser's own page could never send (a form without its boxes, without
its CSRF token, a body cut halfway) is sent here by hand. The browser itself
is driven in test_console_browser.py.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Site, wait_for
from tests.console_helpers import (
    Accounts,
    client,
    console_config,
    signin_error,
    wait_console,
)
from tests.servers import self_signed

REFUSED = "Sign-in refused: the account name or the password is wrong, or this account may not update the platform."


def start(site: Site, accounts: Accounts, **console: object) -> int:
    port = console_config(site, accounts, **console)
    site.start_daemon()
    wait_console(port)
    return port


def inbox_names(site: Site) -> list[str]:
    return sorted(p.name for p in site.inbox.iterdir())


# -- sign-in ------------------------------------------------------------------------------------------


def test_sign_in_is_refused_alike_for_a_wrong_password_an_outsider_and_an_unknown_account(
    site: Site, accounts: Accounts
) -> None:
    # Given a console and three wrong ways in
    port = start(site, accounts)
    attempts = [
        (accounts.admin, accounts.admin_password + "x"),  # a member, wrong password
        (accounts.outsider, accounts.outsider_password),  # a right password, not in the group
        (accounts.unknown, "whatever-1"),  # no such account
        ("", ""),  # nothing at all
    ]
    for account, password in attempts:
        with client(port) as http:
            # When each tries to sign in
            answer = http.sign_in(account, password)
            # Then each reads the same message, gets no session, and stays outside
            assert answer.status_code == 403, account
            assert signin_error(answer) == REFUSED, account
            assert "dropgate_console=" not in answer.headers.get("set-cookie", "")
            assert http.get("/").headers["location"] == "/signin"
    # and the member with the right password gets in
    with client(port) as http:
        answer = http.sign_in(accounts.admin, accounts.admin_password)
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        overview = http.get("/")
        assert overview.status_code == 200
        assert f'<span class="who">{accounts.admin}</span>' in overview.text
    # and the daemon's log names the refusals without saying which kind they were
    log = site.daemons[0].output()
    assert f"sign-in refused for '{accounts.outsider}' from 127.0.0.1" in log
    assert f"sign-in refused for '{accounts.unknown}' from 127.0.0.1" in log
    assert f"{accounts.admin} signed in from 127.0.0.1" in log


def test_the_throttle_stops_guessing_per_account_and_per_address_even_with_the_right_password(
    site: Site, accounts: Accounts
) -> None:
    # Given a console allowing 2 failures before each try must wait (8 s, then doubling)
    port = start(site, accounts, throttle={"free_attempts": 2, "window": "1h", "max_delay": "1h"})

    def sign_in(account: str, password: str, address: str) -> httpx.Response:
        with client(port) as http:
            token = http.csrf("/signin")
            return http.post(
                "/signin",
                data={"csrf": token, "account": account, "password": password, "next": ""},
                headers={"X-Forwarded-For": address},  # believed: the peer is 127.0.0.1, a trusted proxy
            )

    # When two wrong passwords for the admin come from one address
    for _ in range(2):
        assert signin_error(sign_in(accounts.admin, "wrong-1", "192.0.2.10")) == REFUSED
    # Then even the right password is refused at once, from that address and from another one (per account)
    for address in ("192.0.2.10", "192.0.2.11"):
        answer = sign_in(accounts.admin, accounts.admin_password, address)
        assert answer.status_code == 403
        assert signin_error(answer).startswith("Too many failed sign-ins"), address
    # When an address guesses two unknown names
    for name in ("dgc-guess-1", "dgc-guess-2"):
        assert signin_error(sign_in(name, "x", "198.51.100.7")) == REFUSED
    # Then the outsider's right password from that address is refused as too many (per address)
    assert signin_error(sign_in(accounts.outsider, accounts.outsider_password, "198.51.100.7")).startswith(
        "Too many failed sign-ins"
    )
    # and the log says the throttle held them
    log = site.daemons[0].output()
    assert f"sign-in as '{accounts.admin}' from 192.0.2.11 not tried: too many failures" in log
    assert "from 198.51.100.7 not tried: too many failures" in log


def test_sign_out_revokes_the_session_and_an_idle_or_old_session_goes_back_to_sign_in(
    site: Site, accounts: Accounts
) -> None:
    # Given a console whose sessions end after 3 s idle and 6 s in all
    port = start(site, accounts, session_idle="3s", session_max="6s")
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        cookie = http.http.cookies["dropgate_console"]
        # When the page only refreshes itself (no click), Then the session still expires when idle
        wait_for(
            lambda: http.get("/", headers={"X-Dropgate-Refresh": "1"}).status_code == 401,
            timeout=30,
            what="the idle session to expire",
        )
        answer = http.get("/runs/1")
        assert answer.status_code == 303 and answer.headers["location"] == "/signin?next=/runs/1"
    with client(port) as http:
        # When someone keeps clicking, Then the session still ends at its absolute age
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        signed_in = time.monotonic()
        wait_for(lambda: http.get("/history").status_code == 303, timeout=60, what="the absolute expiry", interval=0.5)
        assert time.monotonic() - signed_in > 3  # longer than the idle limit: the clicks kept it alive till then
        # When signing in again and out
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        signed_out = http.http.cookies["dropgate_console"]
        token = http.csrf("/")
        assert http.post("/signout", data={"csrf": token}).headers["location"] == "/signin"
    # Then that session's cookie opens nothing any more, nor does the expired one
    for old in (signed_out, cookie):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", cookies={"dropgate_console": old}) as stale:
            assert stale.get("/").headers["location"] == "/signin"


def test_cookies_are_httponly_and_samesite_strict_and_pages_carry_a_csp_without_inline_script(
    site: Site, accounts: Accounts
) -> None:
    port = start(site, accounts)
    with client(port) as http:
        answer = http.sign_in(accounts.admin, accounts.admin_password)
        cookie = answer.headers["set-cookie"]
        assert "dropgate_console=" in cookie
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would never come back
        for path in ("/", "/import", "/check", "/history", "/backups"):
            page = http.get(path)
            assert page.status_code == 200, path
            csp = page.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert page.headers["x-frame-options"] == "DENY"
            # every script is a file of the console itself; no inline script, no inline style
            assert re.findall(r"<script(?![^>]*\bsrc=)", page.text) == [], path
            assert " style=" not in page.text, path
            assert "http://" not in page.text and "https://" not in page.text, path  # no external assets
        assert http.get("/static/console.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/static/../app.py").status_code == 404


def test_a_member_removed_from_the_admin_group_is_signed_out_at_the_next_click(site: Site, accounts: Accounts) -> None:
    port = start(site, accounts)
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        assert http.get("/").status_code == 200
        # When the account leaves the group
        subprocess.run(["gpasswd", "-d", accounts.admin, accounts.group], check=True, capture_output=True)
        # Then its session no longer opens anything
        assert http.get("/").headers["location"] == "/signin"
    assert f"{accounts.admin} is no longer in {accounts.group}; signed out" in site.daemons[0].output()


# -- review and consent -----------------------------------------------------------------------------


def test_approval_needs_both_boxes_and_the_server_refuses_a_forged_form_without_them(
    site: Site, accounts: Accounts
) -> None:
    # Given a site that requires approval, and a run waiting for it
    site.write_config(policy={"require_approval": True})
    port = start(site, accounts)
    site.drop(site.pack("1.0.1", notes="Fixes the monthly report.\nRequires a reindex."))
    site.wait_step(1, "approval")
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        review = http.get("/runs/1/review")
        assert review.status_code == 200, site.daemons[0].output()[-3000:]
        assert "Fixes the monthly report." in review.text and "I have read the release notes" in review.text
        token = re.search(r'name="csrf" value="([^"]+)"', review.text).group(1)  # type: ignore[union-attr]
        # When forged forms approve with no box, one box each, or the boxes' values changed
        for boxes in ({}, {"read_notes": "yes"}, {"date_agreed": "yes"}, {"read_notes": "on", "date_agreed": "1"}):
            answer = http.post("/runs/1/approve", data={"csrf": token, **boxes})
            # Then the server refuses each, saying why, and the run still waits
            assert answer.status_code == 400, boxes
            assert "tick both boxes" in answer.text
            assert site.run(1)["step"] == "approval"  # type: ignore[index]
        # When both boxes are ticked
        answer = http.post("/runs/1/approve", data={"csrf": token, "read_notes": "yes", "date_agreed": "yes"})
        assert answer.status_code == 303 and answer.headers["location"] == "/runs/1"
        assert "approved; it continues" in http.get("/runs/1").text
    # Then the run goes on to success, and the journal says who approved it, from where, and what they affirmed
    assert site.wait_outcome(1)["outcome"] == "succeeded"
    messages = [e["message"] for e in site.show(1)["events"]]
    approval = (
        f"approved by {accounts.admin} from 127.0.0.1 (console), "
        "who affirmed: release notes read, date agreed with IT"
    )
    assert approval in messages
    shown = site.cli("show", "1")
    assert approval in shown.stdout
    assert "refused: consent boxes not ticked" in site.daemons[0].output()


def test_a_post_without_the_sessions_csrf_token_is_refused_and_changes_nothing(site: Site, accounts: Accounts) -> None:
    site.write_config(policy={"require_approval": True})
    port = start(site, accounts)
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    archive = site.pack("1.0.2")
    with client(port) as other:
        assert other.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        others_token = other.csrf("/")
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        boxes = {"read_notes": "yes", "date_agreed": "yes"}
        # When approve is posted without a token, with an empty one, or with another session's
        for extra in ({}, {"csrf": ""}, {"csrf": others_token}):
            answer = http.post("/runs/1/approve", data={**boxes, **extra})
            # Then it is refused and the run still waits
            assert answer.status_code == 403, extra
            assert "security token is missing or out of date" in answer.text
        assert site.run(1)["step"] == "approval"  # type: ignore[index]
        # and signing out without it keeps the session
        assert http.post("/signout", data={}).status_code == 403
        assert http.get("/").status_code == 200
        # and an import without a token, or with the token after the file, leaves nothing in the inbox
        token = http.csrf("/import")
        bare = http.post("/import", files={"archive": (archive.name, archive.read_bytes())})
        assert bare.status_code == 403
        late = http.post(
            "/import",
            files=[("archive", (archive.name, archive.read_bytes(), "application/gzip")), ("csrf", (None, token))],
        )
        assert late.status_code == 403
        assert inbox_names(site) == []
        # and a rollback without the token is not done
        assert http.post("/runs/1/rollback", data={}).status_code == 403
    assert site.run(1)["step"] == "approval"  # type: ignore[index]


# -- import ------------------------------------------------------------------------------------------


def _multipart(token: str, name: str, content: bytes, boundary: str = "dropgate-test-boundary") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="archive"; filename="{name}"\r\n'
            "Content-Type: application/gzip\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )


def _raw_request(port: int, cookie: str, body_length: int) -> bytes:
    return (
        "POST /import HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Cookie: dropgate_console={cookie}\r\n"
        "Content-Type: multipart/form-data; boundary=dropgate-test-boundary\r\n"
        f"Content-Length: {body_length}\r\n\r\n"
    ).encode()


def _read_answer(conn: socket.socket) -> str:
    """One whole HTTP answer (headers and its Content-Length of body) from a raw connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "the connection closed within the answer"
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


@pytest.mark.parametrize("cut", ["in the form's first part", "halfway through the file", "before the last boundary"])
def test_an_upload_cut_off_leaves_nothing_in_the_inbox(site: Site, accounts: Accounts, cut: str) -> None:
    # Given a signed-in administrator uploading an archive of 3 MiB
    port = start(site, accounts)
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        token = http.csrf("/import")
        cookie = http.http.cookies["dropgate_console"]
        body = _multipart(token, "gts.1.0.1.tgz", b"\x1f\x8b" + bytes(3 * 2**20))
        send = {
            "in the form's first part": 40,
            "halfway through the file": len(body) // 2,
            "before the last boundary": len(body) - 10,
        }[cut]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            # When the browser sends part of it, the console has started writing, and the connection drops
            conn.sendall(_raw_request(port, cookie, len(body)) + body[:send])
            if cut != "in the form's first part":
                wait_for((site.inbox / "gts.1.0.1.tgz.part").exists, what="the .part to be written")
                assert http.get("/").text.count("(browser)") == 1  # the overview shows the upload in progress
        # Then nothing is left in the inbox: no .part, no archive
        wait_for(lambda: inbox_names(site) == [], timeout=30, what="the cut upload to be removed")
        wait_for(lambda: "(browser)" not in http.get("/").text, what="the upload to leave the overview")


def test_an_archive_over_the_limit_is_refused_and_one_at_the_limit_is_taken(site: Site, accounts: Accounts) -> None:
    # Given limits.max_archive_bytes of 256 KiB
    site.write_config(limits={"max_archive_bytes": 256 * 1024})
    port = start(site, accounts)
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        token = http.csrf("/import")
        # When a file far over the limit is announced, Then it is refused from its length, before any byte
        cookie = http.http.cookies["dropgate_console"]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(_raw_request(port, cookie, 2 * 2**20))
            answer_head = _read_answer(conn)
        assert answer_head.startswith("HTTP/1.1 413"), answer_head[:200]
        assert "limits.max_archive_bytes" in answer_head
        # When a file one byte over is sent (its request within the form's slack), Then it is cut while streaming
        answer = http.post("/import", data={"csrf": token}, files={"archive": ("gts.1.0.2.tgz", bytes(256 * 1024 + 1))})
        assert answer.status_code == 413
        assert "larger than limits.max_archive_bytes" in answer.text
        assert inbox_names(site) == []
        # When a file of exactly the limit is sent, Then it reaches the inbox and becomes a run
        answer = http.post("/import", data={"csrf": token}, files={"archive": ("gts.1.0.3.tgz", bytes(256 * 1024))})
        assert answer.status_code == 303
    run = site.wait_outcome(1)
    assert run["archive"] == "gts.1.0.3.tgz" and run["size"] == 256 * 1024
    assert run["outcome"] == "rejected"  # zeros are no archive: the ordinary validation says so


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../gts.1.0.1.tgz", "cannot be an archive name"),
        ("sub/gts.1.0.1.tgz", "cannot be an archive name"),
        (".gts.1.0.1.tgz", "cannot be an archive name"),
        ("gts.1.0.1\x01.tgz", "cannot be an archive name"),
        ("gts.1.0.1.zip", "does not end in .tgz"),
        ("gts.tgz", "has no version"),
        ("C:\\fakepath\\gts.x.tgz", "is not a version"),
        ("", "no file was chosen"),
        ("g" * 250 + ".1.0.tgz", "cannot be an archive name"),
    ],
)
def test_a_hostile_file_name_is_refused_before_anything_is_written(
    site: Site, accounts: Accounts, name: str, why: str
) -> None:
    port = start(site, accounts)
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        token = http.csrf("/import")
        answer = http.post(
            "/import",
            content=_multipart(token, name, b"\x1f\x8b data"),
            headers={"Content-Type": "multipart/form-data; boundary=dropgate-test-boundary"},
        )
        assert answer.status_code == 400, answer.text[:500]
        error = re.search(r'id="import-error">([^<]*)<', answer.text)
        assert error and why in error.group(1), answer.text[:500]
    assert inbox_names(site) == []
    assert not any(site.root.rglob("*.part"))


def test_an_imported_archive_runs_like_a_drop_and_its_page_gives_the_verdict_and_the_run(
    site: Site, accounts: Accounts
) -> None:
    port = start(site, accounts)
    archive = site.pack("1.0.1")
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        token = http.csrf("/import")
        answer = http.post("/import", data={"csrf": token}, files={"archive": (archive.name, archive.read_bytes())})
        assert answer.status_code == 303
        page = answer.headers["location"]
        run = site.wait_outcome(1)
        assert run["outcome"] == "succeeded"
        shown = http.get(page).text
        assert "Run 1 ended succeeded." in shown and 'href="/runs/1"' in shown
        # and a file that is no archive is refused by the ordinary validation, the verdict on its page
        token = http.csrf("/import")
        bad = http.post("/import", data={"csrf": token}, files={"archive": ("gts.1.0.2.tgz", b"\x1f\x8b" + bytes(999))})
        assert bad.status_code == 303
        assert site.wait_outcome(2)["outcome"] == "rejected"
        verdict = http.get(bad.headers["location"]).text
        assert 'id="verdict">Refused: ' in verdict and 'href="/runs/2"' in verdict
    assert (site.platform / "current").resolve().name == "1.0.1"


# -- actions -----------------------------------------------------------------------------------------


def test_resolve_retry_and_rollback_from_the_console_are_the_daemons_own_and_recorded_with_account_and_address(
    site: Site, accounts: Accounts
) -> None:
    # Given a run that failed verify and was rolled back (the gate blocks), and a rejected one
    site.write_config(
        verify={"commands": [["test", "!", "-e", str(site.platform / "current" / "BROKEN")]], "interval_seconds": 0.2},
        policy={"timeouts": {"verify": "3s"}},
    )
    port = start(site, accounts)
    site.drop(site.pack("1.0.1", files={"BROKEN": "yes"}))
    assert site.wait_outcome(1)["outcome"] == "rolled_back"
    who = f"{accounts.admin} from 127.0.0.1 (console)"
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        # The run's page offers what the daemon would accept, each behind a confirmation that says what it does
        page = http.get("/runs/1").text
        assert 'href="/runs/1/resolve"' in page and 'href="/runs/1/retry"' in page
        confirm = http.get("/runs/1/resolve").text
        assert "the gate opens and queued archives run" in confirm
        token = re.search(r'name="csrf" value="([^"]+)"', confirm).group(1)  # type: ignore[union-attr]
        # When resolve is sent without a note, Then it is not done
        assert http.post("/runs/1/resolve", data={"csrf": token, "note": "  "}).headers["location"] == "/runs/1/resolve"
        assert site.status()["gate"] == "blocked"
        # When retry is asked while the gate is blocked, Then the daemon's own refusal shows
        http.post("/runs/1/retry", data={"csrf": token})
        assert "the gate is blocked by run 1" in http.get("/runs/1").text
        # When resolved with a note
        answer = http.post("/runs/1/resolve", data={"csrf": token, "note": "checked the platform <by hand>"})
        assert answer.headers["location"] == "/runs/1"
        assert "run 1 resolved" in http.get("/runs/1").text
        assert site.status()["gate"] == "idle"
        # When the rolled-back run is retried
        answer = http.post("/runs/1/retry", data={"csrf": token})
        assert answer.headers["location"] == "/history"
        assert "run 1 is queued again as run 2" in http.get("/history").text
        assert site.wait_outcome(2)["outcome"] == "rolled_back"
        http.post("/runs/2/resolve", data={"csrf": token, "note": "still broken, waiting for the vendor"})
        # and a good update is installed, then rolled back from the console
        site.drop(site.pack("1.0.2"))
        assert site.wait_outcome(3)["outcome"] == "succeeded"
        answer = http.post("/runs/3/rollback", data={"csrf": token})
        assert answer.headers["location"] == "/runs/3"
        assert site.wait_outcome(3, timeout=120)["outcome"] == "rolled_back"
        page = http.get("/runs/1").text
        assert "checked the platform &lt;by hand&gt;" in page  # the note, escaped
    # Then the journal records each with the account and the address, and `show` displays it
    events = {run: [e["message"] for e in site.show(run)["events"]] for run in (1, 2, 3)}
    assert f"resolved by {who}: checked the platform <by hand>" in events[1]
    assert f"retried as run 2 by {who}" in events[1]
    assert f"retry of run 1, asked by {who}" in events[2]
    assert f"rollback asked by {who}" in events[3]
    assert (site.platform / "current").resolve().name == "1.0.0"
    assert f"rollback asked by {who}" in site.cli("show", "3").stdout


def test_a_hostile_archive_name_is_shown_escaped(site: Site, accounts: Accounts) -> None:
    port = start(site, accounts)
    site.drop(b"not an archive", name="<img src=x onerror=alert(1)>.tgz")
    site.wait_outcome(1)
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        for path in ("/history", "/runs/1", "/"):
            page = http.get(path).text
            assert "<img src=x" not in page, path
            assert "&lt;img src=x onerror=alert(1)&gt;.tgz" in page, path


# -- the listener ------------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:9109", "[::]:9109", "192.0.2.1:9109", "console.example:9109"])
def test_the_daemon_refuses_a_console_off_loopback_without_tls(site: Site, listen: str) -> None:
    site.write_config(console={"listen": listen})
    result = site.cli("run", timeout=60)
    assert result.returncode == 2
    assert "console.tls: required because console.listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_with_tls_the_cookie_is_secure_and_the_console_answers_https_only(
    site: Site, accounts: Accounts, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    port = start_tls(site, accounts, cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trust, follow_redirects=False) as http:
        page = http.get("/signin")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        answer = http.post(
            "/signin",
            data={"csrf": token, "account": accounts.admin, "password": accounts.admin_password, "next": ""},
        )
        cookie = answer.headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert http.get("/").headers["strict-transport-security"].startswith("max-age=")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/signin", timeout=10)


def start_tls(site: Site, accounts: Accounts, cert: Path, key: Path) -> int:
    port = console_config(site, accounts, tls={"cert": str(cert), "key": str(key)})
    site.start_daemon()

    def answering() -> bool:
        try:
            trust = ssl.create_default_context(cafile=str(cert))
            return httpx.get(f"https://127.0.0.1:{port}/signin", verify=trust, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answering, timeout=30, what="the console to answer over TLS")
    return port


def _half_an_upload(site: Site, accounts: Accounts) -> tuple[int, bytes]:
    """The console's port, with the administrator signed in, and the first half of a 4 MiB import request."""
    port = start(site, accounts)
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        token = http.csrf("/import")
        cookie = http.http.cookies["dropgate_console"]
    body = _multipart(token, "gts.1.0.1.tgz", bytes(4 * 2**20))
    return port, _raw_request(port, cookie, len(body)) + body[: len(body) // 2]


def test_sigterm_stops_the_daemon_during_an_upload_and_the_part_is_removed(site: Site, accounts: Accounts) -> None:
    port, half = _half_an_upload(site, accounts)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        # Given an upload that is half sent and then stalls
        conn.sendall(half)
        wait_for((site.inbox / "gts.1.0.1.tgz.part").exists, what="the .part to be written")
        # When the daemon is told to stop, Then it stops (within the fixture's deadline) and keeps nothing
        assert site.daemons[0].stop(timeout=30) == 0
    assert inbox_names(site) == []


def test_a_part_left_by_a_killed_daemon_is_removed_at_the_next_start(site: Site, accounts: Accounts) -> None:
    port, half = _half_an_upload(site, accounts)
    (site.inbox / "gts.1.0.2.tgz.part").write_bytes(b"someone else's upload, not the console's")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        # Given an upload half sent when the daemon is killed (nothing of it can clean up)
        conn.sendall(half)
        part = site.inbox / "gts.1.0.1.tgz.part"
        wait_for(lambda: part.exists() and part.stat().st_size > 0, what="the .part to be written")
        site.daemons[0].kill()
    assert part.exists()
    # When the daemon starts again, Then the console's own .part is removed (and said), the other kept
    site.start_daemon()
    wait_console(port)
    assert inbox_names(site) == ["gts.1.0.2.tgz.part"]
    assert "removed gts.1.0.1.tgz.part, an upload cut off when the daemon last stopped" in site.daemons[1].output()


@pytest.mark.parametrize("channels", [["stable"], ["stable", "unstable"]])
def test_an_unstable_archive_waits_for_review_only_where_policy_channels_allows_it(
    site: Site, accounts: Accounts, channels: list[str]
) -> None:
    site.write_config(policy={"require_approval": True, "channels": channels})
    port = start(site, accounts)
    site.drop(site.pack("1.0.1", channel="unstable"))
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        if "unstable" in channels:
            site.wait_step(1, "approval")
            assert "waits for approval" in http.get("/").text
            review = http.get("/runs/1/review").text
            assert '<span class="badge">unstable</span>' in review and "Approve and install" in review
        else:
            run = site.wait_outcome(1)
            assert run["outcome"] == "rejected" and "unstable" in run["error"]
            assert "waits for approval" not in http.get("/").text
            assert "Approve and install" not in http.get("/runs/1/review").text
