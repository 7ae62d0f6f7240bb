"""The `backup` step and `restore`, without the daemon: a real StepContext, real files, real subprocesses.

The full-disk cases run on a small tmpfs mounted for the test (root only); where
mounting is not permitted they skip (and fail under CI). The same failure path
with an injected write failure is covered in tests/unit/test_snapshot.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import parse_config
from pipeline.context import StepContext
from pipeline.errors import RollbackFailed, StepFailed, StepTimeout
from states import backup
from tests.support import RecordingReporter, fill_filesystem, small_tmpfs, tree_digest


def tree_digest_live(root: Path) -> str:
    """A data tree's fingerprint without folder times (the test's own writes move those)."""
    return tree_digest(root, dir_times=False)


def make_platform(root: Path, *, big: int = 0) -> list[Path]:
    """Two data paths of a platform: uploads (nested, modes, a symlink) and a database folder."""
    uploads, database = root / "uploads", root / "db"
    (uploads / "2026" / "11").mkdir(parents=True)
    database.mkdir(parents=True)
    for n in range(30):
        (uploads / "2026" / "11" / f"doc-{n:02d}.pdf").write_bytes(os.urandom(2000 + n * 100))
    (uploads / "index.json").write_text('{"docs": 30}\n')
    (uploads / "current.pdf").symlink_to("2026/11/doc-00.pdf")
    (database / "base.dat").write_bytes(os.urandom(big or 50_000))
    (database / "base.dat").chmod(0o600)
    database.chmod(0o700)
    return [uploads, database]


def step_context(
    tmp_path: Path, data: list[Path], *, run_id: int = 1, backups: Path | None = None, **sections: Any
) -> tuple[StepContext, RecordingReporter]:
    raw: dict[str, Any] = {
        "paths": {"inbox": "inbox", "state": "state", "backups": str(backups or tmp_path / "backups")},
        "platform": {"product": "gts", "root": "platform", "data": [str(path) for path in data]},
        **sections,
    }
    config = parse_config(raw, base=tmp_path)
    recorder = RecordingReporter()
    ctx = StepContext(
        run_id=run_id,
        step="backup",
        archive=tmp_path / "gts.3.19.274.tgz",
        archive_name="gts.3.19.274.tgz",
        sha256="0" * 64,
        config=config,
        facts={},
        reporter=recorder,
    )
    return ctx, recorder


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs at tmp_path/small, unmounted afterwards (root only)."""
    with small_tmpfs(tmp_path / "small", "4m") as mount:
        yield mount


def test_backup_takes_a_verified_snapshot_with_a_dump_and_records_the_facts(tmp_path: Path) -> None:
    # Given a platform with two data paths and a dump command writing to stdout
    data = make_platform(tmp_path / "platform")
    dump = python_command("import sys\nfor n in range(20000): sys.stdout.write(f'INSERT {n};\\n')")
    ctx, recorder = step_context(tmp_path, data, backup={"dumps": [{"name": "db.sql", "command": dump}]})

    # When the step runs
    backup.run(ctx)

    # Then the snapshot holds both paths and the dump, and the facts say where
    dest = tmp_path / "backups" / "1"
    assert ctx.facts["backup_dir"] == str(dest)
    assert ctx.facts["backup_files"] == 32
    assert recorder.facts["backup_dir"] == str(dest)  # saved through the reporter, survives a crash
    assert tree_digest_live(dest / "data" / "uploads") == tree_digest_live(data[0])
    assert tree_digest_live(dest / "data" / "db") == tree_digest_live(data[1])
    dumped = (dest / "dumps" / "db.sql").read_text()
    assert dumped.startswith("INSERT 0;\n") and dumped.endswith("INSERT 19999;\n")
    assert any(line.startswith("[dump db.sql] $ ") for line in recorder.logs)
    assert recorder.events[0].startswith("snapshot of 2 paths: 32 files, ")
    assert recorder.events[0].endswith(", verified")
    assert recorder.ratios == sorted(recorder.ratios) and recorder.ratios[-1] == 1.0
    # the bar never reads 100 % while the dump is still to run
    assert 1.0 not in recorder.ratios[: recorder.ratios.index(0.9) + 1]


