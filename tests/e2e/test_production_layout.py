"""The read-only commands on the documented production layout, run by real users in real groups.

The folders get their owners and modes from deploy/systemd/dropgate-tmpfiles.conf
(applied by the real systemd-tmpfiles), the configuration those of
deploy/install.sh (/etc/dropgate 0750 and dropgate.yaml 0640, root and the
admin group). The daemon runs as root, as the unit runs it; the commands run
as system users made for the test (useradd, groupadd; removed afterwards)
through setpriv with their groups initialised as a login would:

- an admin (group dropgate-admin, not dropgate-upload) reads status, history
  and show while the daemon runs, after it stopped and after it was killed;
  what that user may not read (the inbox) is reported as such, never as a
  traceback;
- an uploader and a user in neither group get "not allowed", exit 4;
- the daemon itself refuses a peer outside the admin group (exit 4) even when
  a misconfigured socket lets that peer connect.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.journal import Journal
from tests.conftest import ROOT, Site, cannot_run, require_tool, wait_for

TMPFILES = ROOT / "deploy" / "systemd" / "dropgate-tmpfiles.conf"


@dataclass
class Layout:
    """A production layout under `root`, the site that drives it, and the test's users."""

    root: Path
    site: Site
    python: str
    admin: str
    uploader: str
    outsider: str
    admin_group: str

    def as_user(self, user: str, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`dropgate ARGS` run by `user`, with the groups a login would give it."""
        setpriv = require_tool("setpriv")
        entry = pwd.getpwnam(user)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
            # the checkout and its installed libraries, readable by everyone (the venv's own interpreter is not)
            "PYTHONPATH": f"{ROOT}:{sysconfig.get_paths()['purelib']}",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        argv = [setpriv, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--"]
        argv += [self.python, "-m", "pipeline", "--config", str(config or self.site.config_path), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd="/")


def run(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{argv}: {result.stderr}"


def interpreter_for_others() -> str:
    """A Python of this version that other users may execute (a venv's may live under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = (os.path.realpath(sys.executable), f"/usr/bin/{version}", f"/usr/local/bin/{version}")

    def open_to_others(path: Path) -> bool:
        return path.is_file() and all(os.stat(p).st_mode & 0o001 for p in [*path.parents, path])

    usable = [c for c in candidates if open_to_others(Path(c))]
    if not usable:
        cannot_run(f"no {version} that other users may run")
    return usable[0]


@pytest.fixture
def layout() -> Iterator[Layout]:
    if os.geteuid() != 0:
        cannot_run("the production layout test makes users and groups: it needs root")
    tmpfiles = require_tool("systemd-tmpfiles")
    for tool in ("useradd", "groupadd", "userdel", "groupdel", "setpriv"):
        require_tool(tool)
    python = interpreter_for_others()
    tag = secrets.token_hex(3)
    groups = {"admin": f"dgt{tag}adm", "upload": f"dgt{tag}upl"}
    users = {"admin": f"dgt{tag}admin", "uploader": f"dgt{tag}upload", "outsider": f"dgt{tag}other"}
    made_groups: list[str] = []
    made_users: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="dropgate-layout-", dir="/var/tmp"))  # tmp_path is not open to others
    site: Site | None = None
    try:
        root.chmod(0o755)
        for name in groups.values():
            run("groupadd", "--system", name)
            made_groups.append(name)
        for role, name in users.items():
            extra = {"admin": [groups["admin"]], "uploader": [groups["upload"]], "outsider": []}[role]
            argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--no-user-group"]
            argv += ["--gid", "users"] + (["--groups", ",".join(extra)] if extra else [])
            run(*argv, name)
            made_users.append(name)
        admin_gid, upload_gid = (grp.getgrnam(groups[g]).gr_gid for g in ("admin", "upload"))

        # The folders, with the owners and modes the shipped tmpfiles entries give them
        (root / "etc").mkdir()
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text(
            f"root:x:0:\ndropgate-admin:x:{admin_gid}:\ndropgate-upload:x:{upload_gid}:\n"
        )
        run(tmpfiles, f"--root={root}", "--create", str(TMPFILES))
        # The configuration, as install.sh installs it
        config_dir = root / "etc" / "dropgate"
        (config_dir / "keys").mkdir(parents=True)
        for folder in (config_dir, config_dir / "keys"):
            os.chown(folder, 0, admin_gid)
            folder.chmod(0o750)
        # The platform, world-readable as a web application's releases are
        platform, data = root / "opt" / "gts", root / "var" / "lib" / "gts"
        (platform / "releases" / "1.0.0").mkdir(parents=True)
        (platform / "releases" / "1.0.0" / "VERSION").write_text("1.0.0\n")
        os.symlink("releases/1.0.0", platform / "current")
        data.mkdir(parents=True)
        (data / "records.txt").write_text("patient records\n")

        site = Site(root / "vendor")  # the vendor's side (keys, pack) and the daemon's driver
        _, public = site.keypair()
        shutil.copyfile(public, config_dir / "keys" / "vendor.pub")
        site.inbox = root / "var" / "lib" / "dropgate" / "inbox"
        site.state = root / "var" / "lib" / "dropgate" / "state"
        site.backups = root / "var" / "backups" / "dropgate"
        site.platform, site.data = platform, data
        site.config_path = config_dir / "dropgate.yaml"
        site.config = {
            "paths": {"inbox": str(site.inbox), "state": str(site.state), "backups": str(site.backups)},
            "platform": {"product": "gts", "root": str(platform), "data": [str(data)]},
            "trust": {"keys": [str(config_dir / "keys" / "vendor.pub")]},
            "inbox": {"settle_seconds": 0.3, "rescan_seconds": 2},
            "prereq": site.config["prereq"],
            "maintenance": {"flag_file": str(root / "run" / "dropgate" / "maintenance")},
            "metrics": {"listen": f"127.0.0.1:{site.port}"},
            "control": {"admin_group": groups["admin"]},
        }
        site.write_config()
        os.chown(site.config_path, 0, admin_gid)
        site.config_path.chmod(0o640)
        yield Layout(root, site, python, users["admin"], users["uploader"], users["outsider"], groups["admin"])
    finally:
        if site is not None:
            for daemon in site.daemons:
                if daemon.alive():
                    daemon.stop()
        for name in made_users:
            subprocess.run(["userdel", name], capture_output=True, timeout=60)
        for name in made_groups:
            subprocess.run(["groupdel", name], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def an_update_and_an_upload_in_progress(layout: Layout) -> None:
    """Run 1 succeeded; a second archive sits in the inbox, half uploaded (only the upload group sees it)."""
    site = layout.site
    site.drop(site.pack("1.0.1"))
    assert site.wait_outcome(1)["outcome"] == "succeeded"
    archive = site.pack("1.0.2").read_bytes()
    (site.inbox / "gts.1.0.2.tgz").write_bytes(archive[: len(archive) // 2])
    wait_for(lambda: site.status()["uploading"], what="root's status to see the upload in progress")


@pytest.mark.parametrize("daemon_state", ["running", "stopped", "killed"])
def test_an_admin_outside_the_upload_group_reads_status_history_and_show(layout: Layout, daemon_state: str) -> None:
    # Given the production layout, a daemon run by root, one finished update and an upload in progress
    site = layout.site
    daemon = site.start_daemon()
    an_update_and_an_upload_in_progress(layout)
    if daemon_state == "stopped":
        daemon.stop()
    elif daemon_state == "killed":
        daemon.kill()  # its journal's -wal and -shm files stay behind
    # When an admin who is not in the upload group reads status, history and show (text and JSON)
    results = {
        args: layout.as_user(layout.admin, *args)
        for args in (
            ("status",), ("status", "--json"), ("history",), ("history", "--json"),
            ("show", "1", "--log"), ("show", "1", "--json", "--log"),
        )
    }
    # Then every one works, without a traceback
    for args, result in results.items():
        assert result.returncode == 0, f"{args}: {result.stderr}"
        assert "Traceback" not in result.stderr
    status = json.loads(results[("status", "--json")].stdout)
    assert status["gate"] == "idle"
    assert status["run"]["id"] == 1 and status["run"]["outcome"] == "succeeded"
    assert status["installed_version"] == "1.0.1"
    assert status["daemon"]["running"] is (daemon_state == "running")
    if daemon_state == "running":
        assert status["daemon"]["responding"] is True  # the heartbeat is readable for the admin group
    # and the inbox, which only the upload group may list, is reported as not readable, not as empty
    assert status["uploading"] == []
    assert status["unreadable"] == [{"what": "inbox", "path": str(site.inbox), "error": "permission denied"}]
    assert f"not shown: inbox {site.inbox}: permission denied for this user" in results[("status",)].stdout
    assert json.loads(results[("history", "--json")].stdout)[0]["id"] == 1
    shown = json.loads(results[("show", "1", "--json", "--log")].stdout)
    assert shown["outcome"] == "succeeded" and shown["log"]
    assert "outcome: succeeded" in results[("show", "1", "--log")].stdout
    # while root sees the upload in progress
    assert site.status()["uploading"][0]["name"] == "gts.1.0.2.tgz"


def test_an_admin_reads_status_before_any_daemon_validated_the_configuration(layout: Layout) -> None:
    # Given a configuration no daemon has validated yet (no record in the state folder), on a site
    # whose journal exists (without one, status exits 5: the gate's state is unknown)
    assert not (layout.site.state / "config.checked.json").exists()
    journal = layout.site.state / "journal.db"
    Journal(journal).close()
    os.chown(journal, 0, grp.getgrnam(layout.admin_group).gr_gid)
    journal.chmod(0o640)
    # When the admin asks for the status, Then the whole configuration is validated for it, and it works
    result = layout.as_user(layout.admin, "status", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["daemon"]["running"] is False
    # (the admin may not write the state folder: no record was left)
    assert not (layout.site.state / "config.checked.json").exists()


@pytest.mark.parametrize("who", ["uploader", "outsider"])
@pytest.mark.parametrize(
    "args", [("status",), ("history", "--json"), ("show", "1"), ("approve", "1"), ("resolve", "1", "--note", "x")]
)
def test_a_user_outside_the_admin_group_is_not_allowed_exit_4(layout: Layout, who: str, args: tuple[str, ...]) -> None:
    # Given a running daemon on the production layout
    layout.site.start_daemon()
    # When a user outside the admin group runs a command
    result = layout.as_user(getattr(layout, who), *args)
    # Then it is refused in one line, as not allowed (exit 4), naming what it may not read
    assert result.returncode == 4, result.stdout + result.stderr
    line = one_line_error(result)
    assert line.startswith("dropgate: not allowed: cannot read the configuration ")
    assert "permission denied" in line


def test_with_a_readable_configuration_the_state_folder_and_the_socket_still_say_not_allowed(layout: Layout) -> None:
    # Given a copy of the configuration anyone may read (the state folder keeps its modes)
    site = layout.site
    site.start_daemon()
    public = layout.root / "public.yaml"
    shutil.copyfile(site.config_path, public)
    public.chmod(0o644)
    # When a user outside the admin group reads the status or sends a command
    status = layout.as_user(layout.outsider, "status", config=public)
    approve = layout.as_user(layout.outsider, "approve", "1", config=public)
    # Then both are not allowed (exit 4), each in one line naming the folder or the socket
    assert status.returncode == 4, status.stderr
    assert f"cannot read the state folder {site.state}: permission denied" in one_line_error(status)
    assert approve.returncode == 4, approve.stderr
    assert f"no permission to use {site.state / 'control.sock'}" in one_line_error(approve)


def test_the_daemon_refuses_a_peer_outside_the_admin_group_even_through_a_misconfigured_socket(
    layout: Layout,
) -> None:
    # Given a run waiting for approval, and an admin who may approve it
    site = layout.site
    site.write_config(policy={"require_approval": True})
    site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    # And a layout someone loosened: the configuration, the state folder and the socket open to all
    public = layout.root / "public.yaml"
    shutil.copyfile(site.config_path, public)
    public.chmod(0o644)
    site.state.chmod(0o2751)
    (site.state / "control.sock").chmod(0o666)
    # When a user outside the admin group sends approve
    refused = layout.as_user(layout.outsider, "approve", "1", config=public)
    # Then the daemon checks the peer's groups itself and refuses: not allowed, exit 4, nothing done
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert f"may not control dropgate (need root or group {layout.admin_group})" in one_line_error(refused)
    assert site.run(1)["step"] == "approval"  # type: ignore[index]
    # When the admin approves, Then it goes through
    approved = layout.as_user(layout.admin, "approve", "1")
    assert approved.returncode == 0, approved.stderr
    assert site.wait_outcome(1)["outcome"] == "succeeded"
