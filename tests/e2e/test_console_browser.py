"""The console in a real browser: Debian's chromium, headless, driven by Playwright.

A real local account signs in through PAM, imports an archive through the file
chooser (the upload bar moving), reviews it, ticks the two boxes, approves,
and watches the run to success on the live page. The same import works with
JavaScript off, and a browser left idle is sent back to sign-in by itself.

With DROPGATE_SCREENSHOTS=DIR the pages are also saved there (docs/console/
holds the ones the README shows: `DROPGATE_SCREENSHOTS=docs/console
.venv/bin/pytest tests/e2e/test_console_browser.py`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Site, cannot_run, require_tool, wait_for
from tests.console_helpers import Accounts, console_config, wait_console

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1100, "height": 820}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def playwright() -> Iterator[Any]:
    require_tool("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        cannot_run("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as driver:
        yield driver


class Browser:
    """A fresh chromium profile; `page` is its one tab."""

    def __init__(self, driver: Any, profile: Path, *, javascript: bool = True, viewport: dict[str, int] = DESKTOP):
        self.context = driver.chromium.launch_persistent_context(
            str(profile),
            executable_path=shutil.which("chromium"),
            args=CHROMIUM_ARGS,
            headless=True,
            java_script_enabled=javascript,
            viewport=viewport,
        )
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.set_default_timeout(60_000)

    def close(self) -> None:
        self.context.close()


class Shots:
    """Screenshots into the test's folder, and into $DROPGATE_SCREENSHOTS when it is set."""

    def __init__(self, folder: Path) -> None:
        self.folders = [folder]
        extra = os.environ.get("DROPGATE_SCREENSHOTS")
        if extra:
            self.folders.append(Path(extra))
        for path in self.folders:
            path.mkdir(parents=True, exist_ok=True)

    def take(self, page: Any, name: str, *, full_page: bool = True) -> None:
        data = page.screenshot(full_page=full_page)
        assert data.startswith(b"\x89PNG"), name
        for folder in self.folders:
            (folder / f"{name}.png").write_bytes(data)