def test_a_second_backup_shares_unchanged_files_and_prunes_beyond_keep(tmp_path: Path) -> None:
    data = make_platform(tmp_path / "platform")
    for run in (1, 2, 3, 4):
        if run == 4:
            (data[0] / "index.json").write_text('{"docs": 31}\n')
        ctx, recorder = step_context(tmp_path, data, run_id=run, backup={"keep": 2})
        ctx.protected_runs = frozenset({1})  # say run 1 was the last successful update
        backup.run(ctx)

    backups = tmp_path / "backups"
    assert sorted(os.listdir(backups)) == ["1", "3", "4"]  # the newest 2, and 1 protected; 2 pruned
    scan = Path("data/uploads/2026/11/doc-05.pdf")
    assert (backups / "1" / scan).stat().st_ino == (backups / "4" / scan).stat().st_ino
    index = Path("data/uploads/index.json")
    assert (backups / "1" / index).stat().st_ino != (backups / "4" / index).stat().st_ino
    assert "31 shared with run 3" in recorder.events[0]
    assert recorder.events[-1] == "pruned the snapshots of run 2"


def assert_short_of_space(message: str, backups: Path, *, more_than: int) -> None:
    """The refusal before writing: it names the backups folder and says how many bytes are missing."""
    assert f"not enough space for the backup in {backups}: " in message
    found = re.search(r", ([\d,]+) bytes missing", message)
    assert found is not None, message
    assert int(found.group(1).replace(",", "")) > more_than


def test_not_enough_space_fails_before_writing_naming_the_path_and_missing_bytes(
    tmp_path: Path, small_fs: Path
) -> None:
    """Real tmpfs of 4 MiB; the data holds 8 MiB."""
    data = make_platform(tmp_path / "platform", big=8 * 2**20)
    before = [tree_digest_live(path) for path in data]
    ctx, _ = step_context(tmp_path, data, backups=small_fs / "backups")

    with pytest.raises(StepFailed) as caught:
        backup.run(ctx)

    message = str(caught.value)
    assert_short_of_space(message, small_fs / "backups", more_than=4 * 2**20)
    assert "\n" not in message
    assert os.listdir(small_fs / "backups") == []
    assert [tree_digest_live(path) for path in data] == before
    assert "backup_dir" not in ctx.facts


def test_a_disk_filled_by_someone_else_during_the_copy_fails_cleanly(tmp_path: Path, small_fs: Path) -> None:
    """Real tmpfs: after the estimate passed, another writer takes the free space; the copy hits ENOSPC."""
    data = make_platform(tmp_path / "platform", big=2 * 2**20)
    before = [tree_digest_live(path) for path in data]
    ctx, _ = step_context(tmp_path, data, backups=small_fs / "backups")

    class FillingContext(StepContext):
        def checkpoint(self) -> None:
            filler = small_fs / "other-writer"
            if not filler.exists():
                fill_filesystem(filler)
            super().checkpoint()

    filling = FillingContext(**{name: getattr(ctx, name) for name in ctx.__dataclass_fields__})

    with pytest.raises(StepFailed) as caught:
        backup.run(filling)

    message = str(caught.value)
    assert f"the backup disk ({small_fs / 'backups'}) filled while copying {data[0]}" in message or (
        f"filled while copying {data[1]}" in message
    )
    assert "more bytes were needed" in message and "the platform was not changed" in message
    assert os.listdir(small_fs / "backups") == []
    assert [tree_digest_live(path) for path in data] == before


def test_a_dump_filling_the_disk_fails_cleanly_naming_the_dump(tmp_path: Path, small_fs: Path) -> None:
    """Real tmpfs: the dump command writes 8 MiB to a 4 MiB filesystem."""
    data = make_platform(tmp_path / "platform")
    dump = python_command("import sys\nfor _ in range(128): sys.stdout.buffer.write(b'x' * 65536)")
    ctx, _ = step_context(
        tmp_path, data, backups=small_fs / "backups", backup={"dumps": [{"name": "db.sql", "command": dump}]}
    )

    with pytest.raises(StepFailed, match=r"the backup disk filled while writing the dump db\.sql"):
        backup.run(ctx)

    assert os.listdir(small_fs / "backups") == []


