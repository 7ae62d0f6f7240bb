"""A finished import or download enters the inbox under its name, never over another entry (real files)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pipeline.inbox import arrival
from pipeline.inbox.arrival import move_in


def _occupy(target: Path, kind: str) -> None:
    if kind == "file":
        target.write_bytes(b"someone else's upload")
    elif kind == "folder":
        target.mkdir()
    elif kind == "symlink":
        (target.parent / "elsewhere").write_bytes(b"x")
        target.symlink_to("elsewhere")
    elif kind == "dangling symlink":
        target.symlink_to("nothing-here")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        raise AssertionError(kind)


@pytest.fixture(params=["renameat2", "link-then-unlink"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of moving in. A filesystem without RENAME_NOREPLACE cannot be mounted here: its absence is
    simulated by hiding the libc function, so the fallback runs on the same real files."""
    if request.param == "link-then-unlink":
        monkeypatch.setattr(arrival, "_renameat2", lambda: None)
    return str(request.param)


def test_a_finished_file_is_renamed_in_whole(tmp_path: Path, way: str) -> None:
    part, target = tmp_path / "gts-2.5.0.dgu.part", tmp_path / "gts-2.5.0.dgu"
    part.write_bytes(b"archive bytes")

    move_in(part, target)

    assert target.read_bytes() == b"archive bytes"
    assert not part.exists()
    assert target.stat().st_nlink == 1


@pytest.mark.parametrize("kind", ["file", "folder", "symlink", "dangling symlink", "fifo"])
def test_a_name_taken_meanwhile_is_never_replaced_and_the_finished_file_stays(
    tmp_path: Path, way: str, kind: str
) -> None:
    part, target = tmp_path / "gts-2.5.0.dgu.part", tmp_path / "gts-2.5.0.dgu"
    part.write_bytes(b"archive bytes")
    _occupy(target, kind)
    before = os.lstat(target)

    with pytest.raises(FileExistsError):
        move_in(part, target)

    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert part.read_bytes() == b"archive bytes"
    if kind == "file":
        assert target.read_bytes() == b"someone else's upload"


def test_of_many_finishing_at_once_under_one_name_exactly_one_gets_in_and_the_others_keep_their_files(
    tmp_path: Path, way: str
) -> None:
    target = tmp_path / "gts-2.5.0.dgu"
    parts = [tmp_path / f"upload-{n}.part" for n in range(16)]
    for n, part in enumerate(parts):
        part.write_bytes(f"upload {n}".encode())
    start = threading.Barrier(len(parts))
    outcomes: dict[int, str] = {}

    def finish(n: int) -> None:
        start.wait()
        try:
            move_in(parts[n], target)
            outcomes[n] = "in"
        except FileExistsError:
            outcomes[n] = "refused"

    threads = [threading.Thread(target=finish, args=(n,)) for n in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    winners = [n for n, outcome in outcomes.items() if outcome == "in"]
    assert len(outcomes) == len(parts) and len(winners) == 1
    assert target.read_bytes() == f"upload {winners[0]}".encode()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".part") == sorted(
        parts[n].name for n in outcomes if n not in winners
    )
