"""What a snapshot trusts and what it reads: the manifest in walk order, sharing by stat, racy files, hashing.

Real trees under tmp_path. "Racy" cases (a file written again within the same
tick of the filesystem's clock, so that its stat does not change) cannot be
produced on demand; they are built as the state such a write leaves: the
snapshot's copy and its recorded hash hold other bytes than the live file, whose
stat still matches the record.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline import snapshot
from pipeline.errors import NoSpace, SnapshotError, StepAborted
from pipeline.snapshot import linker as link_helper
from pipeline.snapshot import (
    read_manifest,
    restore_snapshot,
    take,
    take_snapshot,
    verify_snapshot,
)
from pipeline.snapshot.manifest import Placed
from tests.support import tree_digest


def walk_order(root: Path) -> list[str]:
    """The order the manifest must follow, computed independently: each folder's entries by name,
    then its subfolders depth first, by name."""
    order: list[str] = []

    def visit(folder: Path, rel: str) -> None:
        names = sorted(os.listdir(folder))
        for name in names:
            order.append(f"{rel}/{name}" if rel else name)
        for name in names:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                visit(path, f"{rel}/{name}" if rel else name)

    visit(root, "")
    return order


def make_tree(root: Path, files: int = 120) -> None:
    """Nested folders (names chosen so that plain text order and walk order differ) with files of mixed sizes."""
    for n in range(files):
        folder = root / ["a", "a-b", "a/b", "a/b/c", "b", "z"][n % 6]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{n:03d}.bin").write_bytes(os.urandom((n * 7919) % 200_000))
    (root / "a" / "link").symlink_to("f000.bin")


def file_lines(dest: Path) -> list[str]:
    return [line for line in (dest / snapshot.MANIFEST).read_text().splitlines()[1:] if '"type":"file"' in line]


def forge_same_tick_write(dest: Path, rel: str, new_bytes: bytes) -> None:
    """Make snapshot `dest` hold `new_bytes` (size, mtime and mode kept) for the live file `rel`,
    consistently: manifest hash and summary checksum updated. The live file and the record still agree on
    every stat field, but not on the bytes, as after a write within the same clock tick as the copy."""
    copy = dest / "data" / "data" / rel
    info = copy.stat()
    copy.write_bytes(new_bytes)
    os.utime(copy, ns=(info.st_atime_ns, info.st_mtime_ns))
    manifest = dest / snapshot.MANIFEST
    lines = manifest.read_text().splitlines(keepends=True)
    for index, line in enumerate(lines):
        if f'"path":{json.dumps(rel)},' in line:
            entry = json.loads(line)
            lines[index] = line.replace(entry["sha256"], hashlib.sha256(new_bytes).hexdigest())
    manifest.write_text("".join(lines))
    summary = json.loads((dest / snapshot.SUMMARY).read_text())
    summary["manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    (dest / snapshot.SUMMARY).write_text(json.dumps(summary))
    assert verify_snapshot(dest) == []


@pytest.fixture
def live(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_tree(root)
    return root


def test_the_manifest_lists_each_data_path_in_walk_order_whatever_order_copies_finish(
    live: Path, tmp_path: Path
) -> None:
    # When a first snapshot copies files of very different sizes on four threads
    take_snapshot([live], tmp_path / "b" / "1", run_id=1, workers=4)

    # Then the manifest lists every entry in the walk's order, not in the order the copies finished
    entries = read_manifest(tmp_path / "b" / "1").entries
    assert [e["path"] for e in entries] == [".", *walk_order(live)]


def test_shared_files_carry_their_previous_manifest_lines_unchanged(live: Path, tmp_path: Path, linker: str) -> None:
    backups = tmp_path / "b"
    take_snapshot([live], backups / "1", run_id=1, now=lambda: time.time() + 10)  # nothing racy
    (live / "b" / "f004.bin").write_bytes(b"changed")

    info = take_snapshot([live], backups / "2", backups / "1", run_id=2)

    first, second = file_lines(backups / "1"), file_lines(backups / "2")
    changed = [line for line in second if '"path":"b/f004.bin"' in line]
    assert (info.shared_files, info.new_files) == (119, 1)
    assert [line for line in second if line not in changed] == [line for line in first if '"b/f004.bin"' not in line]
    assert verify_snapshot(backups / "2") == []
    assert tree_digest(backups / "2" / "data" / "data", dir_times=False) == tree_digest(live, dir_times=False)


def test_a_racy_file_whose_bytes_differ_is_copied_again_not_linked(live: Path, tmp_path: Path) -> None:
    # Given a first snapshot taken right after the data was written (every file is racy: its ctime is
    # within 2 s of the snapshot's start), whose copy of one file differs from the live bytes
    backups = tmp_path / "b"
    take_snapshot([live], backups / "1", run_id=1)
    rel = "a/b/f002.bin"
    size = (live / rel).stat().st_size
    forge_same_tick_write(backups / "1", rel, os.urandom(size))

    # When the next snapshot runs
    info = take_snapshot([live], backups / "2", backups / "1", run_id=2)

    # Then that file was hashed, found different and copied; every other racy file was linked after hashing
    copy = backups / "2" / "data" / "data" / rel
    assert copy.read_bytes() == (live / rel).read_bytes()
    assert copy.stat().st_ino != (backups / "1" / "data" / "data" / rel).stat().st_ino
    assert (info.shared_files, info.new_files) == (119, 1)
    assert verify_snapshot(backups / "2") == []


def test_a_file_older_than_the_previous_snapshot_is_trusted_on_its_stat_alone(live: Path, tmp_path: Path) -> None:
    """What is trusted, shown: a file whose ctime is 2 s older than the previous snapshot's start, and whose
    size, mtime, ctime, inode, device, owner and mode are as recorded, is linked without being read."""
    backups = tmp_path / "b"
    take_snapshot([live], backups / "1", run_id=1, now=lambda: time.time() + 10)
    rel = "a/b/f002.bin"
    forged = os.urandom((live / rel).stat().st_size)
    forge_same_tick_write(backups / "1", rel, forged)

    info = take_snapshot([live], backups / "2", backups / "1", run_id=2)

    assert info.shared_files == 120
    assert (backups / "2" / "data" / "data" / rel).read_bytes() == forged


def _tamper(copy: Path, how: str) -> None:
    """Change the previous snapshot's copy of a file the way someone in the backups folder could."""
    info = copy.stat()
    if how == "size":  # a byte more, its mtime put back
        with open(copy, "ab") as handle:
            handle.write(b"!")
        os.utime(copy, ns=(info.st_atime_ns, info.st_mtime_ns))
    elif how == "mtime":
        os.utime(copy, ns=(info.st_atime_ns, info.st_mtime_ns - 1))
    elif how == "mode":
        copy.chmod(0o600)
    elif how == "removed":
        copy.unlink()
    elif how == "symlink":  # a link to a file with the recorded bytes, size and mtime
        twin = copy.with_name("twin")
        os.link(copy, twin)
        copy.unlink()
        copy.symlink_to("twin")
    elif how == "fifo":
        copy.unlink()
        os.mkfifo(copy)
    elif how == "folder":
        copy.unlink()
        copy.mkdir()
    else:
        raise AssertionError(how)