def test_the_time_limit_stops_the_backup_and_removes_the_partial_snapshot(tmp_path: Path) -> None:
    data = make_platform(tmp_path / "platform")
    ctx, _ = step_context(tmp_path, data)
    ctx.deadline = time.time() - 1

    with pytest.raises(StepTimeout, match="backup ran past its time limit"):
        backup.run(ctx)

    assert os.listdir(tmp_path / "backups") == []


def test_restore_puts_data_and_dumps_back_exactly(tmp_path: Path) -> None:
    # Given a backup with a dump whose restore command reads the dump on stdin
    data = make_platform(tmp_path / "platform")
    restored_db = tmp_path / "restored.sql"
    dumps = [
        {
            "name": "db.sql",
            "command": python_command("print('CREATE TABLE t;')"),
            "restore": python_command(
                f"import sys, shutil; shutil.copyfileobj(sys.stdin, open({str(restored_db)!r}, 'w'))"
            ),
        }
    ]
    ctx, _ = step_context(tmp_path, data, backup={"dumps": dumps})
    expected = [tree_digest_live(path) for path in data]
    backup.run(ctx)
    # When the update changes the data (files rewritten, added, removed, modes)
    (data[0] / "index.json").write_text("migrated")
    (data[0] / "2026" / "11" / "doc-03.pdf").unlink()
    (data[1] / "wal-0001").write_bytes(b"w" * 999)
    (data[1] / "base.dat").chmod(0o644)
    rollback, recorder = step_context(tmp_path, data)
    rollback.facts.update(ctx.facts)
    rollback.config = ctx.config
    rollback.step = "rollback"
    backup.restore(rollback)

    # Then every data path is byte-identical to before the backup, and the dump went to its restore command
    assert [tree_digest_live(path) for path in data] == expected
    assert restored_db.read_text() == "CREATE TABLE t;\n"
    assert any(event.startswith("data restored in ") for event in recorder.events)
    assert recorder.events[-1] == f"dump db.sql restored from {tmp_path / 'backups' / '1' / 'dumps' / 'db.sql'}"
    # and the restore's bar (verify the backup, restore the data, restore the dump) only moved forward
    assert recorder.ratios and recorder.ratios == sorted(recorder.ratios), recorder.ratios


def test_restore_from_a_tampered_snapshot_fails_loudly_and_touches_nothing(tmp_path: Path) -> None:
    data = make_platform(tmp_path / "platform")
    ctx, _ = step_context(tmp_path, data)
    backup.run(ctx)
    (data[0] / "index.json").write_text("migrated")
    changed = [tree_digest_live(path) for path in data]
    tampered = tmp_path / "backups" / "1" / "data" / "db" / "base.dat"
    tampered.write_bytes(b"\0" * tampered.stat().st_size)
    snapshot_before = tree_digest_live(tmp_path / "backups" / "1")

    with pytest.raises(RollbackFailed) as caught:
        backup.restore(ctx)

    assert str(caught.value).startswith(
        f"the backup {tmp_path / 'backups' / '1'} failed verification, no data was restored"
    )
    assert str(tampered) in str(caught.value)
    assert [tree_digest_live(path) for path in data] == changed
    assert tree_digest_live(tmp_path / "backups" / "1") == snapshot_before


def test_restore_fails_loudly_when_a_dump_restore_fails(tmp_path: Path) -> None:
    data = make_platform(tmp_path / "platform")
    dumps = [
        {"name": "db.sql", "command": python_command("print(1)"), "restore": python_command("raise SystemExit(3)")}
    ]
    ctx, _ = step_context(tmp_path, data, backup={"dumps": dumps})
    backup.run(ctx)

    with pytest.raises(
        RollbackFailed, match=r"the dump db\.sql could not be restored from .*: restore db\.sql failed with exit code 3"
    ):
        backup.restore(ctx)


def test_restore_without_a_backup_fails_loudly(tmp_path: Path) -> None:
    ctx, _ = step_context(tmp_path, make_platform(tmp_path / "platform"))
    with pytest.raises(RollbackFailed, match="run 1 has no backup to restore the data from"):
        backup.restore(ctx)


