"""The `prereq` step: can this machine and this platform take this update? (SPEC 5.1)

Each check gives a `Check` with a level: `critical` rejects the run (nothing on
the platform has been touched yet), `notice` is recorded and shown, `ok` says
what was found against what is required. The thresholds come from
`prereq` in the configuration and are raised, never lowered, by the archive's
`requirements`. `dropgate preflight` runs the same checks without a run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import Config
from pipeline.context import StepContext
from pipeline.errors import PrereqFailed
from pipeline.probes import DiskUsage, Probe, SystemProbe
from pipeline.release import installed_version
from pipeline.snapshot import estimate_snapshot, latest_snapshot
from pipeline.versions import upgrade_problem
from states.verify import check_platform

Level = Literal["ok", "notice", "critical"]

GIB = 2**30

# The memory the kernel reports excludes what firmware and the kernel itself
# reserve (2-4 % on a typical VM): an "8 GiB" machine shows about 7.8 GiB.
# Requirements are read as machine sizes, so this share is allowed for.
MEMORY_RESERVED_SHARE = 0.05

HealthCheck = Callable[[Config, "str | None"], list[str]]
BackupEstimate = Callable[[Config], int]


@dataclass(frozen=True)
class Check:
    """One prerequisite: its stable name, its level and a one-line message (found vs required)."""

    name: str
    level: Level
    message: str
    subject: str = ""  # what it is about when there are several (a filesystem's mount point)

    @property
    def title(self) -> str:
        return f"{self.name} {self.subject}" if self.subject else self.name

    def line(self) -> str:
        """How the check reads in a run's history: `critical cpus: 2 cores, at least 4 required`."""
        return f"{self.level} {self.title}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "level": self.level, "subject": self.subject, "message": self.message}


@dataclass(frozen=True)
class Thresholds:
    """The effective thresholds: configuration raised by the archive's requirements."""

    min_cpus: int
    recommended_cpus: int
    min_memory_gib: float
    recommended_memory_gib: float
    min_free_percent: float
    free_bytes: int  # what the archive says the update needs on the platform's filesystem, beyond the release
    free_margin_percent: float
    raised: frozenset[str] = frozenset()  # names the archive raised

    def note(self, name: str) -> str:
        return " (raised by the archive)" if name in self.raised else ""


_REQUIREMENTS = {
    "min_cpus": int,
    "recommended_cpus": int,
    "min_memory_gib": float,
    "recommended_memory_gib": float,
    "min_free_percent": float,
    "free_bytes": int,
}


def effective_thresholds(config: Config, requirements: Mapping[str, Any] | None) -> tuple[Thresholds, list[Check]]:
    """Configuration thresholds raised by `requirements`; notices for requirements that cannot be used."""
    prereq = config.prereq
    values: dict[str, float] = {
        "min_cpus": prereq.min_cpus,
        "recommended_cpus": prereq.recommended_cpus,
        "min_memory_gib": prereq.min_memory_gib,
        "recommended_memory_gib": prereq.recommended_memory_gib,
        "min_free_percent": prereq.min_free_percent,
        "free_bytes": 0,
    }
    raised: set[str] = set()
    problems: list[Check] = []
    for key, wanted in sorted((requirements or {}).items()):
        if key not in _REQUIREMENTS:
            message = f"the archive names an unknown requirement {key!r}; ignored"
            problems.append(Check("requirements", "notice", message))
            continue
        if isinstance(wanted, bool) or not isinstance(wanted, int | float) or wanted < 0:
            message = f"the archive's requirement {key} = {wanted!r} is not a number; ignored"
            problems.append(Check("requirements", "notice", message))
            continue
        if wanted > values[key]:
            values[key] = math.ceil(wanted) if _REQUIREMENTS[key] is int else float(wanted)
            raised.add(key)
    # A raised minimum raises the recommendation with it (never the other way round).
    values["recommended_cpus"] = max(values["recommended_cpus"], values["min_cpus"])
    values["recommended_memory_gib"] = max(values["recommended_memory_gib"], values["min_memory_gib"])
    if "min_cpus" in raised and values["recommended_cpus"] > prereq.recommended_cpus:
        raised.add("recommended_cpus")
    if "min_memory_gib" in raised and values["recommended_memory_gib"] > prereq.recommended_memory_gib:
        raised.add("recommended_memory_gib")
    thresholds = Thresholds(
        min_cpus=int(values["min_cpus"]),
        recommended_cpus=int(values["recommended_cpus"]),
        min_memory_gib=float(values["min_memory_gib"]),
        recommended_memory_gib=float(values["recommended_memory_gib"]),
        min_free_percent=float(values["min_free_percent"]),
        free_bytes=int(values["free_bytes"]),
        free_margin_percent=float(prereq.free_margin_percent),
        raised=frozenset(raised),
    )
    return thresholds, problems


