"""What the inbox notices without its periodic rescan, and in which order runs start.

`inbox.rescan_seconds` is set to an hour here, so anything taken within the
deadlines below was found through filesystem events or the folder's own
change time, not the rescan.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

from pipeline.archive import pack, write_build_dir
from tests.conftest import Site, wait_for

NO_RESCAN = {"rescan_seconds": 3600}


def build_archives(site: Site, versions: list[str]) -> dict[str, Path]:
    """Signed archives gts.<version>.tgz (the real `pack`, in this process to keep the test short)."""
    private, _ = site.keypair()
    built = {}
    for version in versions:
        manifest = {"product": "gts", "version": version, "channel": "stable", "min_version": "1.0.0"}
        source = write_build_dir(site.root / "build" / version, manifest, {"VERSION": f"{version}\n"})
        built[version] = pack(source, private, site.root / "build" / f"gts.{version}.tgz")
    return built


def upload_order(versions: list[str], group: int, seed: int) -> list[str]:
    """Increasing versions, shuffled within each group of `group` (uploads that complete together)."""
    rng = random.Random(seed)
    order: list[str] = []
    for start in range(0, len(versions), group):
        chunk = versions[start : start + group]
        rng.shuffle(chunk)
        order += chunk
    return order


def approve_until_finished(site: Site, count: int, timeout: float) -> list[dict[str, object]]:
    """Approve every run that waits for it, until `count` runs have an outcome."""

    def finished() -> list[dict[str, object]] | None:
        runs = site.history()
        for run in runs:
            if run["step"] == "approval" and not run["outcome"]:
                site.cli("approve", str(run["id"]))
        return runs if len(runs) >= count and all(run["outcome"] for run in runs) else None

    return list(wait_for(finished, timeout=timeout, what=f"{count} runs to finish", interval=0.2))


def test_a_file_moved_in_a_folder_a_link_and_a_hard_link_are_picked_up_without_the_rescan(site: Site) -> None:
    site.write_config(inbox=NO_RESCAN)
    site.start_daemon()
    outside = site.root / "staging"
    outside.mkdir()
    # a file an operator moves in by hand from another folder of the same filesystem
    (outside / "moved.bin").write_bytes(b"moved in with mv")
    os.rename(outside / "moved.bin", site.inbox / "moved.bin")
    assert site.wait_outcome(1, timeout=15)["archive"] == "moved.bin"
    # a folder
    (site.inbox / "folder.tgz").mkdir()
    assert site.wait_outcome(2, timeout=15)["error"] == "folder.tgz is a folder; only regular files are taken"
    # a symbolic link
    os.symlink("/etc/hostname", site.inbox / "link.tgz")
    assert "link.tgz is a symbolic link to /etc/hostname" in str(site.wait_outcome(3, timeout=15)["error"])
    # a hard link made into the inbox
    (outside / "linked.bin").write_bytes(b"hard linked in")
    os.link(outside / "linked.bin", site.inbox / "linked.bin")
    assert site.wait_outcome(4, timeout=15)["archive"] == "linked.bin"


def test_archives_waiting_together_start_in_version_order_never_text_order(site: Site) -> None:
    # Given a daemon that waits for approval before each run (so uploads wait together in the queue)
    site.write_config(inbox=NO_RESCAN, policy={"require_approval": True})
    versions = [f"1.0.{number}" for number in range(1, 13)]  # 1.0.9 < 1.0.10 < 1.0.11: text order says otherwise
    archives = build_archives(site, versions)
    site.start_daemon()
    # When a first one holds the runner in approval and the others are dropped meanwhile, shuffled
    site.drop(archives[versions[0]])
    site.wait_step(1, "approval")
    for version in upload_order(versions[1:], group=len(versions), seed=7):
        site.drop(archives[version])
    runs = approve_until_finished(site, len(versions), timeout=240)
    # Then every one is installed, in version order, none refused as a downgrade
    started = sorted(runs, key=lambda run: float(str(run["started"])))
    assert [run["outcome"] for run in started] == ["succeeded"] * len(versions), [r["error"] for r in started]
    assert [run["archive"] for run in started] == [f"gts.{version}.tgz" for version in versions]
    assert site.status()["installed_version"] == "1.0.12"


def test_after_an_inotify_queue_overflow_the_inbox_is_listed_again_at_once(site: Site) -> None:
    # Given a running daemon that will not rescan on its own for an hour
    site.write_config(inbox=NO_RESCAN)
    daemon = site.start_daemon()
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    # When the daemon cannot read its events for a moment (stopped) while far more than the
    # kernel's queue holds happen in the inbox, among them a file moved in
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        for number in range(limit // 2 + 100):  # two events each (create, delete): past the queue's limit
            ignored = site.inbox / f".storm-{number}"
            ignored.touch()
            ignored.unlink()
        (site.root / "moved.bin").write_bytes(b"moved in during the storm")
        os.rename(site.root / "moved.bin", site.inbox / "moved.bin")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    # Then the daemon says it lost events and listed the inbox again, and the file becomes a run
    run = site.wait_outcome(1, timeout=30)
    assert run["archive"] == "moved.bin"
    assert "filesystem events were lost (queue overflow): listing the inbox again" in daemon.output()