@pytest.fixture(params=["walk", "helper"])
def linker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Who links the unchanged files: the walk itself, or the helper process (which large snapshots use,
    here made to serve a small one as well)."""
    if request.param == "helper":
        monkeypatch.setattr(take, "_LINK_HELPER_FILES", 0)
    return str(request.param)


@pytest.mark.parametrize("racy", [False, True], ids=["trusted-on-stat", "racy"])
@pytest.mark.parametrize("how", ["size", "mtime", "mode", "removed", "symlink", "fifo", "folder"])
def test_a_previous_copy_changed_in_the_backups_folder_is_copied_afresh_not_carried_forward(
    live: Path, tmp_path: Path, how: str, racy: bool, linker: str
) -> None:
    # Given a previous snapshot whose copy of one unchanged live file was changed or replaced since
    backups = tmp_path / "b"
    take_snapshot([live], backups / "1", run_id=1, now=time.time if racy else lambda: time.time() + 10)
    rel = "a/b/f002.bin"
    previous_copy = backups / "1" / "data" / "data" / rel
    _tamper(previous_copy, how)
    planted = os.lstat(previous_copy) if how != "removed" else None

    # When the next snapshot runs
    info = take_snapshot([live], backups / "2", backups / "1", run_id=2)

    # Then that file is a fresh copy of the live bytes with the live metadata, every other file is shared,
    # the new snapshot verifies in full (nothing extra, no link left behind) and the previous one is as it was
    copy = backups / "2" / "data" / "data" / rel
    assert copy.read_bytes() == (live / rel).read_bytes()
    assert (copy.stat().st_mode, copy.stat().st_mtime_ns) == (
        (live / rel).stat().st_mode,
        (live / rel).stat().st_mtime_ns,
    )
    assert copy.stat().st_nlink == 1
    assert (info.shared_files, info.new_files) == (119, 1)
    assert verify_snapshot(backups / "2") == []
    if planted is not None:
        assert os.lstat(previous_copy).st_ino == planted.st_ino


def test_restore_rewrites_a_racy_file_whose_bytes_differ(live: Path, tmp_path: Path) -> None:
    backups = tmp_path / "b"
    take_snapshot([live], backups / "1", run_id=1)
    rel = "z/f005.bin"
    held = os.urandom((live / rel).stat().st_size)
    forge_same_tick_write(backups / "1", rel, held)
    inode = (live / rel).stat().st_ino

    report = restore_snapshot(backups / "1")

    assert (live / rel).read_bytes() == held
    assert (live / rel).stat().st_ino != inode
    assert (report.restored_files, report.kept_files) == (1, 119)


def test_a_previous_manifest_edited_since_is_not_used(live: Path, tmp_path: Path) -> None:
    backups = tmp_path / "b"
    take_snapshot([live], backups / "1", run_id=1)
    manifest = backups / "1" / snapshot.MANIFEST
    manifest.write_text(manifest.read_text().replace('"mode":"0644"', '"mode":"0600"', 1))  # still valid JSON

    info = take_snapshot([live], backups / "2", backups / "1", run_id=2)

    assert (info.previous, info.shared_files, info.new_files) == (None, 0, 120)
    assert verify_snapshot(backups / "2") == []


def test_a_previous_manifest_out_of_walk_order_costs_copies_never_correctness(live: Path, tmp_path: Path) -> None:
    """As written by an older version: its lines in another order (the checksum made to match)."""
    backups = tmp_path / "b"
    take_snapshot([live], backups / "1", run_id=1)
    manifest = backups / "1" / snapshot.MANIFEST
    header, *lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text(header + "".join(reversed(lines)))
    summary = json.loads((backups / "1" / snapshot.SUMMARY).read_text())
    summary["manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    (backups / "1" / snapshot.SUMMARY).write_text(json.dumps(summary))
    (live / "a" / "f000.bin").write_bytes(b"changed")

    info = take_snapshot([live], backups / "2", backups / "1", run_id=2)

    assert info.shared_files < 119
    assert verify_snapshot(backups / "2") == []
    assert tree_digest(backups / "2" / "data" / "data", dir_times=False) == tree_digest(live, dir_times=False)


def test_a_data_path_that_is_one_file_is_shared_by_the_next_snapshot(tmp_path: Path, linker: str) -> None:
    single = tmp_path / "license.key"
    single.write_text("LICENSE\n")
    take_snapshot([single], tmp_path / "b" / "1", run_id=1, now=lambda: time.time() + 10)

    info = take_snapshot([single], tmp_path / "b" / "2", tmp_path / "b" / "1", run_id=2)

    assert (info.files, info.shared_files) == (1, 1)
    assert verify_snapshot(tmp_path / "b" / "2") == []


def test_a_data_path_under_another_folder_name_is_still_shared(tmp_path: Path, linker: str) -> None:
    # Given two data paths with the same base name (data, data-2), then only the second one
    one, two = tmp_path / "x" / "data", tmp_path / "y" / "data"
    make_tree(one, 12)
    make_tree(two, 12)
    take_snapshot([one, two], tmp_path / "b" / "1", run_id=1, now=lambda: time.time() + 10)

    info = take_snapshot([two], tmp_path / "b" / "2", tmp_path / "b" / "1", run_id=2)

    # Then its files are shared although their folder is now data/ (was data-2/), and the lines say so
    assert info.shared_files == 12
    assert {e["root"] for e in read_manifest(tmp_path / "b" / "2").entries} == {"data"}
    assert verify_snapshot(tmp_path / "b" / "2") == []


def test_large_files_are_hashed_while_copied_on_a_second_thread(tmp_path: Path) -> None:
    live = tmp_path / "data"
    live.mkdir()
    sizes = {"exact.bin": 64 << 20, "odd.bin": (65 << 20) + 12345, "small.bin": 1000, "empty.bin": 0}
    for name, size in sizes.items():
        (live / name).write_bytes(os.urandom(size))

    take_snapshot([live], tmp_path / "b" / "1", run_id=1, reflink=False)

    entries = {e["path"]: e for e in read_manifest(tmp_path / "b" / "1").entries}
    for name, size in sizes.items():
        content = (live / name).read_bytes()
        assert entries[name]["sha256"] == hashlib.sha256(content).hexdigest(), name
        assert entries[name]["size"] == size
        assert (tmp_path / "b" / "1" / "data" / "data" / name).read_bytes() == content
    assert not [t for t in threading.enumerate() if t.name == "snapshot-hash"]
    assert verify_snapshot(tmp_path / "b" / "1") == []


@pytest.mark.parametrize("failing_write", [1, 3, 9])
def test_a_full_disk_in_the_middle_of_a_large_file_ends_the_hashing_thread(tmp_path: Path, failing_write: int) -> None:
    """An injected ENOSPC on the n-th write of a 70 MiB file (the hashing thread holds buffers meanwhile)."""
    live = tmp_path / "data"
    live.mkdir()
    (live / "big.bin").write_bytes(os.urandom(70 << 20))
    writes = []

    def write(fd: int, data: memoryview) -> int:
        writes.append(len(data))
        if len(writes) == failing_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    with pytest.raises(NoSpace, match=r"filled while copying .*big\.bin: about [\d,]+ more bytes were needed"):
        take_snapshot([live], tmp_path / "b" / "1", run_id=1, reflink=False, write=write)

    assert os.listdir(tmp_path / "b") == []
    assert not [t for t in threading.enumerate() if t.name == "snapshot-hash"]


def test_a_large_file_growing_while_copied_keeps_the_bytes_copied_and_verifies(tmp_path: Path) -> None:
    live = tmp_path / "data"
    live.mkdir()
    log = live / "growing.log"
    log.write_bytes(os.urandom(66 << 20))

    def write(fd: int, data: memoryview) -> int:
        with open(log, "ab") as handle:
            handle.write(b"appended while copying\n")
        return os.write(fd, data)

    info = take_snapshot([live], tmp_path / "b" / "1", run_id=1, reflink=False, write=write)

    copy = tmp_path / "b" / "1" / "data" / "data" / "growing.log"
    assert info.changing_files == 1
    assert copy.stat().st_size >= 66 << 20
    assert log.read_bytes().startswith(copy.read_bytes())
    assert verify_snapshot(tmp_path / "b" / "1") == []


def test_verification_names_extra_entries_wherever_they_are(live: Path, tmp_path: Path) -> None:
    take_snapshot([live], tmp_path / "b" / "1", run_id=1)
    base = tmp_path / "b" / "1" / "data" / "data"
    (base / "a" / "b" / "c" / "stowaway").write_text("x")
    (base / "new" / "deeper").mkdir(parents=True)
    (base / "new" / "deeper" / "file").write_text("y")
    (tmp_path / "b" / "1" / "dumps").mkdir()

    problems = verify_snapshot(tmp_path / "b" / "1")

    assert problems == [f"{tmp_path / 'b' / '1' / 'dumps'}: not in the manifest"]
    (tmp_path / "b" / "1" / "dumps").rmdir()
    assert verify_snapshot(tmp_path / "b" / "1") == sorted(
        f"{path}: not in the manifest"
        for path in (
            base / "a" / "b" / "c" / "stowaway",
            base / "new",
            base / "new" / "deeper",
            base / "new" / "deeper" / "file",
        )
    )


def test_a_later_snapshot_that_no_longer_fits_stops_writing_and_says_the_whole_need(live: Path, tmp_path: Path) -> None:
    """The free space comes from an injected probe: what the first snapshot needs, and no more."""
    backups = tmp_path / "b"
    first = take_snapshot([live], backups / "1", run_id=1, now=lambda: time.time() + 10)  # nothing racy
    (live / "grown").mkdir()
    for n in range(5):
        (live / "grown" / f"{n}.bin").write_bytes(os.urandom(400_000))
    free = snapshot.Space(free_bytes=1_000_000, free_inodes=10**6)

    with pytest.raises(NoSpace) as caught:
        take_snapshot([live], backups / "2", backups / "1", run_id=2, space=lambda path: free)

    message = str(caught.value)
    assert message.startswith(f"not enough space for the backup in {backups}: ")
    assert caught.value.missing > 5 * 400_000 - free.free_bytes
    assert f"{caught.value.missing:,} bytes missing" in message
    assert "(5 files to copy)" in message  # counted to the end of the walk, though writing stopped early
    assert sorted(os.listdir(backups)) == ["1"]
    assert first.verified and verify_snapshot(backups / "1") == []


def test_a_later_snapshot_reports_progress_below_the_end_until_it_is_done(live: Path, tmp_path: Path) -> None:
    """Its expected size is the previous snapshot's; here the data doubled since."""
    backups = tmp_path / "b"
    take_snapshot([live], backups / "1", run_id=1)
    (live / "grown").mkdir()
    for n in range(20):
        (live / "grown" / f"{n}.bin").write_bytes(os.urandom(600_000))
    seen: list[tuple[int, int]] = []

    info = take_snapshot(
        [live], backups / "2", backups / "1", run_id=2, progress=lambda done, expected: seen.append((done, expected))
    )

    dones = [done for done, _ in seen]
    assert dones == sorted(dones)
    assert all(done < expected for done, expected in seen[:-1])
    assert seen[-1][0] == seen[-1][1]
    assert info.bytes > 1.5 * seen[-1][1]  # it grew well past the guess


