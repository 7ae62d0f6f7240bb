"""The preview of an archive: authenticated, its payload checked in a temporary folder, what it would do.

What it would do: the versions, whether it needs downtime and why, the files it
changes (`files`), the hooks and migrations in the order apply runs them and
how it would run each, and the disk it needs. What validate would refuse
besides the signature (product, name, channel) is a check of its own.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.archive import authenticate, load_trusted_keys, parse_archive_name, stage_payload
from pipeline.config import Config
from pipeline.errors import ConfigError, DropgateError
from pipeline.preflight.files import FileChanges, compare_release, file_mode
from pipeline.release import current_release, plan_downtime
from states.prereq import Check, format_bytes


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
