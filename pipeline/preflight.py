"""`dropgate preflight [ARCHIVE]`: the server check, and what an update would do.

Without an archive it runs every machine and platform check of the `prereq`
step (plus the gate and the daemon, from the journal, read-only) and prints
them as a table, or as JSON with `--json`. With an archive it first
authenticates it, then adds what the update would do: the versions, whether it
needs downtime and why, the files it adds, changes and removes against the
current release, the hooks and migrations it will run (with the SQL text of
`.sql` migrations), the release notes and the disk it needs. The migrations and
hooks are read from a temporary folder that is removed afterwards; nothing
else is written anywhere.

Exit codes: 0 nothing critical, 1 something critical, 2 configuration or usage error.

`--json` prints one object (keys are stable; new keys may be added):

    ok                  true when no check is critical
    counts              {ok, notice, critical}: how many checks of each level
    installed_version   the live release's version, or null
    checks              [{name, level, subject, message}] in the table's order; name is one of
                        archive, payload, scripts, version, cpus, memory, requirements, free_space,
                        disk_needed, data_paths, health, gate, daemon; subject is a mount point
                        for free_space/disk_needed, else ""
    thresholds          {min_cpus, recommended_cpus, min_memory_gib, recommended_memory_gib,
                        min_free_percent, free_bytes, free_margin_percent, raised_by_archive: [name]}
    filesystems         [{mount, roles, total_bytes, free_bytes, free_percent,
                          needs: {release|backup|archive|archive requirement: bytes}, needed_bytes}]
    update              null without an archive (or when it cannot be authenticated), else
                        {archive, size_bytes, product, version, channel, key_id, min_version,
                         from_version, to_version, downtime, downtime_reason, requirements,
                         files: {added: [{path, size, old_size, what}], changed: [...], removed: [...],
                                 unchanged, growth_bytes},
                         migrations: [{path, role, runs_with, sql}], hooks: {pre_apply, post_apply},
                         scripts: [{path, role, runs_with, sql}] (hooks and migrations in run order),
                         notes, release_bytes, backup_bytes}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.archive import authenticate, load_trusted_keys, parse_archive_name, stage_payload
from pipeline.config import Config, config_path, load_config
from pipeline.errors import ConfigError, DropgateError, JournalError, JournalMissing
from pipeline.evidence import site_evidence
from pipeline.probes import Probe
from pipeline.release import current_release, installed_version, plan_downtime
from pipeline.report import daemon_pid, open_journal
from pipeline.terminal import printable
from states.prereq import (
    BackupEstimate,
    Check,
    Filesystem,
    HealthCheck,
    Thresholds,
    estimate_backup_bytes,
    evaluate,
    format_bytes,
    platform_health,
)

WIDTH = 80
SHOWN_FILES = 40  # per kind in the table; --json has them all
SHOWN_SQL_LINES = 60  # per migration in the table; --json has the whole text

EXIT_OK, EXIT_CRITICAL, EXIT_USAGE = 0, 1, 2


# -- the files an update changes ---------------------------------------------------


@dataclass(frozen=True)
class FileChange:
    """One file the update adds, changes or removes (sizes in bytes; None where there is no such side)."""

    path: str
    kind: str  # added, changed, removed
    size: int | None
    old_size: int | None
    what: str = ""  # for a change: "content", "mode" or "content, mode"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "old_size": self.old_size, "what": self.what}


@dataclass
class FileChanges:
    added: list[FileChange] = field(default_factory=list)
    changed: list[FileChange] = field(default_factory=list)
    removed: list[FileChange] = field(default_factory=list)
    unchanged: int = 0

    @property
    def growth(self) -> int:
        """Bytes the new release has more (or fewer) than the current one."""
        plus = sum(c.size or 0 for c in self.added + self.changed)
        minus = sum(c.old_size or 0 for c in self.removed + self.changed)
        return plus - minus

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": [c.to_dict() for c in self.added],
            "changed": [c.to_dict() for c in self.changed],
            "removed": [c.to_dict() for c in self.removed],
            "unchanged": self.unchanged,
            "growth_bytes": self.growth,
        }


def release_files(release: Path) -> dict[str, os.stat_result]:
    """The regular files of a release folder, by path relative to it (symlinks are not followed)."""
    found: dict[str, os.stat_result] = {}
    pending = [release]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                pending.append(Path(entry.path))
            else:
                found[Path(entry.path).relative_to(release).as_posix()] = info
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_mode(value: Any) -> int | None:
    """A manifest's mode: `0644` as text (the archive's manifest) or a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            return None
    return None


