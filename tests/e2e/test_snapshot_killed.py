"""The snapshot engine (pipeline/snapshot/) under SIGKILL, on data of every kind.

Data: a file above 64 MiB (copied with the second hashing thread), hard links
(inside a folder and across folders), symbolic links (one dangling), empty
files, a folder with its own mode, a thousand small files. The daemon is
killed (strace, as in test_killed_inside_commands.py) as the backup creates
its copy of the big file, and as a rollback creates its first restored file;
after each restart the snapshot left half-written is never used, and the
operator's rollback gives back the data byte for byte with its hard links.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import Site
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
