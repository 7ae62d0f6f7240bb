"""The snapshot engine (pipeline/snapshot/) under SIGKILL, on data of every kind.

Data: a file above 64 MiB (copied with the second hashing thread), hard links
(inside a folder and across folders), symbolic links (one dangling), empty
files, a folder with its own mode, a thousand small files. The daemon is
killed (strace, as in test_killed_inside_commands.py) as the backup creates
its copy of the big file, and as a rollback creates its first restored file;
after each restart the snapshot left half-written is never used, and the
operator's rollback gives back the data byte for byte with its hard links.
A second SIGTERM during the restore of a huge file stops it between two pieces
of the copy (not after the whole file), and the run is `interrupted`, not failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil

from tests.conftest import Site, require_tool, wait_for
from tests.e2e.test_killed_inside_commands import killed_when_opening
from tests.support import tree_digest

BIG = 72 * 2**20


def populate(data: Path) -> None:
    with open(data / "big.bin", "wb") as handle:
        for _ in range(BIG // 2**20):
            handle.write(os.urandom(2**20))
    (data / "empty").write_bytes(b"")
    (data / "many").mkdir()
    for number in range(1000):
        (data / "many" / f"f{number:04d}").write_bytes(os.urandom(number % 700))
    os.link(data / "big.bin", data / "many" / "big-again.bin")
    os.link(data / "many" / "f0001", data / "f0001-again")
    (data / "latest").symlink_to("many/f0002")
    (data / "dangling").symlink_to("nowhere")
    (data / "private").mkdir(mode=0o750)
    (data / "private" / "key").write_text("secret\n")


def same_inode(a: Path, b: Path) -> bool:
    return a.stat().st_ino == b.stat().st_ino


def test_killed_in_the_backup_then_in_the_restore_the_rollback_still_gives_the_data_back(site: Site) -> None:
    data = site.data
    populate(data)
    site.write_config(policy={"timeouts": {"backup": "10m", "apply": "5m", "rollback": "10m"}})
    before = tree_digest(data)
    # Given a daemon killed while its backup copies the data (the snapshot half-written)
    daemon = site.start_daemon()
    with killed_when_opening(daemon, str(site.backups / ".1.partial" / "data" / "data" / "big.bin")):
        site.drop(site.pack("1.0.1"))
    daemon = site.start_daemon()
    assert site.wait_outcome(1)["outcome"] == "interrupted"
    assert not (site.backups / "1").exists()  # a half-written snapshot is never made complete
    assert site.cli("resolve", "1", "--note", "nothing was changed").returncode == 0
    # When an update damages the data, fails, and the daemon is killed during the automatic restore
    migration = (
        f'#!/bin/sh\ndd if=/dev/zero of="{data}/big.bin" bs=1M count=1 seek=7 conv=notrunc 2>/dev/null\n'
        f'rm -rf "{data}/many/f0005" "{data}/latest" "{data}/empty"\necho new > "{data}/added"\n'
        f'chmod 0777 "{data}/private"\nexit 1\n'
    )
    with killed_when_opening(daemon, str(data / f".dropgate-restore-{daemon.pid}")):
        site.drop(site.pack("1.0.2", files={"migrations/001.sh": migration}, migrations=["migrations/001.sh"]))
    site.start_daemon()
    run = site.wait_outcome(2)
    assert run["outcome"] == "interrupted" and "the daemon stopped during rollback" in run["error"]
    # Then the operator's rollback restores every byte, mode, link and hard link, and leaves no temporary file
    result = site.cli("rollback", "2")
    assert result.returncode == 0, result.stderr
    assert tree_digest(data) == before
    assert same_inode(data / "big.bin", data / "many" / "big-again.bin")
    assert same_inode(data / "many" / "f0001", data / "f0001-again")
    assert not [name for name in os.listdir(data) if name.startswith(".dropgate-restore-")]
    assert os.readlink(site.platform / "current") == "releases/1.0.0"
    # and the next update backs up again from a complete snapshot, sharing what did not change
    assert site.cli("resolve", "2", "--note", "restored").returncode == 0
    site.drop(site.pack("1.0.3"))
    assert site.wait_outcome(3, timeout=300)["outcome"] == "succeeded"
    assert not [name for name in os.listdir(site.backups) if name.endswith(".partial")]
    listing = site.cli("backups").stdout
    assert "yes," in listing.splitlines()[1], listing  # the newest snapshot verified


def test_a_second_sigterm_stops_a_restore_in_the_middle_of_a_huge_file(site: Site) -> None:
    # Given a 1 GiB file (sparse: the disk is spared) that an update changes before failing
    data = site.data
    with open(data / "huge.bin", "wb") as handle:
        handle.truncate(2**30)
        handle.write(b"the start of a large database file")
    (data / "after.txt").write_text("restored after the huge file\n")
    before = tree_digest(data)
    migration = f'#!/bin/sh\necho changed >> "{data}/huge.bin"\nexit 1\n'
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1", files={"migrations/001.sh": migration}, migrations=["migrations/001.sh"]))
    site.wait_step(1, "rollback", timeout=120)
    # When each piece of its copy back takes seconds (a slow disk: strace delays every copy_file_range)
    # and the operator sends SIGTERM twice while it is being restored
    strace = require_tool("strace")
    tracer = subprocess.Popen(
        [strace, "-f", "-p", str(daemon.pid), "-o", "/dev/null", "-e", "trace=copy_file_range",
         "-e", "inject=copy_file_range:delay_enter=3000000"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert tracer.stderr is not None and "attached" in tracer.stderr.readline()
        temporary = data / f".dropgate-restore-{daemon.pid}"
        wait_for(temporary.exists, timeout=120, interval=0.01, what="the restore of the huge file")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping at a safe point" in daemon.output(), what="the first SIGTERM to be taken")
        daemon.proc.send_signal(signal.SIGTERM)
        # Then the daemon stops within a few pieces (not after the whole gigabyte), leaving no stray copy
        assert daemon.stop(timeout=20) == 0, daemon.output()[-2000:]
    finally:
        tracer.kill()
        tracer.wait(timeout=30)
    assert not temporary.exists()
    # and the run is interrupted in its rollback; a new daemon's rollback restores everything
    site.start_daemon()
    run = site.wait_outcome(1)
    assert run["outcome"] == "interrupted", run["error"]  # stopped, not failed: no "restore by hand"
    assert "ROLLBACK INTERRUPTED: rollback was stopped: aborted by a second SIGTERM" in run["error"]
    assert "run `dropgate rollback 1` again" in run["error"] and "by hand" not in run["error"]
    result = site.cli("rollback", "1", timeout=300)
    assert result.returncode == 0, result.stderr
    assert tree_digest(data) == before


def link_helpers(pid: int) -> list[psutil.Process]:
    """The snapshot link helpers (pipeline/snapshot/linker.py) the daemon `pid` started."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    return [child for child in children if {"-I", "-S"} <= set(child.cmdline())]