def _content_differs(release: Path | None, path: str, info: os.stat_result, size: int, sha256: Any) -> bool:
    if release is None or not stat.S_ISREG(info.st_mode) or info.st_size != size:
        return True
    return bool(sha256) and file_sha256(release / path) != sha256


def compare_release(current: Path | None, files: Mapping[str, Mapping[str, Any]]) -> FileChanges:
    """The manifest's files against the current release on disk.

    A file is hashed only when its size is the same as the manifest's (a
    different size is a change already), so a large release is compared quickly.
    """
    have = release_files(current) if current is not None else {}
    changes = FileChanges()
    for path in sorted(files):
        entry = files[path]
        size = int(entry.get("size", 0))
        info = have.get(path)
        if info is None:
            changes.added.append(FileChange(path, "added", size, None))
            continue
        what = []
        if _content_differs(current, path, info, size, entry.get("sha256")):
            what.append("content")
        mode = file_mode(entry.get("mode"))
        if mode is not None and stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) != mode:
            what.append("mode")
        if what:
            changes.changed.append(FileChange(path, "changed", size, info.st_size, ", ".join(what)))
        else:
            changes.unchanged += 1
    for path in sorted(set(have) - set(files)):
        changes.removed.append(FileChange(path, "removed", None, have[path].st_size))
    return changes


# -- the preview of an archive ------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """A migration or hook the update will run, and how."""

    path: str
    role: str  # migration, pre_apply, post_apply
    runs_with: str | None  # the command it runs with; None: apply could not run it
    sql: str | None = None  # the text of a .sql migration

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "role": self.role, "runs_with": self.runs_with, "sql": self.sql}


@dataclass
class Preview:
    """What an authenticated archive would do to this platform."""

    archive: Path
    manifest: dict[str, Any]
    from_version: str | None
    downtime: bool
    downtime_reason: str
    changes: FileChanges
    scripts: list[Script]
    release_bytes: int
    backup_bytes: int

    def to_dict(self) -> dict[str, Any]:
        manifest = self.manifest
        hooks = manifest.get("hooks") or {}
        return {
            "archive": str(self.archive),
            "size_bytes": self.archive.stat().st_size if self.archive.exists() else None,
            "product": manifest.get("product"),
            "version": manifest.get("version"),
            "channel": manifest.get("channel"),
            "key_id": manifest.get("key_id"),
            "min_version": manifest.get("min_version"),
            "from_version": self.from_version,
            "to_version": manifest.get("version"),
            "downtime": self.downtime,
            "downtime_reason": self.downtime_reason,
            "requirements": dict(manifest.get("requirements") or {}),
            "files": self.changes.to_dict(),
            "migrations": [s.to_dict() for s in self.scripts if s.role == "migration"],
            "hooks": {
                "pre_apply": hooks.get("pre_apply"),
                "post_apply": hooks.get("post_apply"),
            },
            "scripts": [s.to_dict() for s in self.scripts],
            "notes": manifest.get("notes") or "",
            "release_bytes": self.release_bytes,
            "backup_bytes": self.backup_bytes,
        }