# -- formatting ------------------------------------------------------------


def format_bytes(count: float) -> str:
    """`512 B`, `12.5 KiB`, `3.2 GiB`: binary units, one decimal where it helps."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{_number(value)} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _number(value: float) -> str:
    """`8`, `7.7`, `12.5`: one decimal, none when it is zero."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _percent(value: float) -> str:
    return f"{_number(value)} %"


# -- the machine -----------------------------------------------------------


def check_cpus(probe: Probe, limits: Thresholds) -> Check:
    found = probe.cpu_count()
    wanted = f"at least {limits.min_cpus} required{limits.note('min_cpus')}"
    if found < limits.min_cpus:
        return Check("cpus", "critical", f"{found} CPU cores, {wanted}")
    recommended = f"{limits.recommended_cpus} recommended{limits.note('recommended_cpus')}"
    if found < limits.recommended_cpus:
        return Check("cpus", "notice", f"{found} CPU cores, {recommended} ({limits.min_cpus} required)")
    return Check("cpus", "ok", f"{found} CPU cores ({limits.min_cpus} required, {recommended})")


def check_memory(probe: Probe, limits: Thresholds) -> Check:
    found = probe.memory_bytes()
    shown = f"{_number(found / GIB)} GiB"
    allowance = 1.0 - MEMORY_RESERVED_SHARE
    wanted = f"at least {_number(limits.min_memory_gib)} GiB required{limits.note('min_memory_gib')}"
    if found < limits.min_memory_gib * GIB * allowance:
        return Check("memory", "critical", f"{shown} of memory, {wanted}")
    recommended = f"{_number(limits.recommended_memory_gib)} GiB recommended{limits.note('recommended_memory_gib')}"
    if found < limits.recommended_memory_gib * GIB * allowance:
        return Check("memory", "notice", f"{shown} of memory, {recommended}")
    return Check("memory", "ok", f"{shown} of memory ({_number(limits.min_memory_gib)} GiB required, {recommended})")


# -- the filesystems -------------------------------------------------------


@dataclass
class Filesystem:
    """One filesystem the update touches, the roles it plays, and the bytes the update will write there."""

    usage: DiskUsage
    roles: list[str] = field(default_factory=list)
    needs: dict[str, int] = field(default_factory=dict)  # what → bytes

    @property
    def mount(self) -> str:
        return self.usage.mount

    def needed(self, margin_percent: float) -> int:
        total = sum(self.needs.values())
        return int(total * (1.0 + margin_percent / 100.0)) if total else 0

    def to_dict(self, margin_percent: float) -> dict[str, Any]:
        return {
            "mount": self.mount,
            "roles": list(self.roles),
            "total_bytes": self.usage.total,
            "free_bytes": self.usage.free,
            "free_percent": round(self.usage.free_percent, 1),
            "needs": dict(self.needs),
            "needed_bytes": self.needed(margin_percent),
        }


def touched_paths(config: Config) -> list[tuple[str, Path]]:
    """Every place the update writes to or reads from, with its role."""
    places = [("platform root", config.platform.root)]
    places += [("data", path) for path in config.platform.data]
    places += [("backups", config.paths.backups), ("state", config.paths.state)]
    return places


def plan_filesystems(
    config: Config,
    probe: Probe,
    *,
    release_bytes: int = 0,
    backup_bytes: int = 0,
    spool_bytes: int = 0,
    extra_bytes: int = 0,
) -> list[Filesystem]:
    """The filesystems the update touches (each once), with what it will write on each.

    `release_bytes` go to the platform root's filesystem (staging, then the
    release folder, by rename), `backup_bytes` to the backups', `spool_bytes`
    (the archive, when it is not yet there) to the state folder's, and
    `extra_bytes` (the archive's `free_bytes` requirement) to the platform root's.
    """
    systems: dict[int, Filesystem] = {}
    by_role: dict[str, Filesystem] = {}
    for role, path in touched_paths(config):
        usage = probe.disk_usage(path)
        system = systems.setdefault(usage.device, Filesystem(usage))
        if role not in system.roles:
            system.roles.append(role)
        by_role.setdefault(role, system)
    for role, what, count in (
        ("platform root", "release", release_bytes),
        ("platform root", "archive requirement", extra_bytes),
        ("backups", "backup", backup_bytes),
        ("state", "archive", spool_bytes),
    ):
        if count > 0:
            needs = by_role[role].needs
            needs[what] = needs.get(what, 0) + count
    return list(systems.values())


