"""The prerequisites: each threshold's boundary, the archive raising them, the step's verdict.

The machine is presented through an injected probe (a 2-core, 4 GiB, 95 %-full
machine cannot be had here otherwise); the platform, its data and its releases
are real files under tmp_path. Nothing is patched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config, parse_config
from pipeline.context import StepContext
from pipeline.errors import PrereqFailed
from pipeline.probes import DiskUsage
from pipeline.release import release_dir, switch_current
from states import prereq
from states.prereq import GIB, Check, estimate_backup_bytes, evaluate, format_bytes

ROOMY = DiskUsage(total=100 * GIB, free=60 * GIB, device=1, mount="/")


@dataclass
class Machine:
    """The probe the tests inject: the machine they want to present."""

    cpus: int = 8
    memory: int = 16 * GIB
    disks: dict[Path, DiskUsage] = field(default_factory=dict)  # a path and everything under it → its filesystem
    default_disk: DiskUsage = ROOMY

    def cpu_count(self) -> int:
        return self.cpus

    def memory_bytes(self) -> int:
        return self.memory

    def disk_usage(self, path: Path) -> DiskUsage:
        for prefix in sorted(self.disks, key=lambda p: len(p.parts), reverse=True):
            if path == prefix or prefix in path.parents:
                return self.disks[prefix]
        return self.default_disk


def make_site(
    tmp_path: Path,
    *,
    installed: str | None = "3.19.273",
    prereq_section: dict[str, Any] | None = None,
    verify: dict[str, Any] | None = None,
) -> Config:
    root = tmp_path / "platform"
    data = tmp_path / "data"
    (root / "releases").mkdir(parents=True)
    data.mkdir()
    (data / "records.db").write_bytes(b"x" * 4000)
    if installed:
        release = release_dir(root, installed)
        release.mkdir()
        (release / "app.py").write_text("print('hello')\n")
        switch_current(root, release)
    raw: dict[str, Any] = {
        "paths": {"inbox": "inbox", "state": "state", "backups": "backups"},
        "platform": {"product": "gts", "root": "platform", "data": ["data"]},
    }
    if prereq_section:
        raw["prereq"] = prereq_section
    if verify:
        raw["verify"] = verify
    return parse_config(raw, base=tmp_path)


def manifest(version: str = "3.19.274", min_version: str | None = "3.19.0", **requirements: Any) -> dict[str, Any]:
    return {
        "product": "gts",
        "version": version,
        "min_version": min_version,
        "requirements": requirements,
        "files": {"app.py": {"size": 1000, "sha256": "0" * 64, "mode": 0o644}},
    }


def by_name(checks: list[Check], name: str) -> Check:
    found = [check for check in checks if check.name == name]
    assert len(found) == 1, f"expected one {name} check, got {found}"
    return found[0]


def run_checks(config: Config, machine: Machine, man: dict[str, Any] | None = None) -> list[Check]:
    checks, _systems, _limits = evaluate(config, manifest=man, probe=machine, health=None)
    return checks


# -- CPU cores ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "level", "text"),
    [
        (3, "critical", "3 CPU cores, at least 4 required"),
        (4, "notice", "4 CPU cores, 8 recommended (4 required)"),
        (7, "notice", "7 CPU cores, 8 recommended (4 required)"),
        (8, "ok", "8 CPU cores (4 required, 8 recommended)"),
    ],
)
def test_cpu_cores_boundaries(tmp_path: Path, cpus: int, level: str, text: str) -> None:
    # Given a machine with `cpus` cores and the default thresholds
    config = make_site(tmp_path)
    # When the prerequisites are checked
    check = by_name(run_checks(config, Machine(cpus=cpus)), "cpus")
    # Then exactly 4 passes (with a notice below 8) and 3 is critical
    assert (check.level, check.message) == (level, text)


# -- memory ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "level", "text"),
    [
        (4 * GIB, "critical", "4 GiB of memory, at least 8 GiB required"),
        (int(7.5 * GIB), "critical", "7.5 GiB of memory, at least 8 GiB required"),
        (int(7.7 * GIB), "notice", "7.7 GiB of memory, 16 GiB recommended"),  # an "8 GiB" VM after kernel reservations
        (8 * GIB, "notice", "8 GiB of memory, 16 GiB recommended"),
        (16 * GIB, "ok", "16 GiB of memory (8 GiB required, 16 GiB recommended)"),
    ],
)
def test_memory_boundaries(tmp_path: Path, memory: int, level: str, text: str) -> None:
    # Given a machine with `memory` bytes of RAM
    config = make_site(tmp_path)
    # When the prerequisites are checked
    check = by_name(run_checks(config, Machine(memory=memory)), "memory")
    # Then 8 GiB passes with a notice (16 recommended) and 7.5 GiB is critical
    assert (check.level, check.message) == (level, text)


# -- free space --------------------------------------------------------------


@pytest.mark.parametrize(("free_gib", "level"), [(29, "critical"), (30, "ok"), (31, "ok")])
def test_free_percent_boundary(tmp_path: Path, free_gib: int, level: str) -> None:
    # Given every touched folder on one 100 GiB filesystem with `free_gib` free
    config = make_site(tmp_path)
    machine = Machine(default_disk=DiskUsage(total=100 * GIB, free=free_gib * GIB, device=7, mount="/srv"))
    # When the prerequisites are checked
    check = by_name(run_checks(config, machine), "free_space")
    # Then 30 % passes and 29 % is critical, and the one line names the filesystem's roles
    assert check.level == level
    assert check.subject == "/srv"
    assert check.message == (
        f"{free_gib} % free ({free_gib} GiB of 100 GiB), 30 % required; holds platform root, data, backups, state"
    )


def test_each_filesystem_is_checked_once_with_its_roles(tmp_path: Path) -> None:
    # Given the backups on their own, nearly full filesystem and the rest on a roomy one
    config = make_site(tmp_path)
    full = DiskUsage(total=100 * GIB, free=5 * GIB, device=2, mount="/backup")
    machine = Machine(disks={config.paths.backups: full})
    # When the prerequisites are checked
    checks = [c for c in run_checks(config, machine) if c.name == "free_space"]
    # Then each filesystem appears once, the backups' one is critical
    assert [(c.subject, c.level) for c in checks] == [("/", "ok"), ("/backup", "critical")]
    assert checks[0].message.endswith("holds platform root, data, state")
    assert checks[1].message == "5 % free (5 GiB of 100 GiB), 30 % required; holds backups"


def test_backup_that_does_not_fit_is_critical(tmp_path: Path) -> None:
    # Given platform data and a backups filesystem (40 % free) with 40 KiB free
    config = make_site(tmp_path)
    tiny = DiskUsage(total=100 * 1024, free=40 * 1024, device=3, mount="/backup")
    machine = Machine(disks={config.paths.backups: tiny})
    backup = estimate_backup_bytes(config)  # the backup step's own estimate: blocks, folders, manifest
    assert backup * 1.1 > 40 * 1024
    # When the prerequisites are checked
    checks = run_checks(config, machine)
    # Then the backup (plus the margin) is found not to fit
    needed = [c for c in checks if c.name == "disk_needed" and c.subject == "/backup"]
    assert len(needed) == 1
    assert needed[0].level == "critical"
    assert needed[0].message == (
        f"needs {format_bytes(int(backup * 1.1))} (backup {format_bytes(backup)} + 10 % margin), only 40 KiB free"
    )


def test_missing_data_path_is_critical(tmp_path: Path) -> None:
    # Given a configured data path that does not exist
    config = make_site(tmp_path)
    (tmp_path / "data" / "records.db").unlink()
    (tmp_path / "data").rmdir()
    # When the prerequisites are checked
    check = by_name(run_checks(config, Machine()), "data_paths")
    # Then the run would be rejected before the backup could fail
    assert check.level == "critical"
    assert check.message == f"missing, the backup would fail: {tmp_path / 'data'}"


def test_release_size_counts_on_the_platform_filesystem_before_it_is_staged(tmp_path: Path) -> None:
    # Given an archive whose release is 6 GiB and a platform filesystem with 35 GiB of 100 free
    config = make_site(tmp_path)
    man = manifest()
    man["files"] = {"big.bin": {"size": 6 * GIB, "sha256": "0" * 64, "mode": 0o644}}
    platform_fs = DiskUsage(total=100 * GIB, free=35 * GIB, device=4, mount="/opt")
    machine = Machine(disks={config.platform.root: platform_fs})
    # When preflight checks it (release not on disk yet)
    checks, _systems, _limits = evaluate(config, manifest=man, probe=machine, health=None)
    # Then it fits, with a notice that the filesystem would drop below 30 % free
    needed = next(c for c in checks if c.name == "disk_needed" and c.subject == "/opt")
    assert needed.level == "notice"
    assert needed.message.startswith("needs 6.6 GiB (release 6 GiB + 10 % margin), 35 GiB free; 28.4 % would be left")
    # And once the release is staged (the step), it no longer counts
    checks, _systems, _limits = evaluate(config, manifest=man, release_on_disk=True, probe=machine, health=None)
    assert not [c for c in checks if c.name == "disk_needed" and c.subject == "/opt"]


# -- the archive raises thresholds, never lowers them ---------------------------


def test_archive_raises_the_thresholds(tmp_path: Path) -> None:
    # Given a machine that meets the configured defaults (6 cores, 12 GiB, 35 % free)
    config = make_site(tmp_path)
    machine = Machine(cpus=6, memory=12 * GIB, default_disk=DiskUsage(100 * GIB, 35 * GIB, 1, "/"))
    assert by_name(run_checks(config, machine, manifest()), "cpus").level == "notice"
    # When the archive requires 8 cores, 16 GiB and 40 % free
    man = manifest(min_cpus=8, min_memory_gib=16, min_free_percent=40)
    checks = run_checks(config, machine, man)
    # Then each is critical, saying the archive raised it
    assert by_name(checks, "cpus").message == "6 CPU cores, at least 8 required (raised by the archive)"
    assert by_name(checks, "memory").message == "12 GiB of memory, at least 16 GiB required (raised by the archive)"
    assert by_name(checks, "free_space").message.startswith("35 % free (35 GiB of 100 GiB), 40 % required (raised")
    assert {by_name(checks, n).level for n in ("cpus", "memory", "free_space")} == {"critical"}


def test_archive_cannot_lower_the_thresholds(tmp_path: Path) -> None:
    # Given a 3-core, 6 GiB machine, 20 % free
    config = make_site(tmp_path)
    machine = Machine(cpus=3, memory=6 * GIB, default_disk=DiskUsage(100 * GIB, 20 * GIB, 1, "/"))
    # When the archive asks for less than the configuration
    checks = run_checks(config, machine, manifest(min_cpus=2, min_memory_gib=4, min_free_percent=10))
    # Then the configuration's thresholds still apply
    assert by_name(checks, "cpus").message == "3 CPU cores, at least 4 required"
    assert by_name(checks, "memory").message == "6 GiB of memory, at least 8 GiB required"
    assert {by_name(checks, n).level for n in ("cpus", "memory", "free_space")} == {"critical"}


def test_configuration_thresholds_apply(tmp_path: Path) -> None:
    # Given a site configured for 2 cores and 2 GiB minimum
    config = make_site(
        tmp_path,
        prereq_section={"min_cpus": 2, "recommended_cpus": 2, "min_memory_gib": 2, "recommended_memory_gib": 2},
    )
    # When a 2-core 4 GiB machine is checked
    checks = run_checks(config, Machine(cpus=2, memory=4 * GIB))
    # Then both pass
    assert by_name(checks, "cpus").level == "ok"
    assert by_name(checks, "memory").level == "ok"


def test_unknown_or_bad_requirements_are_notices(tmp_path: Path) -> None:
    config = make_site(tmp_path)
    checks = run_checks(config, Machine(), manifest(min_gpus=1, min_cpus="many"))
    notes = sorted(c.message for c in checks if c.name == "requirements")
    assert notes == [
        "the archive names an unknown requirement 'min_gpus'; ignored",
        "the archive's requirement min_cpus = 'many' is not a number; ignored",
    ]
    assert all(c.level == "notice" for c in checks if c.name == "requirements")


def test_archive_free_bytes_requirement_counts_on_the_platform_filesystem(tmp_path: Path) -> None:
    # Given an archive that says it needs 50 GiB free beside its release, and 40 GiB free
    config = make_site(tmp_path)
    machine = Machine(default_disk=DiskUsage(100 * GIB, 40 * GIB, 1, "/"))
    checks, _systems, _limits = evaluate(
        config, manifest=manifest(free_bytes=50 * GIB), release_on_disk=True, probe=machine, health=None
    )
    needed = by_name(checks, "disk_needed")
    assert needed.level == "critical"
    assert needed.message.startswith("needs 55 GiB (archive requirement 50 GiB + backup ")
    assert needed.message.endswith(" + 10 % margin), only 40 GiB free")


# -- versions and health -------------------------------------------------------


@pytest.mark.parametrize(
    ("installed", "man", "level", "text"),
    [
        ("3.19.273", manifest(min_version="3.19.0"), "ok", "3.19.273 installed, the archive needs at least 3.19.0"),
        (
            "3.17.9",
            manifest(min_version="3.18.0"),
            "critical",
            "version 3.19.274 needs at least 3.18.0 installed, found 3.17.9: install the intermediate updates first",
        ),
        (
            "3.9.1",
            manifest(min_version="3.10"),
            "critical",
            "version 3.19.274 needs at least 3.10 installed, found 3.9.1: install the intermediate updates first",
        ),
        ("3.19.274", manifest(), "critical", "version 3.19.274 is already installed (installed: 3.19.274)"),
        (
            None,
            manifest(min_version="3.18.0"),
            "critical",
            "no release is installed under {root} (no `current` link): "
            "run `dropgate init` to adopt the installed platform first",
        ),
        ("3.19.273", None, "ok", "3.19.273 installed"),
        (
            "3.20.0",
            manifest(),
            "critical",
            "downgrade refused: the archive's version 3.19.274 is older than the installed 3.20.0",
        ),
    ],
)
def test_installed_version_against_the_archive(
    tmp_path: Path, installed: str | None, man: dict[str, Any] | None, level: str, text: str
) -> None:
    config = make_site(tmp_path, installed=installed)
    check = by_name(run_checks(config, Machine(), man), "version")
    assert (check.level, check.message) == (level, text.format(root=config.platform.root))


def test_platform_health(tmp_path: Path) -> None:
    # Given no health checks configured: a notice
    config = make_site(tmp_path)
    assert by_name(run_checks(config, Machine()), "health").level == "notice"
    # Given one configured check, failing on the current release
    config = make_site(tmp_path / "b", verify={"commands": [["true"]]})
    seen: list[str | None] = []

    def failing(cfg: Config, expected: str | None) -> list[str]:
        seen.append(expected)
        return ["GET http://localhost/health: 503 (expected 200)", "true: exit 1"]

    checks, _s, _l = evaluate(config, probe=Machine(), health=failing)
    check = by_name(checks, "health")
    assert seen == ["3.19.273"]
    assert check.level == "critical"
    assert check.message == (
        "the platform is not healthy on 3.19.273: GET http://localhost/health: 503 (expected 200) (and 1 more)"
    )
    # And passing
    checks, _s, _l = evaluate(config, probe=Machine(), health=lambda cfg, expected: [])
    assert by_name(checks, "health").message == "1 health check pass on 3.19.273"


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 2**20, 3 * GIB + GIB // 5, 2**41)] == [
        "0 B",
        "1023 B",
        "1 KiB",
        "1.5 KiB",
        "5 MiB",
        "3.2 GiB",
        "2 TiB",
    ]


# -- the step ----------------------------------------------------------------


@dataclass
class Recorder:
    """A reporter that keeps what the step reports, as the journal would."""

    events: list[tuple[str, str]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)

    def event(self, run_id: int, step: str, message: str) -> None:
        self.events.append((step, message))

    def log(self, run_id: int, line: str) -> None:
        self.logs.append(line)

    def progress(self, run_id: int, step: str, ratio: float, message: str | None) -> None:
        pass

    def update_run(self, run_id: int, **fields: Any) -> None:
        self.updates.append(fields)


def snapshot_tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def make_ctx(config: Config, recorder: Recorder, man: dict[str, Any]) -> StepContext:
    return StepContext(
        run_id=7,
        step="prereq",
        archive=Path("/nonexistent/gts.3.19.274.tgz"),
        archive_name="gts.3.19.274.tgz",
        sha256="ab" * 32,
        config=config,
        facts={"manifest": man, "from_version": "3.19.273"},
        reporter=recorder,
        now=lambda: 1_790_000_000.0,
    )


def test_step_rejects_a_small_full_machine_naming_every_critical_check(tmp_path: Path) -> None:
    # Given a 2-core, 4 GiB machine whose filesystem is 95 % full
    config = make_site(tmp_path)
    machine = Machine(cpus=2, memory=4 * GIB, default_disk=DiskUsage(100 * GIB, 5 * GIB, 1, "/"))
    recorder = Recorder()
    before = snapshot_tree(tmp_path)
    # When the prereq step runs
    with pytest.raises(PrereqFailed) as failure:
        prereq.run(make_ctx(config, recorder, manifest()), probe=machine, health=None)
    # Then its one-line reason names every critical check
    message = str(failure.value)
    assert "\n" not in message
    assert message == (
        "prerequisites not met: cpus: 2 CPU cores, at least 4 required; "
        "memory: 4 GiB of memory, at least 8 GiB required; "
        "free_space /: 5 % free (5 GiB of 100 GiB), 30 % required; holds platform root, data, backups, state"
    )
    # And every check, notices too, is in the run's history
    lines = [message for step, message in recorder.events if step == "prereq"]
    assert "critical cpus: 2 CPU cores, at least 4 required" in lines
    assert "notice health: no health checks configured (verify.http, verify.commands): not checked" in lines
    assert "ok single_run: runs are processed one at a time: this is the only active run" in lines
    # And the checks are saved as facts before the failure
    facts = recorder.updates[-1]["facts"]
    assert facts["prereq_at"] == 1_790_000_000.0
    assert {c["name"]: c["level"] for c in facts["prereq"]}["cpus"] == "critical"
    # And nothing on disk changed
    assert snapshot_tree(tmp_path) == before


def test_step_passes_a_machine_that_meets_everything(tmp_path: Path) -> None:
    config = make_site(tmp_path)
    recorder = Recorder()
    prereq.run(make_ctx(config, recorder, manifest()), probe=Machine(), health=None)
    levels = {message.split(" ", 1)[0] for _step, message in recorder.events}
    assert levels <= {"ok", "notice"}
    assert recorder.updates[-1]["facts"]["prereq_at"] == 1_790_000_000.0
