"""Uploading over SFTP, end to end: a real sshd with the shipped drop-in, the real sftp client, the real daemon.

The sshd here runs on a loopback port with its own host key and a config made
of a small test header plus deploy/sshd/dropgate-inbox.conf, with two changes
to the drop-in only: the Match names the group `root` (the test logs in as
root, by key, instead of creating a system user in dropgate-upload on the
machine running the tests) and ChrootDirectory names this test's chroot. The
header allows what a production sshd must not and a throwaway one needs:
root login by key, `StrictModes no` (the keys live under /tmp, mode 1777,
which StrictModes refuses) and no PAM.

sshd refuses a chroot that is not root-owned and closed to others at every
level, which rules out anything under /tmp; so the chroot, holding the inbox
and the state folder (one filesystem, as in production), is a fresh folder
under /run (or /var/lib), removed at the end.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.archive_helpers import ArchiveSite
from tests.conftest import ROOT, Site, cannot_run, free_port, wait_for
from tests.integration.test_strict_format import CASES, DAEMON_SAMPLE
from tests.integration.test_strict_format import NAME as STRICT_NAME
from tests.servers import make_ssh_keys, sbin_tool, start_sshd, stop_process, throwaway_sshd_config

DROP_IN = ROOT / "deploy" / "sshd" / "dropgate-inbox.conf"
PAYLOAD_BYTES = 3 * 2**20  # incompressible: the archive is as long, so half of it is a real partial upload


def closed_to_others(path: Path) -> bool:
    """What sshd demands of a chroot and every folder above it: owned by root, writable by no one else."""
    for folder in (path, *path.parents):
        info = folder.stat()
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
    return True


@pytest.fixture
def chroot() -> Iterator[Path]:
    if os.geteuid() != 0:
        cannot_run("sshd with a chroot needs root")
    base = next((Path(p) for p in ("/run", "/var/lib", "/srv") if Path(p).is_dir() and closed_to_others(Path(p))), None)
    if base is None:
        pytest.fail("no root-only folder for an sshd chroot (tried /run, /var/lib, /srv)")
    folder = Path(tempfile.mkdtemp(prefix="dropgate-sftp-", dir=base))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sftp_site(site: Site, chroot: Path) -> Iterator[Site]:
    """The sandbox site with its inbox and state folder inside the chroot, laid out as in production."""
    inbox, state = chroot / "inbox", chroot / "state"
    inbox.mkdir(mode=0o3770)
    state.mkdir(mode=0o2750)
    site.inbox, site.state = inbox, state
    site.write_config(paths={"inbox": str(inbox), "state": str(state)})
    yield site
    for daemon in site.daemons:  # before the chroot, and the state folder in it, is removed
        daemon.stop()


class Sshd:
    def __init__(self, folder: Path, chroot: Path, *, allow_links: bool = False) -> None:
        self.folder = folder
        self.port = free_port()
        keys = make_ssh_keys(folder, self.port)
        self.host_key, self.user_key, self.known_hosts = keys.host_key, keys.user_key, keys.known_hosts

        drop_in = DROP_IN.read_text()
        assert "Match Group dropgate-upload\n" in drop_in
        assert "ChrootDirectory /var/lib/dropgate\n" in drop_in
        drop_in = drop_in.replace("Match Group dropgate-upload\n", "Match Group root\n")
        drop_in = drop_in.replace("ChrootDirectory /var/lib/dropgate\n", f"ChrootDirectory {chroot}\n")
        if allow_links:  # a site that relaxed the drop-in: dropgate itself must still hold
            assert " -P symlink,hardlink " in drop_in
            drop_in = drop_in.replace(" -P symlink,hardlink ", " ")
        self.config = folder / "sshd_config"
        self.config.write_text(throwaway_sshd_config(self.port, keys) + drop_in)
        self.log_path = folder / "sshd.log"
        self.proc = start_sshd(self.config, self.port, self.log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def client_options(self) -> list[str]:
        return [
            "-F", "/dev/null",
            "-i", str(self.user_key),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
        ]

    def sftp(self, *commands: str) -> subprocess.CompletedProcess[str]:
        """Run `sftp -b` with these commands, as an uploader would from a script."""
        batch = self.folder / "batch"
        batch.write_text("\n".join(commands) + "\n")
        return subprocess.run(
            [sbin_tool("sftp"), "-b", str(batch), "-P", str(self.port), *self.client_options(), "root@127.0.0.1"],
            capture_output=True, text=True, timeout=120,
        )

    def ssh(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sbin_tool("ssh"), "-p", str(self.port), *self.client_options(), "root@127.0.0.1", *command],
            capture_output=True, text=True, timeout=60,
        )

    def stop(self) -> None:
        stop_process(self.proc, grace=20)


@pytest.fixture
def sshd(tmp_path: Path, chroot: Path) -> Iterator[Sshd]:
    folder = tmp_path / "sshd"
    folder.mkdir()
    server = Sshd(folder, chroot)
    try:
        yield server
    finally:
        server.stop()


def signed_archive(site: Site, version: str) -> Path:
    return site.pack(version, files={"data/blob.bin": os.urandom(PAYLOAD_BYTES)})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_archive_uploaded_with_sftp_is_taken_and_installed(sftp_site: Site, sshd: Sshd) -> None:
    site = sftp_site
    # Given a running daemon and a signed archive on the uploader's machine
    site.start_daemon()
    archive = signed_archive(site, "1.0.1")
    # When the uploader puts it with sftp, into the folder the session starts in
    result = sshd.sftp("pwd", f"put {archive} {archive.name}")
    # Then the session was chrooted and started in the inbox
    assert result.returncode == 0, result.stderr + sshd.log()
    assert "Remote working directory: /inbox" in result.stdout
    # and the archive became run 1, which installed it
    run = site.wait_outcome(1, timeout=120)
    assert run["outcome"] == "succeeded", run
    assert run["archive"] == archive.name
    assert run["sha256"] == sha256(archive)
    assert site.status()["installed_version"] == "1.0.1"
    assert list(site.inbox.iterdir()) == []


def test_the_upload_account_gets_no_shell(sftp_site: Site, sshd: Sshd) -> None:
    # When the uploader tries to run a command over ssh
    result = sshd.ssh("cat", "/etc/hostname")
    # Then sshd refuses: the drop-in forces internal-sftp
    assert result.returncode != 0
    assert "sftp connections only" in result.stdout + result.stderr


def test_a_cut_upload_is_left_alone_shown_as_uploading_then_resumed_with_reput_and_taken_once(
    sftp_site: Site, sshd: Sshd
) -> None:
    site = sftp_site
    # Given a running daemon and a signed archive
    site.start_daemon()
    archive = signed_archive(site, "1.0.1")
    total = archive.stat().st_size
    half = total // 2
    cut = site.root / "cut" / archive.name
    cut.parent.mkdir()
    cut.write_bytes(archive.read_bytes()[:half])
    # When only its first half arrives, under the final name (the connection dropped)
    result = sshd.sftp(f"put {cut} {archive.name}")
    assert result.returncode == 0, result.stderr + sshd.log()
    # Then the daemon sees an upload in progress: N of M bytes, in the metrics and in `status`
    wait_for(
        lambda: site.metric("dropgate_inbox_uploading_bytes", f'file="{archive.name}"') == half,
        timeout=60, what="the daemon to report the upload in progress",
    )
    assert site.metric("dropgate_inbox_uploading_total_bytes", f'file="{archive.name}"') == total
    status = site.status()
    assert status["uploading"] == [{"name": archive.name, "bytes": half, "total": total}]
    assert f"uploading: {archive.name} {half} of {total} bytes" in site.cli("status").stdout
    # and leaves it where it is: no run, nothing queued, the gate idle
    assert site.history() == []
    assert status["queued"] == []
    assert status["gate"] == "idle"
    assert (site.inbox / archive.name).stat().st_size == half

    # When the uploader resumes with reput
    result = sshd.sftp(f"reput {archive} {archive.name}")
    assert result.returncode == 0, result.stderr + sshd.log()
    # Then the whole archive is taken, once, and installed
    run = site.wait_outcome(1, timeout=120)
    assert run["outcome"] == "succeeded", run
    assert run["sha256"] == sha256(archive)
    assert [r["id"] for r in site.history()] == [1]
    assert list(site.inbox.iterdir()) == []
    assert site.status()["uploading"] == []
    assert site.metric("dropgate_inbox_uploading_bytes", f'file="{archive.name}"') is None


def test_a_flood_of_200_sftp_uploads_in_a_storm_of_ignored_files_all_become_runs_in_version_order(
    sftp_site: Site, sshd: Sshd
) -> None:
    from tests.e2e.test_inbox_order import approve_until_finished, build_archives, upload_order

    site = sftp_site
    # Given a daemon that only looks at the inbox by events (the periodic rescan is an hour away)
    # and waits for approval before each run, so that uploads wait together in the queue
    site.write_config(inbox={"rescan_seconds": 3600}, policy={"require_approval": True})
    versions = [f"1.0.{number}" for number in range(1, 31)]
    archives = build_archives(site, versions)
    junk = site.root / "junk"
    junk.mkdir()
    for number in range(170):
        (junk / f"other-{number:03d}.bin").write_bytes(b"not an archive %d" % number)
    storm = site.root / "storm.bin"
    storm.write_bytes(b"ignored")
    site.start_daemon()
    # When one archive holds the runner in approval
    result = sshd.sftp(f"put {archives[versions[0]]} gts.{versions[0]}.tgz")
    assert result.returncode == 0, result.stderr + sshd.log()
    site.wait_step(1, "approval", timeout=120)
    # and 199 more files are uploaded in one sftp session: archives in increasing versions, shuffled
    # within groups of five that complete together, among junk, with ignored files between them
    uploads = [(archives[v], f"gts.{v}.tgz") for v in upload_order(versions[1:], group=5, seed=11)]
    uploads += [(path, path.name) for path in sorted(junk.iterdir())]
    random.Random(3).shuffle(uploads)
    commands = []
    for number, (path, name) in enumerate(uploads):
        commands += [f"put {storm} .hidden-{number}", f"put {storm} {name}.part-{number}.part", f"put {path} {name}"]
    result = sshd.sftp(*commands)
    assert result.returncode == 0, result.stderr[-2000:] + sshd.log()
    # Then every one of the 200 becomes a run well before any rescan
    wait_for(lambda: len(site.history()) == 200, timeout=120, what="200 runs from events alone")
    # and, approved one by one, every archive installs: none is refused as a downgrade
    runs = approve_until_finished(site, 200, timeout=900)
    archives_run = sorted(
        (run for run in runs if str(run["archive"]).startswith("gts.")), key=lambda run: float(str(run["started"]))
    )
    assert [run["outcome"] for run in archives_run] == ["succeeded"] * 30, [r["error"] for r in archives_run]
    assert [run["archive"] for run in archives_run] == [f"gts.{version}.tgz" for version in versions]
    assert site.status()["installed_version"] == "1.0.30"
    # and the ignored files are still where they were uploaded, untouched
    left = sorted(path.name for path in site.inbox.iterdir())
    assert len(left) == 2 * len(uploads) and all(name.startswith(".hidden-") or name.endswith(".part") for name in left)


@pytest.fixture
def relaxed_sshd(tmp_path: Path, chroot: Path) -> Iterator[Sshd]:
    folder = tmp_path / "sshd-relaxed"
    folder.mkdir()
    server = Sshd(folder, chroot, allow_links=True)
    try:
        yield server
    finally:
        server.stop()


def test_the_shipped_drop_in_refuses_links_over_sftp(sftp_site: Site, sshd: Sshd) -> None:
    junk = sftp_site.root / "junk.bin"
    junk.write_bytes(b"x")
    result = sshd.sftp(f"put {junk} a.part", "-symlink /dev/zero gts.1.0.1.tgz", "-ln a.part gts.1.0.2.tgz")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in sftp_site.inbox.iterdir()) == ["a.part"]


def test_links_made_over_a_relaxed_sftp_are_refused_or_copied_and_rewriting_a_second_name_changes_nothing(
    sftp_site: Site, relaxed_sshd: Sshd
) -> None:
    site = sftp_site
    site.start_daemon()
    # A symbolic link to a device, made by the uploader over sftp
    result = relaxed_sshd.sftp("symlink /dev/zero gts.1.0.9.tgz")
    assert result.returncode == 0, result.stderr + relaxed_sshd.log()
    link_run = site.wait_outcome(1, timeout=60)
    assert link_run["error"] == "gts.1.0.9.tgz is a symbolic link to /dev/zero; only regular files are taken"
    assert Path(str(link_run["path"])).is_symlink()
    # A signed archive uploaded under an ignored name, then hard-linked to its real name
    archive = signed_archive(site, "1.0.1")
    evil = site.root / "evil.bin"
    evil.write_bytes(b"EVIL" * 1000)
    result = relaxed_sshd.sftp(f"put {archive} keep.part", f"ln keep.part {archive.name}")
    assert result.returncode == 0, result.stderr + relaxed_sshd.log()
    wait_for(lambda: len(site.history()) == 2, timeout=60, what="the hard-linked archive to be taken")
    # and rewritten through the name the uploader kept, after the take
    result = relaxed_sshd.sftp(f"put {evil} keep.part")
    assert result.returncode == 0, result.stderr
    assert (site.inbox / "keep.part").read_bytes() == evil.read_bytes()
    # Then the run installs the bytes that were uploaded, which it hashed and copied
    run = site.wait_outcome(2, timeout=120)
    assert run["outcome"] == "succeeded", run
    assert run["sha256"] == sha256(archive)
    assert site.status()["installed_version"] == "1.0.1"


def test_hostile_archives_signed_by_a_trusted_key_and_uploaded_with_sftp_are_refused_each_in_one_line(
    sftp_site: Site, sshd: Sshd, tmp_path: Path
) -> None:
    site = sftp_site
    # Given a running daemon that trusts a vendor key the attacker holds as well as its own
    forger = ArchiveSite(tmp_path / "forger")
    site.write_config(trust={"keys": [str(site.keypair()[1]), str(forger.public_key)]})
    daemon = site.start_daemon()
    # When the attacker uploads a signed sample of every class of malformed archive with sftp, one after another
    for run_id, case in enumerate(DAEMON_SAMPLE, start=1):
        archive = CASES[case].build(forger)
        result = sshd.sftp(f"put {archive} {STRICT_NAME}")
        assert result.returncode == 0, result.stderr + sshd.log()
        run = site.wait_outcome(run_id, timeout=120)
        # Then each is rejected with its own one-line reason, and kept aside with it
        assert run["outcome"] == "rejected", (case, run)
        assert CASES[case].expect in run["error"] and "\n" not in run["error"], (case, run["error"])
        kept = site.state / "rejected" / f"{run_id}-{STRICT_NAME}"
        assert kept.read_bytes() == archive.read_bytes(), case
    # and nothing was installed or left behind, and a good upload after them installs
    assert sorted(path.name for path in (site.platform / "releases").iterdir()) == ["1.0.0"]
    good = signed_archive(site, "1.0.1")
    assert sshd.sftp(f"put {good} {good.name}").returncode == 0
    run = site.wait_outcome(len(DAEMON_SAMPLE) + 1, timeout=120)
    assert run["outcome"] == "succeeded", run
    assert "Traceback" not in daemon.output()