def describe_runner(path: str, content: bytes | None, mode: int | None, config: Config) -> str | None:
    """How apply will run this script (the same rule as apply's), or None when it could not."""
    suffix = Path(path).suffix
    runner = config.platform.migration_runners.get(suffix)
    if runner is not None:
        return f"{runner.describe()} {path}"
    if isinstance(mode, int) and mode & 0o111:
        return f"{path} (executable)"
    if content is not None and content.startswith(b"#!"):
        interpreter = content[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        if interpreter:
            return f"{interpreter} {path}"
    return None


def read_scripts(manifest: Mapping[str, Any], release: Path | None, config: Config) -> tuple[list[Script], list[Check]]:
    """The hooks and migrations in the order apply runs them, from an extracted release folder."""
    files = manifest.get("files") or {}
    hooks = manifest.get("hooks") or {}
    order: list[tuple[str, str]] = []
    if hooks.get("pre_apply"):
        order.append(("pre_apply", str(hooks["pre_apply"])))
    order += [("migration", str(path)) for path in manifest.get("migrations") or []]
    if hooks.get("post_apply"):
        order.append(("post_apply", str(hooks["post_apply"])))
    scripts: list[Script] = []
    checks: list[Check] = []
    for role, path in order:
        content: bytes | None = None
        if release is not None:
            try:
                content = (release / path).read_bytes()
            except FileNotFoundError:
                content = None
        entry = files.get(path) if isinstance(files, Mapping) else None
        mode = file_mode(entry.get("mode")) if isinstance(entry, Mapping) else None
        runs_with = describe_runner(path, content, mode, config)
        sql = content.decode("utf-8", "replace") if content is not None and path.endswith(".sql") else None
        scripts.append(Script(path, role, runs_with, sql))
        what = "migration" if role == "migration" else role.replace("_", "-") + " hook"
        if entry is None:
            checks.append(Check("scripts", "critical", f"the {what} {path} is not in the archive's files"))
        elif runs_with is None and release is not None:  # unread (payload refused): nothing to judge by
            suffix = Path(path).suffix or "(no suffix)"
            message = (
                f"the {what} {path} is not executable, has no #! line and no "
                f"platform.migration_runners entry for {suffix}: apply would fail"
            )
            checks.append(Check("scripts", "critical", message))
    return scripts, checks


# -- the whole report --------------------------------------------------------------


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


def preview_archive(
    config: Config, archive: Path, *, installed: str | None, backup_bytes: int, tmp_root: Path | None = None
) -> tuple[dict[str, Any] | None, Preview | None, list[Check]]:
    """Authenticate `archive`, check its payload in a temporary folder, and describe what it would do.

    Returns the manifest (None when it cannot be trusted), the preview and the
    archive's own checks. The temporary folder is removed before returning.
    A trust store that cannot be loaded is a configuration error (raised).
    """
    keys = load_trusted_keys(config.trust.keys)
    if not len(keys):
        raise ConfigError(["trust.keys: no trusted key is configured, so no archive can be authenticated"])
    try:
        signed = authenticate(archive, keys, config.limits)
    except DropgateError as error:
        return None, None, [Check("archive", "critical", f"{archive.name}: {error}")]
    manifest = signed.to_dict()
    checks = check_archive(config, archive, manifest)
    parent = tmp_root if tmp_root is not None else scratch_parent(config, signed.unpacked_bytes)
    with tempfile.TemporaryDirectory(prefix="dropgate-preflight-", dir=parent) as scratch:
        release = Path(scratch) / "release"
        try:
            stage_payload(archive, signed, release, config.limits)
        except DropgateError as error:
            checks.append(Check("payload", "critical", f"{archive.name}: {error}"))
            staged: Path | None = None
        else:
            count = len(signed.files)
            size = format_bytes(signed.unpacked_bytes)
            checks.append(Check("payload", "ok", f"{count} files ({size}) match their signed hashes"))
            staged = release
        scripts, script_checks = read_scripts(manifest, staged, config)
    checks += script_checks
    try:
        downtime, reason = plan_downtime(installed, signed.version, signed.downtime)
    except ValueError as error:
        downtime, reason = True, str(error)
    preview = Preview(
        archive=archive,
        manifest=manifest,
        from_version=installed,
        downtime=downtime,
        downtime_reason=reason,
        changes=compare_release(current_release(config.platform.root), manifest.get("files") or {}),
        scripts=scripts,
        release_bytes=signed.unpacked_bytes,
        backup_bytes=backup_bytes,
    )
    return manifest, preview, checks


def scratch_parent(config: Config, needed: int) -> Path | None:
    """Where the temporary folder goes: the system's if the release fits there, else the state folder."""
    try:
        if shutil.disk_usage(tempfile.gettempdir()).free > needed * 1.1:
            return None
    except OSError:
        pass
    state = config.paths.state
    return state if state.is_dir() else None


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


def check_archive(config: Config, archive: Path, manifest: Mapping[str, Any]) -> list[Check]:
    """What validate would refuse besides the signature: the product, the name, the channel."""
    checks: list[Check] = []
    product, version, channel = manifest.get("product"), manifest.get("version"), manifest.get("channel")
    if product != config.platform.product:
        message = f"the archive is for {product!r}, this platform is {config.platform.product!r}"
        checks.append(Check("archive", "critical", message))
    expected = f"{product}.{version}.tgz"
    try:
        named = parse_archive_name(archive.name)
    except DropgateError as error:
        checks.append(Check("archive", "critical", str(error)))
    else:
        if named != (product, version):
            checks.append(Check("archive", "critical", f"named {archive.name}, its signed manifest says {expected}"))
    if channel not in config.policy.channels:
        allowed = ", ".join(config.policy.channels)
        checks.append(Check("archive", "critical", f"channel {channel!r} is not allowed (policy.channels: {allowed})"))
    if not checks:
        key = manifest.get("key_id")
        signed = f"signed by {key}" if key else "signature verified"
        checks.append(Check("archive", "ok", f"{archive.name}: {signed}, {product} {version} ({channel})"))
    return checks


# -- the table ---------------------------------------------------------------------


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=width, break_long_words=True, break_on_hyphens=False) or [""]