def test_the_backups_command_lists_and_verifies_snapshots(tmp_path: Path) -> None:
    # Given two backups and a configuration file
    data = make_platform(tmp_path / "platform")
    for run in (1, 2):
        ctx, _ = step_context(tmp_path, data, run_id=run)
        backup.run(ctx)
    config = tmp_path / "dropgate.yaml"
    config.write_text(
        json.dumps(
            {
                "paths": {"inbox": "inbox", "state": "state", "backups": "backups"},
                "platform": {"product": "gts", "root": "platform", "data": [str(p) for p in data]},
            }
        )
    )

    def dropgate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", "--config", str(config), *args],
            capture_output=True,
            text=True,
            check=False,
        )

    # When listing, Then both show, newest first, verified
    listing = dropgate("backups")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["RUN", "TAKEN", "SIZE", "WRITTEN", "FILES", "SHARED", "VERIFIED"]
    assert [line.split()[0] for line in lines[1:]] == ["2", "1"]
    assert all(" yes, " in line for line in lines[1:])
    as_json = json.loads(dropgate("backups", "--json").stdout)
    assert [(item["run"], item["files"], item["verified"]) for item in as_json] == [(2, 32, True), (1, 32, True)]
    assert as_json[0]["shared_files"] == 32

    # When a file of snapshot 1 is tampered with, Then `backups verify 1` says which and exits 1
    assert dropgate("backups", "verify", "1").returncode == 0
    (tmp_path / "backups" / "1" / "data" / "uploads" / "index.json").write_text('{"docs": 99}\n')
    checked = dropgate("backups", "verify", "1")
    assert checked.returncode == 1
    assert "index.json: " in checked.stdout and "FAILED verification" in checked.stdout
    assert "FAILED (" in dropgate("backups").stdout
    missing = dropgate("backups", "verify", "7")
    assert missing.returncode == 1 and "no complete snapshot of run 7" in missing.stderr


def test_a_dumps_own_progress_fills_its_share_and_the_bar_never_goes_back(tmp_path: Path) -> None:
    # Given two dumps that report their own progress on DROPGATE_PROGRESS_FD (the second one backwards)
    data = make_platform(tmp_path / "platform")
    report = (
        "import os, sys\n"
        "fd = int(os.environ['DROPGATE_PROGRESS_FD'])\n"
        "for ratio in sys.argv[1:]:\n"
        "    os.write(fd, ('{\"progress\": %s}\\n' % ratio).encode())\n"
        "print('dump content')\n"
    )
    dumps = [
        {"name": "db", "command": [sys.executable, "-c", report, "0.5", "1.0"]},
        {"name": "search", "command": [sys.executable, "-c", report, "1.0", "0.2"]},
    ]
    ctx, recorder = step_context(tmp_path, data, backup={"dumps": dumps})

    # When the backup runs
    backup.run(ctx)

    # Then the bar only moved forward and ended full
    ratios = recorder.ratios
    assert ratios == sorted(ratios), ratios
    assert ratios[-1] == 1.0
    # and each dump's own 0..1 filled only its part of the last 10 % (after the data copy)
    share = (1.0 - backup.DATA_SHARE) / 2
    assert backup.DATA_SHARE + 0.5 * share in [pytest.approx(r) for r in ratios]
    assert backup.DATA_SHARE + share in [pytest.approx(r) for r in ratios]
    assert max(r for r in ratios if r < 1.0) <= backup.DATA_SHARE + 2 * share + 1e-9
    assert (Path(ctx.facts["backup_dir"]) / "dumps" / "db").read_text() == "dump content\n"
def many_empty_files(root: Path, count: int) -> list[Path]:
    """A data path whose manifest is large while its files take no space: `count` empty files, long names."""
    root.mkdir(parents=True)
    for n in range(count):
        (root / f"{n:05d}-{'x' * 200}").touch()
    return [root]


class FillingAt(StepContext):
    """A step context whose checkpoint lets another writer take the backup disk's space once `when()` holds."""

    when: Any = None
    filler: Path | None = None

    def checkpoint(self) -> None:
        if self.filler is not None and not self.filler.exists() and self.when():
            fill_filesystem(self.filler)
        super().checkpoint()


def filling(ctx: StepContext, filler: Path, when: Any) -> FillingAt:
    wrapped = FillingAt(**{name: getattr(ctx, name) for name in ctx.__dataclass_fields__})
    wrapped.filler, wrapped.when = filler, when
    return wrapped