def test_a_daemon_killed_while_its_link_helper_links_takes_the_helper_along(site: Site) -> None:
    # Given 3,000 files (a later snapshot links them through a helper process) and a first snapshot of them
    data = site.data
    for number in range(3000):
        folder = data / f"d{number % 30:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"f{number:04d}").write_bytes(b"x" * (number % 50))
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    assert site.wait_outcome(1, timeout=300)["outcome"] == "succeeded"
    # When the next backup's helper links them, each link slowed to 20 ms (strace follows the helper),
    # and the daemon is killed once a hundred are made
    strace = require_tool("strace")
    tracer = subprocess.Popen(
        [strace, "-f", "-p", str(daemon.pid), "-o", "/dev/null", "-e", "trace=linkat",
         "-e", "inject=linkat:delay_enter=20000"],
        stderr=subprocess.PIPE, text=True,
    )
    partial = site.backups / ".2.partial" / "data" / "data"
    try:
        assert tracer.stderr is not None and "attached" in tracer.stderr.readline()
        site.drop(site.pack("1.0.2"))
        helper = wait_for(lambda: next(iter(link_helpers(daemon.pid)), None), timeout=120, what="the link helper")
        wait_for(lambda: len(list(partial.glob("d*/f*"))) > 100, timeout=120, what="a hundred links")
        daemon.kill()
        # Then the helper dies with the daemon, at once (it does not link the rest into the partial snapshot)
        wait_for(
            lambda: not helper.is_running() or helper.status() == psutil.STATUS_ZOMBIE,
            timeout=10, what="the helper to die with the daemon",
        )
    finally:
        tracer.kill()
        tracer.wait(timeout=30)
    # and after a restart the run is interrupted, the half-made snapshot is never used, and the next one shares
    site.start_daemon()
    assert site.wait_outcome(2)["outcome"] == "interrupted"
    assert not (site.backups / "2").exists()
    assert site.cli("resolve", "2", "--note", "nothing was changed").returncode == 0
    site.drop(site.pack("1.0.3"))
    assert site.wait_outcome(3, timeout=300)["outcome"] == "succeeded"
    assert not [name for name in os.listdir(site.backups) if name.endswith(".partial")]
    summary = json.loads((site.backups / "3" / "snapshot.json").read_text())
    assert summary["shared_files"] >= 3000, summary
    assert site.cli("backups", "verify", "3").returncode == 0
