"""The read-only commands' configuration without the schema: fast, and never wrong.

A full validation leaves a record in the state folder; `status` uses it only
when it matches the very file (path, length, CRC-32), this dropgate, and was
written by root or this user. A record that is used is shown here by giving
it a value the file does not have (the platform's root): that value appears;
every case where it must not be used shows the file's own value, or the
configuration error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.journal import Journal
from pipeline.quickconfig import CHECKED_NAME, DEFAULT_STATE, _scan_state, load_quick, validate
from tests.conftest import ROOT, Site


@pytest.fixture(autouse=True)
def journal(site: Site) -> None:
    """A journal, as any site that ran its daemon once has (without one, `status` exits 5)."""
    Journal(site.state / "journal.db").close()


@pytest.fixture
def recorded(site: Site) -> Site:
    """A site whose configuration was validated once (as the daemon does when it starts)."""
    validate(site.config_path)
    assert (site.state / CHECKED_NAME).exists()
    return site


def plant(site: Site) -> Path:
    """Point the record's platform root at another platform, installed at 9.9.9; return that root."""
    other = site.root / "other-platform"
    (other / "releases" / "9.9.9").mkdir(parents=True)
    os.symlink("releases/9.9.9", other / "current")
    path = site.state / CHECKED_NAME
    record = json.loads(path.read_text())
    record["values"]["platform.root"] = str(other)
    path.write_text(json.dumps(record))
    return other


def installed(site: Site) -> str:
    return str(site.status()["installed_version"])


def test_the_daemon_records_the_configuration_it_validated(site: Site) -> None:
    site.start_daemon()
    record = site.state / CHECKED_NAME
    assert record.exists()
    assert record.stat().st_mode & 0o777 == 0o640
    values = json.loads(record.read_text())["values"]
    assert values["paths.state"] == str(site.state) and values["platform.root"] == str(site.platform)


def test_a_matching_record_is_used_without_the_schema(recorded: Site) -> None:
    plant(recorded)
    assert installed(recorded) == "9.9.9"  # the record's value: it was used


def test_status_without_a_record_validates_and_leaves_one(site: Site) -> None:
    assert not (site.state / CHECKED_NAME).exists()
    assert installed(site) == "1.0.0"
    assert (site.state / CHECKED_NAME).exists()  # root may write the state folder


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("keep_releases: 3", "keep_releases: x"),  # same length, now invalid
        ("product: gts", "product: GTS"),  # same length, now invalid (pattern)
        ("product: gts", "product: gts\n  colour: blue"),  # an unknown key
        ("product: gts", "product: [gts"),  # not YAML any more
    ],
)
def test_an_edit_that_makes_the_configuration_invalid_is_reported_at_once(recorded: Site, old: str, new: str) -> None:
    # Given a record, and the file edited into an invalid configuration
    recorded.write_config(platform={"keep_releases": 3})
    validate(recorded.config_path)
    plant(recorded)
    text = recorded.config_path.read_text()
    assert old in text
    recorded.config_path.write_text(text.replace(old, new, 1))
    # When status runs, Then the edit is seen: configuration error, exit 2
    result = recorded.cli("status", "--json")
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("dropgate: configuration error: ")
    assert "Traceback" not in result.stderr


def test_a_valid_edit_is_seen_at_once(recorded: Site) -> None:
    plant(recorded)
    other = recorded.root / "platform-b"
    (other / "releases" / "2.0.0").mkdir(parents=True)
    os.symlink("releases/2.0.0", other / "current")
    recorded.write_config(platform={"root": str(other)})
    assert installed(recorded) == "2.0.0"