def test_each_data_path_shares_with_its_own_previous_copies(tmp_path: Path) -> None:
    """Two data paths holding the same names, sizes, modes and mtimes with other bytes, all racy (just
    written): each file must be compared with, and linked to, its own data path's previous copy."""
    one, two = tmp_path / "x" / "data", tmp_path / "y" / "data"
    for root in (one, two):
        for n in range(100):
            path = root / f"d{n % 3}" / f"f{n:03d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(2000))
            os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    backups = tmp_path / "b"
    take_snapshot([one, two], backups / "1", run_id=1)

    info = take_snapshot([one, two], backups / "2", backups / "1", run_id=2)

    assert info.shared_files == 200
    for name, live in (("data", one), ("data-2", two)):
        assert tree_digest(backups / "2" / "data" / name, dir_times=False) == tree_digest(live, dir_times=False)
    assert verify_snapshot(backups / "2") == []


def test_the_lines_checked_where_they_landed_are_remembered_exactly_at_byte_edges_and_far_apart() -> None:
    placed = Placed()
    numbers = [2, 7, 8, 9, 15, 16, 1_000_000]
    for number in numbers:
        placed.add(number, "data/d" if number < 100 else "data/d/e")

    assert [n for n in range(-1, 1_000_100) if n in placed] == numbers
    assert 10**9 not in placed
    assert placed.folders == {"data/d": 6, "data/d/e": 1}


