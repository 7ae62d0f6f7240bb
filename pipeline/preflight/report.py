"""The whole report: every check of the `prereq` step, the gate and the daemon, and the preview."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import JournalError, JournalMissing
from pipeline.evidence import site_evidence
from pipeline.preflight.preview import Preview, preview_archive
from pipeline.probes import Probe
from pipeline.release import installed_version
from pipeline.report import daemon_pid, open_journal
from states.prereq import (
    BackupEstimate,
    Check,
    Filesystem,
    HealthCheck,
    Thresholds,
    estimate_backup_bytes,
    evaluate,
    platform_health,
)


@dataclass
class Report:
    config: Config
    checks: list[Check]
    systems: list[Filesystem]
    limits: Thresholds
    installed: str | None
    preview: Preview | None = None

    @property
    def critical(self) -> list[Check]:
        return [c for c in self.checks if c.level == "critical"]

    def counts(self) -> dict[str, int]:
        return {level: sum(1 for c in self.checks if c.level == level) for level in ("ok", "notice", "critical")}

    def to_dict(self) -> dict[str, Any]:
        limits = self.limits
        return {
            "ok": not self.critical,
            "counts": self.counts(),
            "installed_version": self.installed,
            "checks": [c.to_dict() for c in self.checks],
            "thresholds": {
                "min_cpus": limits.min_cpus,
                "recommended_cpus": limits.recommended_cpus,
                "min_memory_gib": limits.min_memory_gib,
                "recommended_memory_gib": limits.recommended_memory_gib,
                "min_free_percent": limits.min_free_percent,
                "free_bytes": limits.free_bytes,
                "free_margin_percent": limits.free_margin_percent,
                "raised_by_archive": sorted(limits.raised),
            },
            "filesystems": [s.to_dict(limits.free_margin_percent) for s in self.systems],
            "update": self.preview.to_dict() if self.preview is not None else None,
        }


def check_gate(config: Config) -> list[Check]:
    """The gate and the daemon, read-only from the journal and the lock."""
    checks: list[Check] = []
    try:
        journal = open_journal(config)
    except JournalMissing as error:
        journal = None
        if site_evidence(config):  # the journal was lost: the gate's state is unknown
            checks.append(Check("gate", "critical", str(error)))
    except JournalError as error:
        return [Check("gate", "notice", f"cannot read the journal: {error}")]
    if journal is None:
        if not checks:
            checks.append(Check("gate", "ok", "no run recorded yet"))
    else:
        try:
            blocking, unfinished = journal.blocking(), journal.unfinished()
        except JournalError as error:
            blocking, unfinished = [], []
            checks.append(Check("gate", "notice", f"cannot read the journal: {error}"))
        finally:
            journal.close()
        for run in blocking:
            message = f"blocked by run {run.id} ({run.outcome}): nothing runs until `dropgate resolve {run.id}`"
            checks.append(Check("gate", "critical", message))
        for run in unfinished:
            message = f"run {run.id} ({run.archive}) is in {run.step}: a new archive waits its turn"
            checks.append(Check("gate", "notice", message))
        if not checks:
            checks.append(Check("gate", "ok", "open: no run is active and none blocks"))
    pid = daemon_pid(config.paths.state)
    if pid is None:
        checks.append(Check("daemon", "notice", "not running: a dropped archive waits until it starts"))
    else:
        checks.append(Check("daemon", "ok", f"running (pid {pid})" if pid > 0 else "running"))
    return checks


ArchiveReader = Callable[[Config, Path, Path], dict[str, Any]]


def build_report(
    config: Config,
    archive: Path | None = None,
    *,
    probe: Probe | None = None,
    health: HealthCheck | None = None,
    estimate_backup: BackupEstimate = estimate_backup_bytes,
    tmp_root: Path | None = None,
) -> Report:
    """Every check, and with an archive, the preview of what it would do. Changes nothing.

    `tmp_root` is where the temporary folder for the archive's payload goes
    (default: the system's, or the state folder when the release does not fit there).
    """
    installed = installed_version(config.platform.root)
    backup_bytes = estimate_backup(config)
    manifest: dict[str, Any] | None = None
    preview: Preview | None = None
    archive_checks: list[Check] = []
    if archive is not None:
        manifest, preview, archive_checks = preview_archive(
            config, archive, installed=installed, backup_bytes=backup_bytes, tmp_root=tmp_root
        )
    checks, systems, limits = evaluate(
        config,
        manifest=manifest,
        spool_bytes=_spool_bytes(config, archive) if manifest is not None and archive is not None else 0,
        probe=probe,
        health=health if health is not None else platform_health(),
        estimate_backup=lambda _config: backup_bytes,
    )
    checks = archive_checks + checks + check_gate(config)
    return Report(config, checks, systems, limits, installed, preview)


def _spool_bytes(config: Config, archive: Path) -> int:
    """The archive's size when it must still be copied to the state folder's filesystem (else 0)."""
    try:
        same = archive.stat().st_dev == _existing(config.paths.state).stat().st_dev
    except FileNotFoundError:
        return 0
    return 0 if same else archive.stat().st_size


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
