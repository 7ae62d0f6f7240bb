"""The configuration as the read-only commands need it, without loading the schema.

`status`, `history`, `show` and the client side of the control commands read
a handful of keys (where the state folder, the inbox and the platform are,
the admin group). Importing the typed schema costs more than everything else
such a command does, and fleet tools and watch loops call `status` often. So
every full validation leaves its result in the state folder
(`config.checked.json`): those keys, recorded under the configuration file's
path and SHA-256 and dropgate's version. A command that finds a record that
matches, written by root (or the daemon's own user), uses it; in every other
case (first of all a changed file) it validates the whole configuration as
before, so an invalid configuration is still reported as invalid (exit 2).
The daemon writes the record when it starts; so does any command that had to
validate and may write the state folder.

`QuickConfig` has the same attribute names as `Config` for the keys it
carries, so code that reads only those keys takes either. A read-only
command that needs another key adds it here (the record's field list is part
of its key, so older records are simply not used).
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.errors import ConfigError, NotAllowed

if TYPE_CHECKING:
    from pipeline.config import Config

DEFAULT_CONFIG_PATH = Path("/etc/dropgate/dropgate.yaml")
DEFAULT_STATE = Path("/var/lib/dropgate/state")  # the schema's default for paths.state
CHECKED_NAME = "config.checked.json"
FORMAT = 1


@dataclass(frozen=True)
class PathsView:
    inbox: Path
    state: Path
    backups: Path


@dataclass(frozen=True)
class InboxView:
    ignore: tuple[str, ...]


@dataclass(frozen=True)
class PlatformView:
    root: Path


@dataclass(frozen=True)
class ControlView:
    admin_group: str


@dataclass(frozen=True)
class MaintenanceView:
    flag_file: Path


@dataclass(frozen=True)
class TrustView:
    keys: tuple[Path, ...]


@dataclass(frozen=True)
class PolicyView:
    windows: tuple[str, ...]
    windows_for: str
    timezone: str | None


@dataclass(frozen=True)
class AutoUpdateView:
    enabled: bool
    feed: str | None
    schedule: str
    timezone: str | None
    jitter: float
    channel: str


@dataclass(frozen=True)
class QuickConfig:
    """The keys of a validated configuration that the read-only commands use, named as in `Config`."""

    paths: PathsView
    inbox: InboxView
    platform: PlatformView
    control: ControlView
    maintenance: MaintenanceView
    trust: TrustView
    policy: PolicyView
    auto_update: AutoUpdateView
    source: Path | None = None

    @classmethod
    def of(cls, config: Config | QuickConfig) -> QuickConfig:
        return cls(
            paths=PathsView(config.paths.inbox, config.paths.state, config.paths.backups),
            inbox=InboxView(tuple(config.inbox.ignore)),
            platform=PlatformView(config.platform.root),
            control=ControlView(config.control.admin_group),
            maintenance=MaintenanceView(config.maintenance.flag_file),
            trust=TrustView(tuple(config.trust.keys)),
            policy=PolicyView(tuple(config.policy.windows), config.policy.windows_for, config.policy.timezone),
            auto_update=AutoUpdateView(
                config.auto_update.enabled,
                config.auto_update.feed,
                config.auto_update.schedule,
                config.auto_update.timezone,
                float(config.auto_update.jitter),
                config.auto_update.channel,
            ),
            source=config.source,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "paths.inbox": str(self.paths.inbox),
            "paths.state": str(self.paths.state),
            "paths.backups": str(self.paths.backups),
            "inbox.ignore": list(self.inbox.ignore),
            "platform.root": str(self.platform.root),
            "control.admin_group": self.control.admin_group,
            "maintenance.flag_file": str(self.maintenance.flag_file),
            "trust.keys": [str(key) for key in self.trust.keys],
            "policy.windows": list(self.policy.windows),
            "policy.windows_for": self.policy.windows_for,
            "policy.timezone": self.policy.timezone,
            "auto_update.enabled": self.auto_update.enabled,
            "auto_update.feed": self.auto_update.feed,
            "auto_update.schedule": self.auto_update.schedule,
            "auto_update.timezone": self.auto_update.timezone,
            "auto_update.jitter": self.auto_update.jitter,
            "auto_update.channel": self.auto_update.channel,
        }

    @classmethod
    def from_json(cls, values: Any, source: Path) -> QuickConfig:
        """The record's values; ValueError for anything but exactly what `to_json` writes."""
        if not isinstance(values, dict) or set(values) != set(_FIELDS):
            raise ValueError("not the fields of this version")

        def path(key: str) -> Path:
            value = values[key]
            if not isinstance(value, str) or not os.path.isabs(value):
                raise ValueError(f"{key}: not an absolute path")
            return Path(value)

        ignore, group = values["inbox.ignore"], values["control.admin_group"]
        if not isinstance(ignore, list) or not all(isinstance(item, str) for item in ignore):
            raise TypeError("inbox.ignore: not a list of patterns")
        if not isinstance(group, str):
            raise TypeError("control.admin_group: not a name")

        def texts(key: str) -> tuple[str, ...]:
            value = values[key]
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise TypeError(f"{key}: not a list of strings")
            return tuple(value)

        def text(key: str, *, optional: bool = False) -> Any:
            value = values[key]
            if not (isinstance(value, str) or (optional and value is None)):
                raise TypeError(f"{key}: not a string")
            return value

        keys = values["trust.keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) and os.path.isabs(k) for k in keys):
            raise TypeError("trust.keys: not a list of absolute paths")
        enabled, jitter = values["auto_update.enabled"], values["auto_update.jitter"]
        if not isinstance(enabled, bool) or isinstance(jitter, bool) or not isinstance(jitter, int | float):
            raise TypeError("auto_update: enabled or jitter of the wrong type")
        return cls(
            paths=PathsView(path("paths.inbox"), path("paths.state"), path("paths.backups")),
            inbox=InboxView(tuple(ignore)),
            platform=PlatformView(path("platform.root")),
            control=ControlView(group),
            maintenance=MaintenanceView(path("maintenance.flag_file")),
            trust=TrustView(tuple(Path(key) for key in keys)),
            policy=PolicyView(
                texts("policy.windows"), text("policy.windows_for"), text("policy.timezone", optional=True)
            ),
            auto_update=AutoUpdateView(
                enabled,
                text("auto_update.feed", optional=True),
                text("auto_update.schedule"),
                text("auto_update.timezone", optional=True),
                float(jitter),
                text("auto_update.channel"),
            ),
            source=source,
        )


_FIELDS = (
    "paths.inbox",
    "paths.state",
    "paths.backups",
    "inbox.ignore",
    "platform.root",
    "control.admin_group",
    "maintenance.flag_file",
    "trust.keys",
    "policy.windows",
    "policy.windows_for",
    "policy.timezone",
    "auto_update.enabled",
    "auto_update.feed",
    "auto_update.schedule",
    "auto_update.timezone",
    "auto_update.jitter",
    "auto_update.channel",
)


def config_path(explicit: str | None) -> Path:
    """`--config`, else `$DROPGATE_CONFIG`, else /etc/dropgate/dropgate.yaml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("DROPGATE_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


@contextlib.contextmanager
def reading_config(path: Path) -> Iterator[None]:
    """Around reading the configuration file at `path`: what fails, as the operator's one-line message."""
    try:
        yield
    except PermissionError as error:
        raise NotAllowed(
            f"cannot read the configuration {path}: permission denied (it is for root and the admin group)"
        ) from error
    except OSError as error:
        raise ConfigError([f"cannot read the configuration: {error.strerror}"], str(path)) from error


def _read(path: Path) -> bytes:
    with reading_config(path):
        return path.read_bytes()


def _key(path: Path, data: bytes) -> dict[str, Any]:
    """What a record must match: this file (its resolved path and content), this dropgate, these fields.

    The content is compared by length and CRC-32 (zlib: no hashing library to load): whoever could
    forge a collision can write the configuration itself, and any edit changes one or the other.
    """
    return {
        "format": FORMAT,
        "version": __version__,
        "fields": list(_FIELDS),
        "config": str(path.resolve()),
        "bytes": len(data),
        "crc32": zlib.crc32(data),
        # `~` in a path is expanded for the user who validates: then the record holds for that home only.
        "home": os.path.expanduser("~") if b"~" in data else None,
    }


def _scan_state(data: bytes) -> bytes | None:
    """paths.state as written in block style (`paths:` then an indented `state: ...`), without a
    YAML parser; None when the file is written some other way. Where the record is looked for
    decides only whether it is found: the record itself must match this very file."""
    in_paths = False
    for line in data.splitlines():
        text = line.split(b" #", 1)[0].rstrip()
        if not text.strip() or text.lstrip().startswith(b"#"):
            continue
        if not text[:1].isspace():
            if text.startswith(b"paths:") and text != b"paths:":
                return None  # flow style: leave it to the parser
            in_paths = text == b"paths:"
            continue
        key, colon, value = text.strip().partition(b":")
        if in_paths and key == b"state" and colon:
            return value.strip().strip(b"'\"") or None
    return DEFAULT_STATE_TEXT


DEFAULT_STATE_TEXT = str(DEFAULT_STATE).encode()


def _state_folder(data: bytes, base: Path) -> Path | None:
    """paths.state as the schema would resolve it, read without the schema (None if it cannot tell)."""
    scanned = _scan_state(data)
    if scanned is not None:
        try:
            return base / os.path.expanduser(scanned.decode("utf-8"))
        except UnicodeDecodeError:
            return None
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        raw = yaml.load(data, Loader=loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError:
        return None
    if not isinstance(raw, dict):
        return None
    paths = raw.get("paths")
    if paths is None:
        return DEFAULT_STATE
    if not isinstance(paths, dict):
        return None
    value = paths.get("state")
    if value is None:
        return DEFAULT_STATE
    return base / os.path.expanduser(value) if isinstance(value, str) else None


def _trusted_record(record_path: Path) -> Any:
    """The record's JSON, if it was written by root or this user and no one else may change it."""
    try:
        fd = os.open(record_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
            return None
        try:
            return json.loads(handle.read(64 * 1024))
        except ValueError:
            return None


def remember(config: Config, data: bytes, path: Path) -> None:
    """Record `config`, validated from `data` (the file at `path`), for the read-only commands.

    Best effort: a state folder this user may not write (an admin's `status`)
    or that does not exist yet only means the next command validates again.
    """
    import tempfile

    state = config.paths.state
    record = {"key": _key(path, data), "values": QuickConfig.of(config).to_json()}
    try:
        fd, tmp = tempfile.mkstemp(dir=state, prefix=f".{CHECKED_NAME}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.chmod(tmp, 0o640)  # the admin group reads it (the state folder is setgid)
        os.replace(tmp, state / CHECKED_NAME)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def validate(path: Path, data: bytes | None = None) -> Config:
    """The whole configuration (the file at `path`, or its content `data` already read), validated
    against the schema, and recorded for the read-only commands."""
    from pipeline.config import config_from_text

    data = _read(path) if data is None else data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([f"not UTF-8 text (byte {error.start})"], str(path)) from None
    config = config_from_text(text, path)
    remember(config, data, path)
    return config


def load_quick(path: Path) -> QuickConfig:
    """What the read-only commands need of the configuration at `path`: from the last full validation's
    record when it matches this very file, else from a full validation (which reports every problem)."""
    data = _read(path)
    state = _state_folder(data, path.resolve().parent)
    if state is not None:
        record = _trusted_record(state / CHECKED_NAME)
        if isinstance(record, dict) and record.get("key") == _key(path, data):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return QuickConfig.from_json(record.get("values"), path)
    return QuickConfig.of(validate(path, data))


if TYPE_CHECKING:
    from typing import TypeAlias

    # What code that reads only QuickConfig's keys takes: the daemon passes its Config.
    SiteConfig: TypeAlias = Config | QuickConfig