def check_filesystems(systems: Iterable[Filesystem], limits: Thresholds) -> list[Check]:
    """Free space in percent on each filesystem, and room in bytes for what the update writes there."""
    checks: list[Check] = []
    required = f"{_percent(limits.min_free_percent)} required{limits.note('min_free_percent')}"
    for system in systems:
        usage = system.usage
        roles = ", ".join(system.roles)
        shown = _percent(_floor(usage.free_percent))
        found = f"{shown} free ({format_bytes(usage.free)} of {format_bytes(usage.total)})"
        if usage.free_percent < limits.min_free_percent:
            checks.append(Check("free_space", "critical", f"{found}, {required}; holds {roles}", system.mount))
        else:
            checks.append(Check("free_space", "ok", f"{found}, {required}; holds {roles}", system.mount))
        needed = system.needed(limits.free_margin_percent)
        if not needed:
            continue
        parts = " + ".join(f"{what} {format_bytes(count)}" for what, count in system.needs.items())
        detail = f"{parts} + {_number(limits.free_margin_percent)} % margin"
        if needed > usage.free:
            message = f"needs {format_bytes(needed)} ({detail}), only {format_bytes(usage.free)} free"
            checks.append(Check("disk_needed", "critical", message, system.mount))
            continue
        after = 100.0 * (usage.free - needed) / usage.total if usage.total else 0.0
        message = f"needs {format_bytes(needed)} ({detail}), {format_bytes(usage.free)} free"
        if limits.min_free_percent <= usage.free_percent and after < limits.min_free_percent:
            # Already below: the free_space check says so; this notice is for a filesystem the update tips over.
            message += f"; {_percent(_floor(after))} would be left, below the {_percent(limits.min_free_percent)}"
            checks.append(Check("disk_needed", "notice", message, system.mount))
        else:
            checks.append(Check("disk_needed", "ok", message, system.mount))
    return checks


def _floor(percent: float) -> float:
    """A percentage shown to one decimal, never rounded up past a threshold."""
    return int(percent * 10) / 10


def estimate_backup_bytes(config: Config) -> int:
    """The space the next snapshot needs on the backups filesystem (the backup step's own estimate).

    Files unchanged since the last verified snapshot are shared with it and cost
    nothing; the dumps are counted at the size they had last time. Data paths
    that do not exist are left out (the `data_paths` check reports them).
    """
    previous = latest_snapshot(config.paths.backups)
    sources = [path for path in config.platform.data if os.path.lexists(path)]
    dump_bytes = sum(previous.dumps.values()) if previous is not None else 0
    estimate = estimate_snapshot(sources, previous.path if previous is not None else None, dump_bytes=dump_bytes)
    return estimate.need_bytes


def check_data_paths(config: Config) -> list[Check]:
    """Every configured data path exists (else the backup would fail after the run has started)."""
    missing = [str(path) for path in config.platform.data if not os.path.lexists(path)]
    if missing:
        return [Check("data_paths", "critical", f"missing, the backup would fail: {', '.join(missing)}")]
    if not config.platform.data:
        return [Check("data_paths", "notice", "platform.data is empty: the backup will hold the dumps only")]
    count = len(config.platform.data)
    return [Check("data_paths", "ok", f"{count} data path{'s' if count != 1 else ''} to back up, all present")]


# -- the platform ----------------------------------------------------------


def check_version(config: Config, manifest: Mapping[str, Any] | None) -> Check:
    """The installed version against the archive's minimum (and its own version)."""
    installed = installed_version(config.platform.root)
    current = config.platform.root / "current"
    if manifest is None:
        if installed is None:
            return Check("version", "notice", f"no release is installed ({current} does not exist)")
        return Check("version", "ok", f"{installed} installed")
    target = str(manifest.get("version") or "")
    minimum = manifest.get("min_version")
    try:
        problem = upgrade_problem(installed, target, str(minimum) if minimum else None, root=config.platform.root)
    except ValueError as error:
        return Check("version", "critical", str(error))
    if problem is not None:
        return Check("version", "critical", problem)
    floor = f"needs at least {minimum}" if minimum else "names no minimum"
    return Check("version", "ok", f"{installed} installed, the archive {floor}")