def render_checks(checks: Iterable[Check], width: int = WIDTH) -> list[str]:
    rows = list(checks)
    name_width = min(max((len(c.title) for c in rows), default=5), 22)
    left = 9 + name_width + 2
    lines = [f"{'LEVEL':<9}{'CHECK':<{name_width}}  RESULT"]
    for check in rows:
        body = _wrap(check.message, width - left)
        if len(check.title) > name_width:
            lines.append(f"{check.level:<9}{check.title}")
            lines += [" " * left + part for part in body]
        else:
            lines.append(f"{check.level:<9}{check.title:<{name_width}}  {body[0]}")
            lines += [" " * left + part for part in body[1:]]
    return lines


def _field(label: str, text: str, width: int = WIDTH) -> list[str]:
    body = _wrap(text, width - 14)
    return [f"  {label:<12}{body[0]}"] + [" " * 14 + part for part in body[1:]]


def render_preview(preview: Preview, width: int = WIDTH) -> list[str]:
    data = preview.to_dict()
    changes = preview.changes
    lines = ["", f"Update {preview.archive.name}"]
    lines += _field("Version", f"{preview.from_version or '(none)'} → {data['to_version']} ({data['channel']})")
    lines += _field("Downtime", f"{'yes' if preview.downtime else 'no'}: {preview.downtime_reason}")
    disk = f"release {format_bytes(preview.release_bytes)}, backup up to {format_bytes(preview.backup_bytes)}"
    lines += _field("Disk", f"{disk} (see disk_needed above)")
    growth = changes.growth
    sign = "+" if growth >= 0 else "-"
    summary = (
        f"{len(changes.added)} added, {len(changes.changed)} changed, {len(changes.removed)} removed, "
        f"{changes.unchanged} unchanged ({sign}{format_bytes(abs(growth))})"
    )
    lines += _field("Files", summary)
    for kind, items in (("added", changes.added), ("changed", changes.changed), ("removed", changes.removed)):
        for change in items[:SHOWN_FILES]:
            size = format_bytes(change.size) if change.size is not None else ""
            extra = ""
            if change.kind == "changed":
                extra = f" ({change.what}; was {format_bytes(change.old_size or 0)})"
            elif change.kind == "removed":
                extra = f" (was {format_bytes(change.old_size or 0)})"
            line = f"    {kind:<8} {size:>10}  {change.path}{extra}"
            lines += _wrap(line, width) if len(line) > width else [line]
        if len(items) > SHOWN_FILES:
            lines.append(f"    … and {len(items) - SHOWN_FILES} more {kind} (--json lists them all)")
    scripts = preview.scripts
    if not scripts:
        lines += _field("Scripts", "no hooks, no migrations")
    for index, script in enumerate(scripts, start=1):
        label = "migration" if script.role == "migration" else script.role.replace("_", "-") + " hook"
        lines += _field("Runs" if index == 1 else "", f"{index}. {label} {script.path}")
        lines += _field("", f"   with: {script.runs_with or 'nothing (apply would fail)'}")
        if script.sql is not None:
            sql_lines = script.sql.rstrip("\n").splitlines() or [""]
            for sql_line in sql_lines[:SHOWN_SQL_LINES]:
                lines.append(f"{'':17}| {sql_line}"[:width])
            if len(sql_lines) > SHOWN_SQL_LINES:
                lines.append(f"{'':17}| … {len(sql_lines) - SHOWN_SQL_LINES} more lines (--json has the whole text)")
    notes = str(data["notes"]).strip()
    lines += _field("Notes", "" if notes else "(none)")
    for paragraph in notes.splitlines():
        lines += [" " * 4 + part for part in _wrap(paragraph, width - 4)] if paragraph.strip() else [""]
    return lines


def render(report: Report, width: int = WIDTH) -> str:
    installed = report.installed or "none"
    lines = [f"Installed release: {installed}", ""]
    lines += render_checks(report.checks, width)
    if report.preview is not None:
        lines += render_preview(report.preview, width)
    counts = report.counts()
    if not counts["critical"]:
        verdict = "nothing critical" if report.preview is None else "this update can go ahead"
    else:
        verdict = "not ready" if report.preview is None else "this update would be rejected"
    lines += ["", f"{counts['critical']} critical, {counts['notice']} notice(s), {counts['ok']} ok: {verdict}"]
    # Each element is one line; a name from the archive or the disk cannot add or rewrite one.
    return "\n".join(printable(line.rstrip()) for line in lines)


def cmd_preflight(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    archive = Path(args.archive) if args.archive else None
    if archive is not None and not archive.is_file():
        print(f"dropgate: {printable(archive)}: no such archive", file=sys.stderr)
        return EXIT_USAGE
    report = build_report(config, archive)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render(report))
    return EXIT_CRITICAL if report.critical else EXIT_OK