def sign_in(page: Any, base: str, account: str, password: str) -> None:
    page.goto(base + "/")
    assert page.url.endswith("/signin")
    page.fill("input[name=account]", account)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def test_an_administrator_imports_reviews_approves_and_follows_an_update_in_the_browser(
    site: Site, accounts: Accounts, playwright: Any, tmp_path: Path
) -> None:
    # Given a site that requires approval, its console, and an archive of 3 MiB with release notes, an SQL
    # migration, and a reindex that reports its progress and waits for the test
    site.write_config(policy={"require_approval": True}, platform={"migration_runners": {".sql": ["cat"]}})
    reindexed = tmp_path / "reindex-may-finish"
    port = console_config(site, accounts)
    site.start_daemon()
    wait_console(port)
    base = f"http://127.0.0.1:{port}"
    archive = site.pack(
        "1.1.0",
        files={
            "static/bundle.bin": secrets.token_bytes(3 * 2**20),
            "migrations/0042-reports.sql": "ALTER TABLE reports ADD COLUMN month integer;\n",
            "migrations/0043-reindex.sh": (
                "#!/bin/sh\n"  # reports its progress as it goes, as a long reindex would
                f"while [ ! -e {reindexed} ]; do\n"
                '  echo \'{"progress": 0.4, "message": "reindexing reports"}\' >/dev/fd/$DROPGATE_PROGRESS_FD\n'
                "  sleep 0.2\ndone\n"
            ),
        },
        notes="Monthly reports by department.\nThe reports table gains a column.",
        migrations=["migrations/0042-reports.sql", "migrations/0043-reindex.sh"],
    )
    shots = Shots(tmp_path / "shots")
    browser = Browser(playwright, tmp_path / "profile")
    page = browser.page
    try:
        # When the administrator signs in with the machine account
        page.goto(base + "/")
        shots.take(page, "signin")
        sign_in(page, base, accounts.admin, accounts.admin_password)
        page.wait_for_url(base + "/")
        assert page.inner_text("#gate") == "idle"
        assert page.inner_text("#installed") == "1.0.0"
        shots.take(page, "overview")
        # and imports the archive through the file chooser, on a slow link so the bar can be seen moving
        page.click("text=Import")
        cdp = browser.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 1024 * 1024},
        )
        with page.expect_file_chooser() as chooser:
            page.click("input[type=file]")
        chooser.value.set_files(str(archive))
        page.click("button:has-text('Import')")
        # Then the upload bar moves while the bytes go
        page.wait_for_function(
            "() => { const p = document.querySelector('.upload-progress progress');"
            " return p && p.value > 0 && p.value < p.max; }"
        )
        assert re.match(r"\d+ % of gts\.1\.1\.0\.tgz", page.inner_text(".upload-text"))
        shots.take(page, "import")
        # and the verdict shows as soon as it is known, with the run waiting for approval
        page.wait_for_url(re.compile(r".*/uploads/1$"))
        cdp.send(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
        page.wait_for_selector("#verdict:has-text('run 1 is in approval')")
        shots.take(page, "upload")
        # When the administrator opens the review
        page.click("text=Review and approve")
        assert "Monthly reports by department." in page.inner_text("#notes")
        assert "ALTER TABLE reports ADD COLUMN month integer;" in page.inner_text("pre.sql")
        assert page.inner_text("#downtime").startswith("yes")  # 1.0 → 1.1: a minor version needs downtime
        assert "added" in page.inner_text("#files")
        shots.take(page, "review")
        # and clicks Approve without the boxes, Then the browser does not send it and the run still waits
        page.click("button:has-text('Approve and install')")
        assert page.url.endswith("/runs/1/review")
        assert site.run(1)["step"] == "approval"  # type: ignore[index]
        # When both boxes are ticked and Approve clicked
        page.check("input[name=read_notes]")
        page.check("input[name=date_agreed]")
        page.click("button:has-text('Approve and install')")
        page.wait_for_url(base + "/runs/1")
        assert "approved; it continues" in page.inner_text("main")
        # Then the run page follows the run by itself (live refresh, no reload): the step, its progress, maintenance
        page.wait_for_selector("li.current:has-text('reindexing reports')", timeout=120_000)
        assert page.inner_text("li.current strong") == "apply"
        # the migration's own 40 % fills its share of apply's bar: shown as a part of the step, never 100 %
        shown = re.search(r"(\d+) %", page.inner_text("li.current"))
        assert shown is not None and 0 < int(shown.group(1)) < 100, page.inner_text("li.current")
        assert "of its 2 min limit" in page.inner_text("li.current")
        assert "maintenance ON" in page.inner_text("dl.facts")
        shots.take(page, "progress", full_page=False)
        # and to success once the reindex is done
        reindexed.touch()
        page.wait_for_selector(".badge.succeeded", timeout=120_000)
        assert f"approved by {accounts.admin} from 127.0.0.1 (console)" in page.inner_text("table.events")
        shots.take(page, "run", full_page=False)
        # and the other pages answer: server check (critical and notices apart), history, backups, a confirmation
        page.click("text=Server check")
        assert page.inner_text("#critical h2") == "Critical problems"
        assert page.inner_text("#notices h2") == "Notices"
        shots.take(page, "check")
        page.click("text=History")
        assert "gts.1.1.0.tgz" in page.inner_text("table.history")
        shots.take(page, "history")
        page.click("text=Backups")
        assert page.inner_text("table.history tbody tr td").strip() == "1"
        shots.take(page, "backups")
        page.goto(base + "/runs/1/rollback")
        assert "Put the platform back as it was before run 1" in page.inner_text(".consequence")
        shots.take(page, "confirm")
        # and on a phone the overview reads without sideways scrolling
        page.set_viewport_size(PHONE)
        page.goto(base + "/")
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")
        shots.take(page, "overview-phone")
    finally:
        browser.close()
    assert site.wait_outcome(1)["outcome"] == "succeeded"
    assert (site.platform / "current").resolve().name == "1.1.0"


def test_with_javascript_off_the_import_still_works_through_the_plain_form(
    site: Site, accounts: Accounts, playwright: Any, tmp_path: Path
) -> None:
    port = console_config(site, accounts)
    site.start_daemon()
    wait_console(port)
    base = f"http://127.0.0.1:{port}"
    archive = site.pack("1.0.1")
    browser = Browser(playwright, tmp_path / "profile", javascript=False)
    page = browser.page
    try:
        sign_in(page, base, accounts.admin, accounts.admin_password)
        page.wait_for_url(base + "/")
        page.goto(base + "/import")
        with page.expect_file_chooser() as chooser:
            page.click("input[type=file]")
        chooser.value.set_files(str(archive))
        page.click("button:has-text('Import')")
        page.wait_for_url(re.compile(r".*/uploads/1$"))

        def verdict() -> bool:
            page.reload()  # no script, no live refresh: the administrator reloads
            return "Run 1 ended succeeded." in page.inner_text("main")

        wait_for(verdict, timeout=120, what="the verdict on the upload page", interval=1)
    finally:
        browser.close()
    assert (site.platform / "current").resolve().name == "1.0.1"


def test_a_browser_left_idle_is_sent_back_to_sign_in_by_itself(
    site: Site, accounts: Accounts, playwright: Any, tmp_path: Path
) -> None:
    port = console_config(site, accounts, session_idle="4s", session_max="1h")
    site.start_daemon()
    wait_console(port)
    base = f"http://127.0.0.1:{port}"
    browser = Browser(playwright, tmp_path / "profile")
    page = browser.page
    try:
        sign_in(page, base, accounts.admin, accounts.admin_password)
        page.wait_for_url(base + "/")
        # When nobody clicks (the page keeps refreshing itself), Then the browser lands on sign-in
        page.wait_for_url(re.compile(r".*/signin$"), timeout=60_000)
        assert page.is_visible("input[name=password]")
    finally:
        browser.close()