@pytest.mark.parametrize("change", ["owner", "group-writable", "version", "fields", "other file", "symlink"])
def test_a_record_that_cannot_be_trusted_or_does_not_match_is_not_used(recorded: Site, change: str) -> None:
    path = recorded.state / CHECKED_NAME
    plant(recorded)
    record = json.loads(path.read_text())
    if change == "owner":
        os.chown(path, 65534, 65534)  # written by someone else (nobody)
    elif change == "group-writable":
        path.chmod(0o660)
    elif change == "version":
        record["key"]["version"] = "0.0.1"
        path.write_text(json.dumps(record))
    elif change == "fields":
        record["values"]["extra"] = "x"
        path.write_text(json.dumps(record))
    elif change == "other file":
        record["key"]["config"] = str(recorded.root / "another.yaml")
        path.write_text(json.dumps(record))
    elif change == "symlink":
        target = recorded.root / "elsewhere.json"
        path.rename(target)
        path.symlink_to(target)
    # Then the file's own platform is shown
    assert installed(recorded) == "1.0.0"


def test_the_status_path_loads_neither_the_schema_nor_the_daemons_libraries(recorded: Site) -> None:
    recorded.start_daemon()
    recorded.drop(recorded.pack("1.0.1"))
    recorded.wait_outcome(1)
    code = (
        "import contextlib, io, sys\n"
        "from pipeline.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = main(['--config', {str(recorded.config_path)!r}, 'status', '--json'])\n"
        "heavy = ('pydantic', 'psutil', 'watchdog', 'prometheus_client', 'httpx', 'yaml', 'cryptography',"
        " 'transitions', 'hashlib')\n"
        "print(code, sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0 []"


@pytest.mark.parametrize(
    ("text", "state"),
    [
        (b"paths:\n  inbox: in\n  state: st  # the journal\n", b"st"),
        (b"# comment\npaths:\n    state: '/srv/dropgate state'\nplatform:\n  state: no\n", b"/srv/dropgate state"),
        (b'paths:\n  state: "/var/x"\n', b"/var/x"),
        (b"platform: {product: gts}\n", str(DEFAULT_STATE).encode()),  # no paths: the default
        (b"paths:\n  inbox: in\nstate: top-level\n", str(DEFAULT_STATE).encode()),
        (b"paths: {state: /flow}\n", None),  # flow style: left to the YAML parser
    ],
)
def test_the_state_folder_is_found_without_a_yaml_parser(text: bytes, state: bytes | None) -> None:
    assert _scan_state(text) == state


def test_a_flow_style_configuration_finds_its_record_through_the_parser(tmp_path: Path) -> None:
    # Given a configuration written in flow style, validated once
    (tmp_path / "p" / "releases" / "1.0").mkdir(parents=True)
    os.symlink("releases/1.0", tmp_path / "p" / "current")
    config = tmp_path / "dropgate.yaml"
    config.write_text("paths: {inbox: in, state: st, backups: b}\nplatform: {product: gts, root: p}\n")
    (tmp_path / "st").mkdir()
    validate(config)
    # Then the quick load finds the record and reads its values
    quick = load_quick(config)
    assert quick.paths.state == tmp_path / "st"
    assert quick.platform.root == tmp_path / "p"


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ({}, None),
        ({"platform": {"keep_releases": "many"}}, "platform.keep_releases"),
        ({"inbox": {"colour": "blue"}}, "inbox.colour"),
        ({"console": {"listen": "0.0.0.0:9109"}}, "console.tls"),
    ],
)
def test_run_check_validates_the_configuration_and_starts_nothing(site: Site, edit: dict, problem: str | None) -> None:
    # Given a configuration (valid, or with one problem), and no daemon ever started here
    site.write_config(**edit)
    before = sorted(p.name for p in site.state.iterdir()) if site.state.exists() else []
    # When `dropgate run --check` runs (what the Ansible role validates a new configuration with)
    result = site.cli("run", "--check", timeout=60)
    # Then it says whether the file is valid, by its exit code and one line, and creates nothing
    if problem is None:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"configuration OK: {site.config_path}"
    else:
        assert result.returncode == 2, result.stdout
        assert problem in result.stderr and len(result.stderr.strip().splitlines()) == 1
    after = sorted(p.name for p in site.state.iterdir()) if site.state.exists() else []
    assert after == before