def test_a_disk_filling_while_the_manifest_is_written_names_it_and_the_bytes(tmp_path: Path, small_fs: Path) -> None:
    """Real tmpfs: 3,000 empty files (no data to copy, about 1.4 MB of manifest); another writer takes the
    space as the walk begins, so the manifest is what cannot be written."""
    data = many_empty_files(tmp_path / "platform" / "uploads", 3000)
    backups = small_fs / "backups"
    ctx, _ = step_context(tmp_path, data, backups=backups)
    ctx = filling(ctx, small_fs / "other-writer", lambda: True)

    with pytest.raises(StepFailed) as caught:
        backup.run(ctx)

    message = str(caught.value)
    manifest = backups / ".1.partial" / "manifest.jsonl"
    assert message.startswith(
        f"backup: the backup disk ({backups}) filled while writing the snapshot's manifest {manifest}: "
    )
    found = re.search(
        r"about ([\d,]+) more bytes were needed \(([\d.]+ [KM]iB) still to write, ([\d.]+ [KMG]?i?B) free\)", message
    )
    assert found is not None, message
    assert int(found.group(1).replace(",", "")) > 0
    assert "the platform was not changed" in message and "\n" not in message
    assert str(backups / "1") + ":" not in message  # never the folder that was never made
    assert os.listdir(backups) == []


def test_a_disk_filling_before_the_summary_is_written_names_it_and_the_bytes(tmp_path: Path, small_fs: Path) -> None:
    """Real tmpfs: the data and the manifest are written; another writer takes the space as the snapshot is
    checked, so the summary (snapshot.json) is what cannot be written."""
    data = make_platform(tmp_path / "platform")
    backups = small_fs / "backups"
    manifest = backups / ".1.partial" / "manifest.jsonl"
    ctx, _ = step_context(tmp_path, data, backups=backups)

    def manifest_written() -> bool:
        return manifest.exists() and manifest.stat().st_size > 0

    ctx = filling(ctx, small_fs / "other-writer", manifest_written)

    with pytest.raises(StepFailed) as caught:
        backup.run(ctx)

    message = str(caught.value)
    summary = backups / ".1.partial" / "snapshot.json"
    assert f"the backup disk ({backups}) filled while writing the snapshot's summary {summary}: about " in message
    found = re.search(r"about ([\d,]+) more bytes were needed \(([\d.]+ [KM]?i?B) still to write, 0 B free\)", message)
    assert found is not None, message
    assert int(found.group(1).replace(",", "")) > 100  # the summary's own size at least
    assert os.listdir(backups) == []
    assert "backup_dir" not in ctx.facts


@pytest.mark.parametrize("size", ["256k", "1m"])
def test_a_backup_disk_too_small_for_the_manifest_is_refused_before_writing(tmp_path: Path, size: str) -> None:
    """Real tmpfs smaller than the manifest of 3,000 long names: the estimate counts manifest lines by
    their length, so this is refused up front, naming the folder and the missing bytes."""
    data = many_empty_files(tmp_path / "platform" / "uploads", 3000)
    with small_tmpfs(tmp_path / "tiny", size) as mount:
        ctx, _ = step_context(tmp_path, data, backups=mount / "backups")

        with pytest.raises(
            StepFailed, match=rf"not enough space for the backup in {mount / 'backups'}: .* bytes missing"
        ):
            backup.run(ctx)

        assert os.listdir(mount / "backups") == []


def test_a_later_backup_that_no_longer_fits_stops_before_the_disk_is_full(tmp_path: Path, small_fs: Path) -> None:
    """Real tmpfs of 4 MiB: the first backup fits; then the data grows by 8 MiB. The second backup (which
    counts its need as it walks) stops writing before it would fill the disk, and says the whole need."""
    data = make_platform(tmp_path / "platform")
    backups = small_fs / "backups"
    first, _ = step_context(tmp_path, data, run_id=1, backups=backups)
    backup.run(first)
    (data[1] / "grown.dat").write_bytes(os.urandom(8 * 2**20))
    second, _ = step_context(tmp_path, data, run_id=2, backups=backups)

    with pytest.raises(StepFailed) as caught:
        backup.run(second)

    message = str(caught.value)
    assert_short_of_space(message, backups, more_than=4 * 2**20)
    assert "filled while" not in message  # it never wrote until the disk was full
    assert sorted(os.listdir(backups)) == ["1"]