def _helpers() -> list[psutil.Process]:
    """This process's link helpers (children running the helper's code)."""
    return [child for child in psutil.Process().children() if "-I" in child.cmdline() and "-S" in child.cmdline()]


def big_tree(root: Path, files: int) -> list[Path]:
    """`files` small files in 60 folders two levels deep, some with names that are not UTF-8 or hold spaces."""
    paths = []
    for n in range(files):
        folder = root / f"d{n % 6}" / f"s{n % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"f {n:05d}.txt" if n % 7 else f"f{n:05d}-\udce9t\udce9.txt"  # Latin-1 bytes, as surrogates
        path = folder / name
        path.write_bytes(b"%d\n" % n * (n % 13))
        paths.append(path)
    return paths


def test_a_large_tree_is_shared_by_the_link_helper_exactly_as_the_walk_would(tmp_path: Path) -> None:
    # Given 3,000 files (enough for the link helper), a first snapshot, and 30 files changed since
    live, backups = tmp_path / "data", tmp_path / "b"
    paths = big_tree(live, 3000)
    take_snapshot([live], backups / "1", run_id=1, now=lambda: time.time() + 10)
    for path in paths[::100]:
        path.write_bytes(b"changed")
    seen: list[int] = []

    def watch() -> None:
        seen.append(len(_helpers()))

    # When the next snapshot runs
    info = take_snapshot([live], backups / "2", backups / "1", run_id=2, checkpoint=watch)

    # Then a helper linked the unchanged files, and the result is what the walk alone makes: the same lines,
    # one inode per unchanged file shared with the previous copy, the changed ones copied, every hash right
    assert max(seen) == 1 and _helpers() == []
    assert (info.shared_files, info.new_files) == (2970, 30)
    changed = {os.fsencode(str(p.relative_to(live))) for p in paths[::100]}
    first, second = file_lines(backups / "1"), file_lines(backups / "2")
    unchanged = [line for line in first if os.fsencode(json.loads(line)["path"]) not in changed]
    assert [line for line in second if os.fsencode(json.loads(line)["path"]) not in changed] == unchanged
    for path in paths[::37]:
        rel = path.relative_to(live)
        copy, previous = backups / "2" / "data" / "data" / rel, backups / "1" / "data" / "data" / rel
        shared = os.fsencode(str(rel)) not in changed
        assert (copy.stat().st_ino == previous.stat().st_ino) is shared, rel
        assert copy.read_bytes() == path.read_bytes()
    assert verify_snapshot(backups / "2") == []


