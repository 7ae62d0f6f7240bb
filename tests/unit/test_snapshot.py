"""The snapshot engine on real trees under tmp_path: sharing, verification, restore, space, pruning."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from pipeline import snapshot
from pipeline.errors import NoSpace, SnapshotError, StepAborted
from pipeline.snapshot import (
    Space,
    estimate_snapshot,
    latest_snapshot,
    list_snapshots,
    prune_snapshots,
    read_manifest,
    restore_snapshot,
    take_snapshot,
    verify_snapshot,
)
from tests.conftest import cannot_run
from tests.support import tree_digest


def make_tree(root: Path) -> None:
    """A small platform data folder: nested folders, modes, a symlink, an empty file, a larger file."""
    (root / "uploads" / "2026" / "11").mkdir(parents=True)
    (root / "config").mkdir()
    (root / "uploads" / "2026" / "11" / "scan.pdf").write_bytes(os.urandom(300_000))
    (root / "uploads" / "index.json").write_text('{"files": 1}\n')
    (root / "config" / "secret.key").write_text("k3y\n")
    (root / "config" / "secret.key").chmod(0o600)
    (root / "config").chmod(0o750)
    (root / "empty").write_bytes(b"")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "latest").symlink_to("uploads/2026/11/scan.pdf")


@pytest.fixture
def live(tmp_path: Path) -> Path:
    root = tmp_path / "platform" / "data"
    make_tree(root)
    return root


@pytest.fixture
def backups(tmp_path: Path) -> Path:
    return tmp_path / "backups"


def inode(path: Path) -> int:
    return path.stat().st_ino


def all_inodes(root: Path) -> set[int]:
    return {Path(folder, name).lstat().st_ino for folder, _dirs, files in os.walk(root) for name in files}


def test_first_snapshot_copies_every_file_with_its_metadata_and_a_manifest(live: Path, backups: Path) -> None:
    # Given a data folder; When the first snapshot is taken
    info = take_snapshot([live], backups / "1", run_id=1)

    # Then the copy holds the same tree (contents, modes, mtimes, symlink) and the summary counts it
    assert tree_digest(backups / "1" / "data" / "data") == tree_digest(live)
    assert (info.files, info.shared_files, info.new_files, info.verified) == (5, 0, 5, True)
    assert info.bytes == sum(p.stat().st_size for p in live.rglob("*") if p.is_file() and not p.is_symlink())
    # And the manifest lists path, size, mode, mtime and SHA-256 of every file
    manifest = read_manifest(backups / "1")
    entry = next(e for e in manifest.entries if e["path"] == "config/secret.key")
    assert entry["size"] == 4 and entry["mode"] == "0600"
    assert entry["sha256"] == hashlib.sha256(b"k3y\n").hexdigest()
    assert entry["mtime_ns"] == (live / "config" / "secret.key").stat().st_mtime_ns
    assert manifest.roots == [{"name": "data", "source": str(live)}]


def test_live_data_never_shares_an_inode_with_a_snapshot(live: Path, backups: Path) -> None:
    take_snapshot([live], backups / "1", run_id=1)
    take_snapshot([live], backups / "2", backups / "1", run_id=2)

    live_inodes = all_inodes(live)
    assert live_inodes.isdisjoint(all_inodes(backups / "1"))
    assert live_inodes.isdisjoint(all_inodes(backups / "2"))
    assert all(p.lstat().st_nlink == 1 for p in live.rglob("*") if p.is_file())


def test_second_snapshot_shares_unchanged_files_and_copies_changed_ones(live: Path, backups: Path) -> None:
    # Given a first snapshot
    take_snapshot([live], backups / "1", run_id=1)
    # When one file changes, one changes only its mode, one is rewritten with its size and mtime kept,
    # one is added and one removed
    (live / "uploads" / "index.json").write_text('{"files": 22}\n')
    (live / "run.sh").chmod(0o700)
    key = live / "config" / "secret.key"
    times = key.stat()
    key.write_text("K3Y\n")
    os.utime(key, ns=(times.st_atime_ns, times.st_mtime_ns))
    (live / "new.txt").write_text("new\n")
    (live / "empty").unlink()
    info = take_snapshot([live], backups / "2", backups / "1", run_id=2)

    first, second = backups / "1" / "data" / "data", backups / "2" / "data" / "data"
    # Then the untouched file is the same inode in both snapshots
    assert inode(first / "uploads" / "2026" / "11" / "scan.pdf") == inode(
        second / "uploads" / "2026" / "11" / "scan.pdf"
    )
    # And no changed file is shared (even the one whose size and mtime were put back)
    for rel in ("uploads/index.json", "run.sh", "config/secret.key"):
        assert inode(first / rel) != inode(second / rel), rel
    assert (second / "config" / "secret.key").read_text() == "K3Y\n"
    assert (first / "config" / "secret.key").read_text() == "k3y\n"
    assert not (second / "empty").exists()
    assert (info.shared_files, info.new_files, info.previous) == (1, 4, 1)
    assert tree_digest(second) == tree_digest(live)


def test_estimate_counts_only_what_changed_since_the_previous_snapshot(live: Path, backups: Path) -> None:
    first = estimate_snapshot([live])
    take_snapshot([live], backups / "1", run_id=1)
    (live / "uploads" / "index.json").write_text("x" * 1000)
    second = estimate_snapshot([live], backups / "1")

    assert first.new_bytes == first.bytes
    assert (second.new_files, second.new_bytes) == (1, 1000)
    assert second.need_bytes < first.need_bytes


def test_a_tampered_file_fails_verification(live: Path, backups: Path) -> None:
    # Given a verified snapshot
    take_snapshot([live], backups / "1", run_id=1)
    assert verify_snapshot(backups / "1") == []
    # When a byte of a copy changes, its size and mtime kept
    copy = backups / "1" / "data" / "data" / "uploads" / "2026" / "11" / "scan.pdf"
    before = copy.stat()
    with open(copy, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))

    # Then verification names the file and the hash mismatch
    problems = verify_snapshot(backups / "1")
    assert problems == [f"{copy}: content differs from the manifest (SHA-256 mismatch)"]


def test_verification_reports_missing_extra_and_changed_mode(live: Path, backups: Path) -> None:
    take_snapshot([live], backups / "1", run_id=1)
    base = backups / "1" / "data" / "data"
    (base / "run.sh").unlink()
    (base / "intruder").write_text("x")
    (base / "config" / "secret.key").chmod(0o644)

    problems = verify_snapshot(backups / "1")

    assert f"{base / 'run.sh'}: missing from the snapshot" in problems
    assert f"{base / 'intruder'}: not in the manifest" in problems
    assert f"{base / 'config' / 'secret.key'}: mode 0644, the manifest says 0600" in problems


def test_restore_puts_the_tree_back_exactly(live: Path, backups: Path) -> None:
    # Given a snapshot of the data
    expected = tree_digest(live)
    take_snapshot([live], backups / "1", run_id=1)
    # When the platform changes everything it can: contents, modes, added and removed files,
    # a folder replaced by a file, a symlink retargeted, a folder's mode
    (live / "uploads" / "index.json").write_text("migrated\n")
    (live / "run.sh").chmod(0o600)
    (live / "empty").unlink()
    (live / "added.db").write_bytes(b"\0" * 5000)
    (live / "newdir" / "deep").mkdir(parents=True)
    (live / "newdir" / "deep" / "f").write_text("f")
    for child in (live / "uploads" / "2026" / "11").iterdir():
        child.unlink()
    (live / "uploads" / "2026" / "11").rmdir()
    (live / "uploads" / "2026" / "11").write_text("now a file")
    (live / "latest").unlink()
    (live / "latest").symlink_to("elsewhere")
    (live / "config").chmod(0o777)
    assert tree_digest(live) != expected

    report = restore_snapshot(backups / "1")

    # Then the live tree is byte-identical to the snapshot time, modes and mtimes included
    assert tree_digest(live) == expected
    assert report.removed >= 3
    # And nothing live was linked to the snapshot
    assert all_inodes(live).isdisjoint(all_inodes(backups / "1"))


def test_restore_keeps_untouched_files_and_recreates_a_removed_data_path(live: Path, backups: Path) -> None:
    take_snapshot([live], backups / "1", run_id=1)
    untouched = inode(live / "uploads" / "2026" / "11" / "scan.pdf")
    (live / "run.sh").write_text("changed")

    report = restore_snapshot(backups / "1")

    assert inode(live / "uploads" / "2026" / "11" / "scan.pdf") == untouched
    assert (report.restored_files, report.kept_files) == (1, 4)
    # When the whole data path is gone, it comes back
    expected = tree_digest(live)
    shutil.rmtree(live)  # the whole data path lost
    restore_snapshot(backups / "1")
    assert tree_digest(live) == expected


def test_restore_refuses_a_damaged_snapshot_and_touches_nothing(live: Path, backups: Path) -> None:
    take_snapshot([live], backups / "1", run_id=1)
    (live / "run.sh").write_text("changed by the update\n")
    changed = tree_digest(live)
    (backups / "1" / "data" / "data" / "uploads" / "index.json").write_text("{}")

    with pytest.raises(SnapshotError, match=r"failed verification, nothing was restored: .*index\.json"):
        restore_snapshot(backups / "1")

    assert tree_digest(live) == changed


def test_not_enough_space_fails_before_writing_and_names_the_folder_and_missing_bytes(
    live: Path, backups: Path
) -> None:
    """The free space comes from an injected probe (the real full-disk cases are in the integration tests)."""
    with pytest.raises(NoSpace) as caught:
        take_snapshot([live], backups / "1", run_id=1, space=lambda path: Space(free_bytes=1000, free_inodes=10**6))

    assert caught.value.path == backups
    assert caught.value.missing > 300_000
    assert f"not enough space for the backup in {backups}" in str(caught.value)
    assert f"{caught.value.missing:,} bytes missing" in str(caught.value)
    assert os.listdir(backups) == []


def test_a_write_failing_with_a_full_disk_removes_the_partial_snapshot(live: Path, backups: Path) -> None:
    """An injected write failure (ENOSPC on the large file): the same path a real full disk takes."""

    def write(fd: int, data: memoryview) -> int:
        if len(data) > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    with pytest.raises(NoSpace) as caught:
        take_snapshot([live], backups / "1", run_id=1, write=write, reflink=False, workers=1)

    assert caught.value.path == live / "uploads" / "2026" / "11" / "scan.pdf"
    assert f"filled while copying {caught.value.path}" in str(caught.value)
    assert caught.value.missing > 0
    assert os.listdir(backups) == []


def test_a_stop_request_removes_the_partial_snapshot(live: Path, backups: Path) -> None:
    calls = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 4:
            raise StepAborted("backup was stopped: shutdown")

    with pytest.raises(StepAborted):
        take_snapshot([live], backups / "1", run_id=1, checkpoint=checkpoint)

    assert os.listdir(backups) == []


def test_progress_rises_to_the_expected_bytes(live: Path, backups: Path) -> None:
    seen: list[tuple[int, int]] = []
    info = take_snapshot([live], backups / "1", run_id=1, progress=lambda done, expected: seen.append((done, expected)))

    dones = [done for done, _ in seen]
    assert dones == sorted(dones)
    assert seen[-1] == (info.bytes, info.bytes)


def test_dumps_are_written_hashed_and_verified(live: Path, backups: Path) -> None:
    def dump(target: Path) -> None:
        target.write_bytes(b"-- SQL dump\n" * 100)

    info = take_snapshot([live], backups / "1", run_id=1, dumps=[("db", dump)])

    assert info.dumps == {"db": 1200}
    assert (backups / "1" / "dumps" / "db").read_bytes().startswith(b"-- SQL dump")
    assert verify_snapshot(backups / "1") == []
    (backups / "1" / "dumps" / "db").write_bytes(b"-- SQL dump\n" * 99 + b"-- SQL DUMP\n")
    assert verify_snapshot(backups / "1") == [
        f"{backups / '1' / 'dumps' / 'db'}: content differs from the manifest (SHA-256 mismatch)"
    ]


def test_several_data_paths_with_the_same_name_get_distinct_folders(tmp_path: Path, backups: Path) -> None:
    one, two = tmp_path / "a" / "data", tmp_path / "b" / "data"
    make_tree(one)
    make_tree(two)
    (two / "only-in-two").write_text("2")

    take_snapshot([one, two], backups / "1", run_id=1)

    assert sorted(os.listdir(backups / "1" / "data")) == ["data", "data-2"]
    assert (backups / "1" / "data" / "data-2" / "only-in-two").exists()


def test_pruning_keeps_the_newest_and_the_protected_and_shared_files_survive(live: Path, backups: Path) -> None:
    previous = None
    for run in range(1, 6):
        (live / f"file-{run}").write_text(str(run))
        take_snapshot([live], backups / str(run), previous, run_id=run)
        previous = backups / str(run)
    (backups / ".9.partial").mkdir()  # left by a run that died

    removed = prune_snapshots(backups, keep=2, protect={1})

    assert sorted(p.name for p in removed) == [".9.partial", "2", "3"]
    assert [info.run for info in list_snapshots(backups)] == [1, 4, 5]
    assert verify_snapshot(backups / "5") == []  # its files shared with 2 and 3 are still whole
    latest = latest_snapshot(backups, before=5)
    assert latest is not None and latest.run == 4


def test_a_snapshot_is_never_overwritten(live: Path, backups: Path) -> None:
    take_snapshot([live], backups / "1", run_id=1)
    with pytest.raises(SnapshotError, match="already exists"):
        take_snapshot([live], backups / "1", run_id=1)


def test_a_missing_data_path_fails_the_snapshot_naming_it(tmp_path: Path, backups: Path) -> None:
    with pytest.raises(SnapshotError, match=f"data path {tmp_path / 'nope'} does not exist"):
        take_snapshot([tmp_path / "nope"], backups / "1", run_id=1)


def test_summary_records_the_manifest_checksum(live: Path, backups: Path) -> None:
    take_snapshot([live], backups / "1", run_id=1)
    summary = json.loads((backups / "1" / snapshot.SUMMARY).read_text())
    manifest = backups / "1" / snapshot.MANIFEST
    assert summary["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()

    manifest.write_text(manifest.read_text().replace('"0600"', '"0644"'))
    assert any("changed since the snapshot was taken" in p for p in verify_snapshot(backups / "1"))


def test_restore_handles_names_at_the_length_limit(live: Path, backups: Path) -> None:
    longest = live / ("n" * 255)
    longest.write_text("before")
    expected = tree_digest(live)
    take_snapshot([live], backups / "1", run_id=1)
    longest.write_text("after, and longer")

    restore_snapshot(backups / "1")

    assert longest.read_text() == "before"
    assert tree_digest(live) == expected


def test_names_of_one_file_stay_one_file_through_snapshot_and_restore(live: Path, backups: Path) -> None:
    # Given a file with two names in the data
    first, second = live / "uploads" / "index.json", live / "config" / "index-link.json"
    os.link(first, second)
    expected = tree_digest(live)
    info = take_snapshot([live], backups / "1", run_id=1)
    copy = backups / "1" / "data" / "data"
    assert inode(copy / "uploads" / "index.json") == inode(copy / "config" / "index-link.json")
    sizes = sum(p.stat().st_size for p in live.rglob("*") if p.is_file() and not p.is_symlink())
    assert info.new_bytes == sizes - first.stat().st_size  # the second name costs nothing
    assert verify_snapshot(backups / "1") == []
    # When the update breaks the link and changes one name
    second.unlink()
    second.write_text("separate now")

    restore_snapshot(backups / "1")

    # Then both names are one file again, with the old content, and nothing links to the snapshot
    assert inode(first) == inode(second)
    assert first.read_text() == '{"files": 1}\n'
    assert tree_digest(live) == expected
    assert all_inodes(live).isdisjoint(all_inodes(backups / "1"))
    # And a broken link inside the snapshot is a verification problem (the walk met config/ first)
    (copy / "uploads" / "index.json").unlink()
    (copy / "uploads" / "index.json").write_text('{"files": 1}\n')
    assert verify_snapshot(backups / "1") == [
        f"{copy / 'uploads' / 'index.json'}: should be the same file as {copy / 'config' / 'index-link.json'}"
    ]


def test_a_file_removed_by_the_platform_during_the_snapshot_is_left_out(tmp_path: Path, backups: Path) -> None:
    """The walk has seen `b` (the third checkpoint comes right after it is listed), then it vanishes."""
    live = tmp_path / "data"
    live.mkdir()
    for name in ("a", "b", "c"):
        (live / name).write_text(name)
    calls = []

    def platform_removes_b() -> None:
        calls.append(1)
        if len(calls) == 3:
            (live / "b").unlink()

    info = take_snapshot([live], backups / "1", run_id=1, checkpoint=platform_removes_b, workers=1)

    assert (info.files, info.vanished_files) == (2, 1)
    assert sorted(os.listdir(backups / "1" / "data" / "data")) == ["a", "c"]
    assert verify_snapshot(backups / "1") == []


@pytest.mark.parametrize("swap", ["link-to-outside", "link-to-a-sibling", "file", "removed"])
@pytest.mark.parametrize("first", [True, False], ids=["first-snapshot", "second-snapshot"])
def test_a_folder_swapped_after_the_walk_listed_it_is_never_followed(
    tmp_path: Path, backups: Path, swap: str, first: bool
) -> None:
    """The walk lists `m/` (a folder) and `z`; while it looks at `z`, before it goes into `m/`, the folder is
    replaced. A link in its place must not lead the snapshot (or a restore of it) into other files."""
    live = tmp_path / "data"
    (live / "m").mkdir(parents=True)
    (live / "m" / "inside.txt").write_text("in m")
    (live / "s").mkdir()
    (live / "s" / "sibling.txt").write_text("in s")
    (live / "z").write_text("z")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.key").write_text("not platform data")
    if not first:
        take_snapshot([live], backups / "0", run_id=0)
    calls: list[int] = []

    def platform_swaps_m() -> None:
        calls.append(1)
        if len(calls) == 4:  # ".", "m", "s", "z": the walk has listed the top folder, and not yet entered `m/`
            shutil.rmtree(live / "m")
            if swap == "link-to-outside":
                (live / "m").symlink_to(outside)
            elif swap == "link-to-a-sibling":
                (live / "m").symlink_to("s")
            elif swap == "file":
                (live / "m").write_text("a file now")

    info = take_snapshot(
        [live], backups / "1", backups / "0" if not first else None, run_id=1, checkpoint=platform_swaps_m, workers=1
    )

    # The folder is kept as the walk listed it, empty: nothing of what the link leads to is copied
    copy = backups / "1" / "data" / "data"
    assert (copy / "m").is_dir() and not (copy / "m").is_symlink()
    assert os.listdir(copy / "m") == []
    assert sorted(p.name for p in copy.rglob("*")) == ["m", "s", "sibling.txt", "z"]
    assert info.files == 2
    assert verify_snapshot(backups / "1") == []
    assert (outside / "secret.key").read_text() == "not platform data"


@pytest.mark.parametrize("replaced_by", ["file", "nothing"])
def test_a_folder_replaced_while_its_files_are_copied_leaves_them_out_and_the_snapshot_succeeds(
    tmp_path: Path, backups: Path, replaced_by: str
) -> None:
    """The walk is inside `m/` (its files listed) when the platform replaces the folder: its files have vanished."""
    live = tmp_path / "data"
    (live / "m").mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
        (live / "m" / name).write_text(name)
    (live / "z").write_text("z")
    calls: list[int] = []

    def platform_replaces_m() -> None:
        calls.append(1)
        if len(calls) == 4:  # ".", "m", "z", "m/a.txt": inside `m/`, before its first file is copied
            shutil.rmtree(live / "m")
            if replaced_by == "file":
                (live / "m").write_text("a file now")

    info = take_snapshot([live], backups / "1", run_id=1, checkpoint=platform_replaces_m, workers=1)

    # (a.txt was being copied: it vanished; b.txt, not yet looked at, is simply not there any more)
    assert (info.files, info.vanished_files) == (1, 1)
    assert os.listdir(backups / "1" / "data" / "data" / "m") == []
    assert verify_snapshot(backups / "1") == []


def test_a_file_that_keeps_changing_while_copied_is_kept_as_copied_and_verifies(tmp_path: Path, backups: Path) -> None:
    """The platform appends to a log while it is copied (an injected write: the copy's own writes trigger it)."""
    live = tmp_path / "data"
    live.mkdir()
    log = live / "app.log"
    log.write_bytes(b"line\n" * 50_000)

    def write(fd: int, data: memoryview) -> int:
        with open(log, "ab") as handle:
            handle.write(b"appended while copying\n")
        return os.write(fd, data)

    info = take_snapshot([live], backups / "1", run_id=1, write=write, reflink=False)

    copy = backups / "1" / "data" / "data" / "app.log"
    assert info.changing_files == 1
    assert copy.read_bytes().startswith(b"line\n" * 50_000)
    assert info.bytes == copy.stat().st_size
    assert verify_snapshot(backups / "1") == []
    # And the next snapshot copies it again rather than sharing a possibly torn copy
    second = take_snapshot([live], backups / "2", backups / "1", run_id=2)
    assert second.shared_files == 0


def xattrs_of(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in os.listxattr(path) if name.startswith("user.")}


def test_extended_attributes_are_recorded_and_restored_exactly(live: Path, backups: Path) -> None:
    """user.* attributes stand for ACLs and SELinux labels, which travel the same way (root sets those too)."""
    key, folder = live / "config" / "secret.key", live / "config"
    try:
        os.setxattr(key, "user.origin", b"vendor")
    except OSError as error:
        cannot_run(f"this filesystem has no user extended attributes: {error.strerror}")
    os.setxattr(folder, "user.policy", b"private")
    take_snapshot([live], backups / "1", run_id=1)
    entry = next(e for e in read_manifest(backups / "1").entries if e["path"] == "config/secret.key")
    assert entry["xattrs"] == {"user.origin": "dmVuZG9y"}  # base64 of b"vendor"
    second = take_snapshot([live], backups / "2", backups / "1", run_id=2)  # shared: its attributes carried over
    assert second.shared_files == 5
    assert next(e for e in read_manifest(backups / "2").entries if e["path"] == "config/secret.key") == entry
    # When the update rewrites the file, drops one attribute, changes another and adds a third
    key.write_text("rotated\n")
    os.setxattr(key, "user.rotated", b"yes")
    os.removexattr(key, "user.origin")
    os.setxattr(folder, "user.policy", b"public")

    restore_snapshot(backups / "2")

    assert xattrs_of(key) == {"user.origin": b"vendor"}
    assert xattrs_of(folder) == {"user.policy": b"private"}
    assert key.read_text() == "k3y\n"


def test_a_previous_snapshot_with_a_damaged_manifest_is_not_used_and_the_next_is_a_full_copy(
    live: Path, backups: Path
) -> None:
    take_snapshot([live], backups / "1", run_id=1)
    (backups / "1" / snapshot.MANIFEST).write_text("{not json\n")

    info = take_snapshot([live], backups / "2", backups / "1", run_id=2)

    assert (info.previous, info.shared_files, info.new_files) == (None, 0, 5)
    assert verify_snapshot(backups / "2") == []


def test_a_data_path_that_is_one_file_is_snapshotted_and_restored(tmp_path: Path, backups: Path) -> None:
    single = tmp_path / "etc" / "license.key"
    single.parent.mkdir()
    single.write_text("LICENSE-1\n")
    single.chmod(0o640)
    take_snapshot([single], backups / "1", run_id=1)
    shutil.rmtree(single.parent)

    restore_snapshot(backups / "1")

    assert single.read_text() == "LICENSE-1\n"
    assert stat.S_IMODE(single.stat().st_mode) == 0o640
