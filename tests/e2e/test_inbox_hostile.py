"""A hostile uploader against the real daemon: links, FIFOs, hard links, held descriptors, sparse giants.

The uploader here is this test acting on the inbox folder directly, as an
account with a shell (or an sshd without the drop-in's `-P` restrictions)
could. Every case checks what the operator sees: the run, its reason, the
evidence kept under state/rejected, and that the daemon keeps taking other
files and stops on SIGTERM.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Site, cannot_run, wait_for


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def runs_by_archive(site: Site) -> dict[str, dict[str, object]]:
    return {str(run["archive"]): run for run in site.history()}


def wait_run_for(site: Site, name: str, timeout: float = 60.0) -> dict[str, object]:
    def found() -> dict[str, object] | None:
        run = runs_by_archive(site).get(name)
        return run if run is not None and run["outcome"] else None

    return dict(wait_for(found, timeout=timeout, what=f"a finished run for {name}"))


def prove_alive(site: Site, marker: str) -> None:
    """The daemon still takes files: a fresh one becomes a run."""
    site.drop(f"proof of life {marker}".encode(), marker)
    wait_run_for(site, marker)


# -- links and special files -----------------------------------------------------------------
LINK_TARGETS = {
    "/dev/zero": lambda root: Path("/dev/zero"),
    "a FIFO": lambda root: _fifo(root / "outside.fifo"),
    "a huge sparse file": lambda root: _sparse(root / "huge.bin", 20 * 2**30),
    "nothing (dangling)": lambda root: root / "does-not-exist",
}


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


@pytest.mark.parametrize("target", sorted(LINK_TARGETS))
def test_a_symbolic_link_is_refused_naming_its_target_and_kept_aside(site: Site, target: str) -> None:
    # Given a running daemon
    site.start_daemon()
    pointed = LINK_TARGETS[target](site.root)
    # When an uploader drops a link under an archive's name
    os.symlink(pointed, site.inbox / "gts.1.2.tgz")
    run = wait_run_for(site, "gts.1.2.tgz")
    # Then it is refused for what it is, naming where it points
    assert run["outcome"] == "rejected"
    assert run["error"] == f"gts.1.2.tgz is a symbolic link to {pointed}; only regular files are taken"
    assert run["sha256"] is None
    # and the link itself is the evidence, kept where the journal says
    kept = Path(str(run["path"]))
    assert kept == site.state / "rejected" / f"{run['id']}-gts.1.2.tgz"
    assert kept.is_symlink() and os.readlink(kept) == str(pointed)
    assert kept.with_name(kept.name + ".reason").read_text().strip() == run["error"]
    prove_alive(site, "after-link")


def test_a_link_target_with_control_characters_is_escaped_in_the_reason(site: Site) -> None:
    site.start_daemon()
    os.symlink("/tmp/evil\n\x1b[31mred\x7f", site.inbox / "gts.1.3.tgz")
    run = wait_run_for(site, "gts.1.3.tgz")
    escaped = "/tmp/evil\\x0a\\x1b[31mred\\x7f"
    assert run["error"] == f"gts.1.3.tgz is a symbolic link to {escaped}; only regular files are taken"


@pytest.mark.parametrize("kind", ["fifo", "hard link to a fifo", "socket", "folder"])
def test_a_special_file_is_refused_without_being_opened(site: Site, kind: str) -> None:
    site.start_daemon()
    name = "gts.2.0.tgz"
    where = site.inbox / name
    if kind == "fifo":
        os.mkfifo(where)
        expected = "a named pipe (FIFO)"
    elif kind == "hard link to a fifo":
        os.mkfifo(site.root / "pipe")
        os.link(site.root / "pipe", where)
        expected = "a named pipe (FIFO)"
    elif kind == "socket":
        import socket

        server = socket.socket(socket.AF_UNIX)
        server.bind(str(where))
        server.close()
        expected = "a socket"
    else:
        where.mkdir()
        (where / "inside.txt").write_text("a folder's content")
        expected = "a folder"
    run = wait_run_for(site, name)
    assert run["error"] == f"{name} is {expected}; only regular files are taken"
    assert Path(str(run["path"])).exists() or Path(str(run["path"])).is_symlink()
    prove_alive(site, f"after-{kind.replace(' ', '-')}")


def test_names_swapped_between_files_fifos_and_links_never_block_the_inbox_or_sigterm(site: Site) -> None:
    # Given a running daemon with a short settle time
    daemon = site.start_daemon()
    name = "gts.3.0.tgz"
    os.mkfifo(site.root / "pipe")
    # When an uploader keeps replacing one name with a regular file, a FIFO and links, for a while
    swaps = 0
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        kind = swaps % 4
        temp = site.inbox / f".swap{swaps}"
        if kind == 0:
            temp.write_bytes(b"regular bytes %d" % swaps)
        elif kind == 1:
            os.mkfifo(temp)
        elif kind == 2:
            os.symlink("/dev/zero", temp)
        else:
            os.symlink(site.root / "pipe", temp)
        os.rename(temp, site.inbox / name)
        swaps += 1
        time.sleep(0.02)
    # Then the daemon still takes other files
    prove_alive(site, "after-swaps")
    # and everything it took under that name is a run with a reason, none open on a FIFO or a device
    wait_for(lambda: not os.path.lexists(site.inbox / name), what="the last swap taken")
    wait_for(lambda: all(run["outcome"] for run in site.history()), what="every run to finish")
    runs = [run for run in site.history() if run["archive"] == name]
    assert runs
    for run in runs:
        assert run["outcome"] == "rejected"
        error = str(run["error"])
        regular = run["sha256"] is not None
        assert regular or "only regular files are taken" in error, error
        if regular:  # taken as a file: what it hashed is what it kept
            assert sha(Path(str(run["path"])).read_bytes()) == run["sha256"]
    # and SIGTERM ends it
    assert daemon.stop(timeout=20) == 0, daemon.output()[-3000:]


# -- hard links and held descriptors: a taken archive belongs to dropgate ---------------------------
def test_a_file_with_a_second_name_is_copied_and_writing_that_name_later_changes_nothing(site: Site) -> None:
    site.start_daemon()
    original = b"the bytes that were uploaded " * 1000
    second = site.root / "second-name.tgz"  # the uploader's other name, same filesystem
    second.write_bytes(original)
    os.link(second, site.inbox / "gts.4.0.tgz")
    run = dict(wait_for(lambda: runs_by_archive(site).get("gts.4.0.tgz"), what="the run"))
    # When the uploader rewrites the file through its other name after the take
    with open(second, "r+b") as handle:
        handle.write(b"EVIL" * 100)
    done = wait_run_for(site, "gts.4.0.tgz")
    # Then the run hashed and kept the bytes that were uploaded, in a file of dropgate's own
    assert run["sha256"] == sha(original)
    kept = Path(str(done["path"]))
    assert kept.read_bytes() == original
    assert kept.stat().st_ino != second.stat().st_ino
    assert kept.stat().st_nlink == 1
    assert oct(kept.stat().st_mode & 0o7777) == "0o640"
    events = site.show(int(str(run["id"])))["events"]
    assert any("copied into a file of dropgate's own: it has 2 names (hard links)" in e["message"] for e in events)


def _writer(path: Path, data: bytes) -> subprocess.Popen[bytes]:
    """A separate process that writes `data` into `path` and holds it open until its stdin closes."""
    code = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
        "os.write(fd, sys.stdin.buffer.read(int(sys.argv[2])))\n"
        "print('written', flush=True)\n"
        "sys.stdin.buffer.read()\n"
        "os.close(fd)\n"
    )

    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path), str(len(data))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(data)
    proc.stdin.flush()
    assert proc.stdout.readline() == b"written\n"
    return proc


def test_a_file_held_open_for_writing_is_not_taken_until_its_writer_closes_it(site: Site) -> None:
    site.start_daemon()
    target = site.inbox / "gts.5.0.tgz"
    writer = _writer(target, b"complete-looking bytes, but the writer is still there")
    try:
        # Given other files taken meanwhile (the daemon looked many times, well past the settle time)
        for number in range(3):
            prove_alive(site, f"meanwhile-{number}")
        # Then the held file is still where it was
        assert target.exists()
        assert "gts.5.0.tgz" not in runs_by_archive(site)
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=30)
    # When the writer closes it, it is taken
    run = wait_run_for(site, "gts.5.0.tgz")
    assert run["sha256"] == sha(b"complete-looking bytes, but the writer is still there")


def test_a_taken_file_of_an_upload_account_becomes_the_daemons(site: Site) -> None:
    if os.geteuid() != 0:
        cannot_run("needs root to give the upload a second account's owner")
    nobody = 65534
    site.start_daemon()
    data = b"uploaded by another account " * 100
    upload = site.root / ".upload"
    upload.write_bytes(data)
    os.chown(upload, nobody, nobody)
    upload.chmod(0o666)  # writable by anyone: the worst an uploader's umask can do
    os.rename(upload, site.inbox / "gts.6.0.tgz")
    run = wait_run_for(site, "gts.6.0.tgz")
    # Then the kept file is the daemon's, mode 0640, group the state folder's: no upload account can write it
    info = Path(str(run["path"])).stat()
    assert (info.st_uid, info.st_gid, oct(info.st_mode & 0o7777)) == (0, site.state.stat().st_gid, "0o640")
    assert Path(str(run["path"])).read_bytes() == data
    assert run["sha256"] == sha(data)


# -- size before a byte is read ---------------------------------------------------------------
def test_a_sparse_file_above_the_limit_is_refused_at_once_and_others_are_taken_meanwhile(site: Site) -> None:
    site.start_daemon()
    _sparse(site.inbox / "gts.9.0.tgz", 9 * 2**30)
    site.drop(b"a small neighbour", "small.bin")
    run = wait_run_for(site, "gts.9.0.tgz")
    assert run["error"] == (
        "gts.9.0.tgz is 9663676416 bytes, above limits.max_archive_bytes (8589934592); "
        "it was refused before any of it was read"
    )
    assert run["sha256"] is None
    kept = Path(str(run["path"]))
    assert kept.stat().st_size == 9 * 2**30 and kept.stat().st_blocks == 0  # kept as it came, still sparse
    wait_run_for(site, "small.bin")


@pytest.mark.parametrize(("size", "taken"), [(4095, True), (4096, True), (4097, False)])
def test_the_size_limit_is_exact(site: Site, size: int, taken: bool) -> None:
    site.write_config(limits={"max_archive_bytes": 4096})
    site.start_daemon()
    site.drop(os.urandom(size), "gts.7.0.tgz")
    run = wait_run_for(site, "gts.7.0.tgz")
    assert (run["sha256"] is not None) is taken
    if not taken:
        assert "above limits.max_archive_bytes (4096)" in str(run["error"])


def test_a_file_longer_than_it_announces_is_refused_before_it_is_read(site: Site) -> None:
    archive = site.pack("1.0.1")
    data = archive.read_bytes()
    site.start_daemon()
    _sparse(site.root / "long.tgz", 3 * 2**30)
    with open(site.root / "long.tgz", "r+b") as handle:
        handle.write(data)
    os.rename(site.root / "long.tgz", site.inbox / "gts.1.0.1.tgz")
    run = wait_run_for(site, "gts.1.0.1.tgz")
    assert run["error"] == (
        f"gts.1.0.1.tgz is {3 * 2**30} bytes but its manifest announces {len(data)}: data was appended to it"
    )
    assert run["sha256"] is None


def test_hashing_a_huge_file_does_not_stop_others_being_taken_and_sigterm_interrupts_it(site: Site) -> None:
    # Given a daemon whose limit lets a 48 GiB (sparse) file through to hashing
    site.write_config(limits={"max_archive_bytes": 64 * 2**30})
    daemon = site.start_daemon()
    _sparse(site.root / "big.bin", 48 * 2**30)
    os.rename(site.root / "big.bin", site.inbox / "big.bin")
    wait_for(lambda: not (site.inbox / "big.bin").exists(), what="the big file to be taken")
    # When a small file arrives while the big one is being hashed
    site.drop(b"small and quick", "small.bin")
    # Then the small one is taken too (out of the inbox), and neither is a run yet: the big one came first
    wait_for(lambda: not (site.inbox / "small.bin").exists(), what="the small file to be taken meanwhile")
    assert site.history() == []
    intake = sorted(path.name for path in (site.state / "intake").glob("*/*"))
    assert intake == ["big.bin", "small.bin"]
    # and SIGTERM ends the daemon although hashing is under way
    assert daemon.stop(timeout=20) == 0, daemon.output()[-3000:]
    assert site.history() == []
    # When it starts again, it finishes both intakes, in the order they arrived
    site.start_daemon()
    runs = wait_for(lambda: (h := site.history()) and len(h) == 2 and h, timeout=300, what="both runs")
    by_id = sorted(runs, key=lambda run: int(str(run["id"])))
    assert [run["archive"] for run in by_id] == ["big.bin", "small.bin"]
    assert by_id[1]["sha256"] == sha(b"small and quick")
    assert list((site.state / "intake").iterdir()) == []


def test_sigterm_ends_the_daemon_while_a_slow_writer_and_a_fifo_sit_in_the_inbox(site: Site) -> None:
    daemon = site.start_daemon()
    os.mkfifo(site.inbox / "pipe.tgz")
    writer = _writer(site.inbox / "slow.tgz", b"slow upload")
    try:
        wait_run_for(site, "pipe.tgz")
        assert daemon.stop(timeout=20) == 0, daemon.output()[-3000:]
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=30)


# -- the same bytes twice ----------------------------------------------------------------------
@pytest.mark.parametrize("copies", [2, 5])
def test_the_same_bytes_dropped_several_times_at_once_run_once(site: Site, copies: int) -> None:
    # Given the bytes of one signed archive under its own name and under other names, dropped at once
    archive = site.pack("1.0.1")
    data = archive.read_bytes()
    names = ["gts.1.0.1.tgz", *(f"gts.1.0.1-copy{number}.tgz" for number in range(copies - 1))]
    for name in names:
        (site.root / f".{name}").write_bytes(data)
    site.start_daemon()
    for name in names:
        os.rename(site.root / f".{name}", site.inbox / name)
    runs = wait_for(
        lambda: (h := site.history()) and len(h) == copies and all(r["outcome"] for r in h) and h,
        timeout=120,
        what="every copy to end as a run",
    )
    # Then they run once: only the copy whose name fits the signed manifest is installed; the others
    # are rejected for their names (which judged the name, not the bytes: see test_misnamed_copies.py)
    assert [run["archive"] for run in runs if run["outcome"] == "succeeded"] == ["gts.1.0.1.tgz"]
    for run in runs:
        if run["archive"] != "gts.1.0.1.tgz":
            assert run["outcome"] == "rejected" and "(renamed archive?)" in str(run["error"]), run["error"]
    assert all(run["sha256"] == sha(data) for run in runs)


def test_killing_the_daemon_while_it_takes_files_loses_nothing_and_runs_nothing_unscreened(site: Site) -> None:
    # Given files of a few MiB each dropped while the daemon is killed and started again, and again
    contents = {f"file{number:02d}.bin": os.urandom(3 * 2**20) + bytes([number]) for number in range(12)}
    for name, data in contents.items():
        (site.root / f".{name}").write_bytes(data)
    daemon = site.start_daemon()
    for round_number, names in enumerate((list(contents)[:4], list(contents)[4:8], list(contents)[8:])):
        for name in names:
            os.rename(site.root / f".{name}", site.inbox / name)
        time.sleep(0.3 * round_number)  # kill at a different moment of the intake each round
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(timeout=30)
        daemon = site.start_daemon()
    # Then every file ends as exactly one run, hashed, with the bytes it was dropped with
    runs = wait_for(
        lambda: (h := site.history()) and len(h) >= len(contents) and all(r["outcome"] for r in h) and h,
        timeout=180,
        what="every file to end as a run",
    )
    assert sorted(str(run["archive"]) for run in runs) == sorted(contents)
    for run in runs:
        assert run["sha256"] == sha(contents[str(run["archive"])])
        assert Path(str(run["path"])).read_bytes() == contents[str(run["archive"])]
    assert list((site.state / "intake").iterdir()) == []
    assert list(site.inbox.iterdir()) == []
