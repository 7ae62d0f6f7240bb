"""Shared by the console tests: real local accounts, a console-enabled site, a plain HTTP client.

The accounts are real: `useradd` + `chpasswd` in a fresh group, so sign-in goes
through the machine's PAM stack (pam_unix) exactly as on a site. That needs
root; elsewhere the tests skip (and fail under CI).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import Site, cannot_run, free_port, wait_for


@dataclass(frozen=True)
class Accounts:
    group: str
    admin: str
    admin_password: str
    outsider: str
    outsider_password: str
    unknown: str


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        cannot_run(f"{' '.join(argv[:2])} failed: {result.stderr.strip()}")


@pytest.fixture
def accounts() -> Iterator[Accounts]:
    """A fresh group with one member and one account outside it, both with passwords; removed afterwards."""
    if os.geteuid() != 0:
        cannot_run("creating local accounts for a real PAM sign-in needs root")
    for tool in ("useradd", "userdel", "groupadd", "groupdel", "chpasswd"):
        if shutil.which(tool) is None:
            cannot_run(f"{tool} is not installed")
    tag = secrets.token_hex(3)
    made = Accounts(
        group=f"dgc-admin-{tag}",
        admin=f"dgc-a-{tag}",
        admin_password="Adm1n-" + secrets.token_urlsafe(9),
        outsider=f"dgc-o-{tag}",
        outsider_password="0ther-" + secrets.token_urlsafe(9),
        unknown=f"dgc-nobody-{tag}",
    )
    users: list[str] = []
    try:
        _run("groupadd", made.group)
        for user, extra in ((made.admin, ["-G", made.group]), (made.outsider, [])):
            _run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", *extra, user)
            users.append(user)
        passwords = f"{made.admin}:{made.admin_password}\n{made.outsider}:{made.outsider_password}\n"
        result = subprocess.run(["chpasswd"], input=passwords, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            cannot_run(f"chpasswd failed: {result.stderr.strip()}")
        yield made
    finally:
        for user in users:
            subprocess.run(["userdel", user], capture_output=True, timeout=60)
        subprocess.run(["groupdel", made.group], capture_output=True, timeout=60)


def console_config(site: Site, accounts: Accounts, **console: Any) -> int:
    """Turn the site's console on (loopback, a free port) with the test group as admin group."""
    port = free_port()
    site.write_config(
        console={"listen": f"127.0.0.1:{port}", **console},
        control={"admin_group": accounts.group},
    )
    return port


class Browserless:
    """A plain HTTP client of the console (cookies kept), for what a page's own JavaScript cannot forge."""

    def __init__(self, base: str, **options: Any) -> None:
        self.base = base
        self.http = httpx.Client(base_url=base, follow_redirects=False, timeout=60, **options)

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, **options: Any) -> httpx.Response:
        return self.http.get(path, **options)

    def post(self, path: str, **options: Any) -> httpx.Response:
        return self.http.post(path, **options)

    def csrf(self, path: str) -> str:
        """The CSRF token of the form on page `path`."""
        page = self.get(path)
        assert page.status_code == 200, (path, page.status_code, page.text[:300])
        match = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert match, f"no CSRF field on {path}"
        return match.group(1)

    def sign_in(self, account: str, password: str) -> httpx.Response:
        token = self.csrf("/signin")
        return self.post("/signin", data={"csrf": token, "account": account, "password": password, "next": ""})


def signin_error(response: httpx.Response) -> str:
    match = re.search(r'id="signin-error">([^<]*)<', response.text)
    return match.group(1) if match else ""


def wait_console(port: int) -> None:
    def answering() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/signin", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answering, timeout=30, what="the console to answer")


@contextlib.contextmanager
def client(port: int) -> Iterator[Browserless]:
    browserless = Browserless(f"http://127.0.0.1:{port}")
    try:
        yield browserless
    finally:
        browserless.close()