def check_health(config: Config, health: HealthCheck) -> Check:
    """The configured health checks pass on the current release before anything starts."""
    installed = installed_version(config.platform.root)
    if not config.verify.http and not config.verify.commands:
        return Check("health", "notice", "no health checks configured (verify.http, verify.commands): not checked")
    failures = health(config, installed)
    count = len(config.verify.http) + len(config.verify.commands)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        where = f" on {installed}" if installed else ""
        return Check("health", "critical", f"the platform is not healthy{where}: {failures[0]}{more}")
    checks = f"{count} health check{'s' if count != 1 else ''}"
    return Check("health", "ok", f"{checks} pass on {installed or 'the platform'}")


def platform_health(log: Callable[[str], None] = lambda _line: None) -> HealthCheck:
    """The verify step's one pass of every configured check, outside a run (preflight)."""

    def run(config: Config, expected_version: str | None) -> list[str]:
        return check_platform(config, expected_version=expected_version, log=log)

    return run


def step_health(ctx: StepContext) -> HealthCheck:
    """The same pass inside the step: its log, environment, time limit and cancellation."""

    def run(config: Config, expected_version: str | None) -> list[str]:
        return check_platform(
            config,
            expected_version=expected_version,
            log=ctx.log,
            env=ctx.environment(),
            deadline=ctx.deadline,
            cancel=ctx.cancel,
            now=ctx.now,
        )

    return run


# -- all together ----------------------------------------------------------


def manifest_requirements(manifest: Mapping[str, Any] | None) -> Mapping[str, Any]:
    requirements = (manifest or {}).get("requirements") or {}
    return requirements if isinstance(requirements, Mapping) else {}


def release_bytes(manifest: Mapping[str, Any] | None) -> int:
    """The size of the release the archive installs (the sum of its payload files)."""
    manifest = manifest or {}
    files = manifest.get("files")
    if not files:  # the journal's summary form keeps only the total
        return int(manifest.get("unpacked_bytes") or 0)
    return sum(int(entry.get("size", 0)) for entry in files.values() if isinstance(entry, Mapping))


def evaluate(
    config: Config,
    *,
    manifest: Mapping[str, Any] | None = None,
    release_on_disk: bool = False,
    spool_bytes: int = 0,
    probe: Probe | None = None,
    health: HealthCheck | None = None,
    estimate_backup: BackupEstimate = estimate_backup_bytes,
) -> tuple[list[Check], list[Filesystem], Thresholds]:
    """Every machine and platform check, the filesystems with what the update needs there, the thresholds.

    `release_on_disk` says the release is already staged (the step, after
    validate); otherwise the release's size counts as needed on the platform's
    filesystem (preflight). `health` is the one-pass platform check (default:
    the verify step's, run outside a step).
    """
    probe = probe if probe is not None else SystemProbe()
    limits, checks = effective_thresholds(config, manifest_requirements(manifest))
    checks = [check_version(config, manifest), check_cpus(probe, limits), check_memory(probe, limits), *checks]
    systems = plan_filesystems(
        config,
        probe,
        release_bytes=0 if release_on_disk or manifest is None else release_bytes(manifest),
        backup_bytes=estimate_backup(config),
        spool_bytes=spool_bytes,
        extra_bytes=limits.free_bytes,
    )
    checks += check_filesystems(systems, limits)
    checks += check_data_paths(config)
    one_pass = health if health is not None else platform_health()
    checks.append(check_health(config, one_pass))
    return checks, systems, limits


def critical_summary(checks: Iterable[Check]) -> str:
    """All critical checks in one line, for the operator."""
    return "; ".join(f"{check.title}: {check.message}" for check in checks if check.level == "critical")


def run(
    ctx: StepContext,
    *,
    probe: Probe | None = None,
    health: HealthCheck | None = None,
    estimate_backup: BackupEstimate = estimate_backup_bytes,
) -> None:
    """Check the machine and the platform can take this run's update; raise PrereqFailed if not."""
    checks, _systems, _limits = evaluate(
        ctx.config,
        manifest=ctx.facts.get("manifest"),
        release_on_disk=True,
        probe=probe,
        health=health if health is not None else step_health(ctx),
        estimate_backup=estimate_backup,
    )
    checks.append(Check("single_run", "ok", "runs are processed one at a time: this is the only active run"))
    for check in checks:
        ctx.event(check.line())
    ctx.save_facts(prereq_at=ctx.now(), prereq=[check.to_dict() for check in checks])
    summary = critical_summary(checks)
    if summary:
        raise PrereqFailed(f"prerequisites not met: {summary}")