@pytest.mark.parametrize("at", [5, 900, 2500])
def test_a_snapshot_stopped_while_the_helper_links_leaves_no_helper_and_no_partial_folder(
    tmp_path: Path, at: int
) -> None:
    live, backups = tmp_path / "data", tmp_path / "b"
    big_tree(live, 3000)
    take_snapshot([live], backups / "1", run_id=1, now=lambda: time.time() + 10)
    before = tree_digest(backups / "1")
    calls: list[int] = []

    def stop_at() -> None:
        calls.append(1)
        if len(calls) == at:
            raise StepAborted("backup was stopped: the operator asked")

    with pytest.raises(StepAborted):
        take_snapshot([live], backups / "2", backups / "1", run_id=2, checkpoint=stop_at)

    assert _helpers() == []
    assert sorted(os.listdir(backups)) == ["1"]
    assert tree_digest(backups / "1") == before
    assert verify_snapshot(backups / "1") == []


@pytest.mark.parametrize("at", [5, 1500])
def test_a_helper_killed_mid_snapshot_fails_it_cleanly_and_the_next_one_succeeds(tmp_path: Path, at: int) -> None:
    live, backups = tmp_path / "data", tmp_path / "b"
    big_tree(live, 3000)
    take_snapshot([live], backups / "1", run_id=1, now=lambda: time.time() + 10)
    calls: list[int] = []

    def kill_helper_at() -> None:
        calls.append(1)
        if len(calls) == at:
            for helper in _helpers():
                helper.kill()

    with pytest.raises(SnapshotError, match="link helper stopped"):
        take_snapshot([live], backups / "2", backups / "1", run_id=2, checkpoint=kill_helper_at)

    assert sorted(os.listdir(backups)) == ["1"]
    info = take_snapshot([live], backups / "2", backups / "1", run_id=2)
    assert info.shared_files == 3000
    assert verify_snapshot(backups / "2") == []


@pytest.mark.parametrize("helper_code", ["import sys; sys.exit(1)", "import time; time.sleep(60)"])
def test_a_link_helper_that_cannot_start_leaves_the_linking_to_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, helper_code: str
) -> None:
    """A helper that dies at once (a sandbox refusing it) or never answers (0.5 s here): the walk links."""
    live, backups = tmp_path / "data", tmp_path / "b"
    big_tree(live, 2500)
    take_snapshot([live], backups / "1", run_id=1, now=lambda: time.time() + 10)
    monkeypatch.setattr(link_helper, "HELPER", helper_code)
    monkeypatch.setattr(link_helper, "START_SECONDS", 0.5)

    info = take_snapshot([live], backups / "2", backups / "1", run_id=2)

    assert info.shared_files == 2500
    assert verify_snapshot(backups / "2") == []
    assert "the snapshot's link helper did not start" in caplog.text
    assert _helpers() == []
