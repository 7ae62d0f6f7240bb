"""Names with escape sequences, carriage returns, newlines and bidi overrides, dropped into the inbox.

An uploader chooses file names; a vendor's hook chooses its progress messages.
The operator's terminal must show them, never obey them: the text output of
status, history, show (with the log), preflight, backups verify and verify
escapes them, and the JSON output keeps them exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Site, wait_for

HOSTILE = [
    "gts.1.0.1\x1b[2J\x1b[H.tgz",  # clears the screen
    "gts.1.0.2\r\x1b[Kgts.9.9.9.tgz",  # goes back and overwrites the line
    "gts.1.0.3.tgz\nrun 99: gts.9.9.9.tgz (1.0.0 → 9.9.9) succeeded",  # forges a line
    "gts.1.0.4.\u202egzt.tgz",  # right-to-left override
    "\x1b]0;owned\x07gts.1.0.5.tgz",  # sets the terminal's title
    "gts.1.0.6\u2028\x9b31m.tgz",  # a Unicode line separator and a C1 CSI
]


def obeyed(text: str) -> list[str]:
    """The characters of `text` a terminal would act on (newlines between lines aside)."""
    return [char for char in text if not char.isprintable() and char != "\n"]


def cli_ok(site: Site, *args: str) -> str:
    result = site.cli(*args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture
def hostile_site(site: Site) -> Site:
    """A running daemon that has rejected one archive for each hostile name."""
    site.start_daemon()
    for name in HOSTILE:
        site.drop(b"not an update archive\n", name=name)
    wait_for(lambda: len(site.history()) == len(HOSTILE), what="every hostile file to become a run")
    for run in site.history():
        site.wait_outcome(run["id"])
    return site


def test_status_history_and_show_escape_names_and_reasons(hostile_site: Site) -> None:
    site = hostile_site
    # When the operator reads status, history and each run with its log
    status = cli_ok(site, "status")
    history = cli_ok(site, "history")
    shows = [cli_ok(site, "show", str(run_id), "--log") for run_id in range(1, len(HOSTILE) + 1)]
    # Then nothing in the text output would be obeyed by a terminal
    for text in (status, history, *shows):
        assert obeyed(text) == [], text
    # and each name is there, escaped
    assert "gts.1.0.1\\x1b[2J\\x1b[H.tgz" in shows[0]
    assert "gts.1.0.2\\x0d\\x1b[Kgts.9.9.9.tgz" in shows[1]
    assert "gts.1.0.4.\\u202egzt.tgz" in shows[3]
    assert "\\x1b]0;owned\\x07gts.1.0.5.tgz" in shows[4]
    assert "\\u2028\\x9b31m" in shows[5]
    # and the forged line never starts a line of its own
    for text in (status, history, *shows):
        assert not any(line.startswith("run 99:") for line in text.splitlines())
    assert "gts.1.0.3.tgz\\x0arun 99: gts.9.9.9.tgz" in shows[2]
    # history: one line per run and the header, however many newlines the names held
    assert len(history.splitlines()) == len(HOSTILE) + 1


def test_json_output_keeps_the_names_exact(hostile_site: Site) -> None:
    site = hostile_site
    for args in (("status", "--json"), ("history", "--json"), ("show", "3", "--json", "--log")):
        text = cli_ok(site, *args)
        # JSON escapes control and non-ASCII characters itself: a terminal obeys nothing
        assert obeyed(text) == []
        json.loads(text)
    names = {run["archive"] for run in site.history()}
    assert names == set(HOSTILE)
    assert site.show(3)["archive"] == HOSTILE[2]


def test_a_hooks_progress_message_is_escaped_in_status(site: Site) -> None:
    # Given an update whose migration reports a progress message holding escape sequences, then waits
    message = "\x1b[2J\x1b[31mALL DATA LOST\r\nrun 1: fine"
    line = json.dumps({"progress": 0.5, "message": message})
    go_on = site.root / "go-on"
    migration = (
        f"#!/bin/sh\nprintf '%s\\n' '{line}' >/dev/fd/\"$DROPGATE_PROGRESS_FD\"\n"
        f"for i in $(seq 300); do [ -e '{go_on}' ] && exit 0; sleep 0.1; done\n"
    )
    archive = site.pack("1.0.1", files={"migrations/001.sh": migration}, migrations=["migrations/001.sh"])
    site.start_daemon()
    site.drop(archive)
    # When status is read while the migration runs
    wait_for(lambda: (site.run(1) or {}).get("progress_message"), what="the migration's progress message")
    status = cli_ok(site, "status")
    # Then the message is shown, escaped, on the step's line
    assert obeyed(status) == []
    assert "\\x1b[2J\\x1b[31mALL DATA LOST\\x0d\\x0arun 1: fine" in status
    assert json.loads(cli_ok(site, "status", "--json"))["run"]["progress_message"] == message
    go_on.touch()
    assert site.wait_outcome(1)["outcome"] == "succeeded"


def test_preflight_and_verify_escape_a_hostile_archive_name(site: Site, tmp_path: Path) -> None:
    # Given a signed archive saved under a hostile name
    _, public = site.keypair()
    hostile = tmp_path / "gts.1.0.1\x1b[2J\u202e.tgz"
    shutil.copyfile(site.pack("1.0.1"), hostile)
    # When the operator previews it and the vendor verifies it
    preflight = site.cli("preflight", str(hostile))
    verify = subprocess.run(
        [sys.executable, "-m", "pipeline", "verify", str(hostile), "--key", str(public)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    # Then both say what is wrong with the name, escaped, and exit 1
    for result in (preflight, verify):
        assert result.returncode == 1, result.stdout + result.stderr
        assert obeyed(result.stdout + result.stderr) == []
        assert "Traceback" not in result.stderr
    assert "gts.1.0.1\\x1b[2J\\u202e.tgz" in preflight.stdout
    assert "gts.1.0.1\\x1b[2J\\u202e.tgz: REJECTED" in verify.stdout


def test_backups_verify_escapes_the_names_of_damaged_files(site: Site) -> None:
    # Given a platform data file whose name holds escape sequences, backed up by a real update
    hostile = "report\x1b[2J\r\n.pdf"
    (site.data / hostile).write_text("patient letter\n")
    site.start_daemon()
    site.drop(site.pack("1.0.1"))
    assert site.wait_outcome(1)["outcome"] == "succeeded"
    # When its copy in the snapshot is damaged and the operator re-checks the snapshot
    copy = next(path for path in (site.backups / "1").rglob("*") if path.name == hostile)
    copy.write_text("tampered\n")
    result = site.cli("backups", "verify", "1")
    # Then the problem names the file, escaped
    assert result.returncode == 1, result.stdout + result.stderr
    assert obeyed(result.stdout) == []
    assert "report\\x1b[2J\\x0d\\x0a.pdf" in result.stdout


NOT_UTF8 = [
    os.fsdecode(b"gts.1.0.1\xff.tgz"),  # a Latin-1 byte
    os.fsdecode(b"\xc3(gts.1.0.2.tgz"),  # a broken two-byte sequence
    os.fsdecode(b"gts.1.0.3.tgz\xed\xa0\x80"),  # an encoded surrogate
]


@pytest.mark.parametrize("valid_archive", [False, True], ids=["garbage", "signed-archive"])
def test_a_name_that_is_not_utf8_is_refused_kept_and_blocks_nothing(site: Site, valid_archive: bool) -> None:
    # Given files whose names hold bytes that are not UTF-8 (signed archives or garbage), and one good update after them
    site.start_daemon()
    content = site.pack("1.0.1").read_bytes() if valid_archive else b"not an update archive\n"
    for name in NOT_UTF8:
        site.drop(content, name=name)
    wait_for(lambda: len(site.history()) == len(NOT_UTF8), what="a run for each badly named file")
    site.drop(site.pack("1.0.1"))
    wait_for(lambda: len(site.history()) == len(NOT_UTF8) + 1, what="a run for the good update")
    # Then each is rejected, naming the problem, with its name escaped in the journal
    runs = {run["id"]: site.wait_outcome(run["id"]) for run in site.history()}
    refused = [run for run in runs.values() if run["outcome"] == "rejected"]
    assert len(refused) == len(NOT_UTF8)
    for run in refused:
        assert "file name is not valid UTF-8" in run["error"], run
    assert {run["archive"] for run in refused} == {
        "gts.1.0.1\\xff.tgz", "\\xc3(gts.1.0.2.tgz", "gts.1.0.3.tgz\\xed\\xa0\\x80"
    }
    # and each file is kept aside with its bytes and its reason, never deleted
    kept = sorted(path for path in (site.state / "rejected").iterdir() if not path.name.endswith(".reason"))
    assert len(kept) == len(NOT_UTF8)
    for path in kept:
        assert path.read_bytes() == content
        assert "not valid UTF-8" in Path(f"{path}.reason").read_text()
    # and the good update behind them was taken and installed, and the text output escapes the names
    good = max(runs)
    assert runs[good]["outcome"] == "succeeded", runs[good]
    history = cli_ok(site, "history")
    assert obeyed(history) == [] and "gts.1.0.1\\xff.tgz" in history
    json.loads(cli_ok(site, "status", "--json"))


def test_a_badly_named_file_left_in_intake_by_a_crash_is_refused_at_restart(site: Site) -> None:
    # Given a daemon killed while a file named with bytes that are not UTF-8 was being taken
    site.start_daemon().stop()
    token = site.state / "intake" / "1700000000000000000-1.0"
    token.mkdir(parents=True)
    (token / os.fsdecode(b"gts.1.0.1\xfe.tgz")).write_bytes(site.pack("1.0.1").read_bytes())
    # When the daemon starts again
    site.start_daemon()
    # Then the file becomes a rejected run, and the daemon goes on working
    wait_for(lambda: len(site.history()) == 1, what="the leftover file to become a run")
    run = site.wait_outcome(1)
    assert run["outcome"] == "rejected" and "not valid UTF-8" in run["error"]
    site.drop(site.pack("1.0.1"))
    assert site.wait_outcome(2)["outcome"] == "succeeded"
