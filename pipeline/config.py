"""The configuration: YAML validated against one typed schema (SPEC section 7).

Every problem is reported at once with its key path; unknown keys are errors.
Relative paths are taken relative to the configuration file's folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
)

from pipeline.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/dropgate/dropgate.yaml")

STEPS = ("validate", "prereq", "approval", "window", "backup", "maintenance", "apply", "verify")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`90s`, `15m`, `4h`, `1d` or a bare number of seconds, as seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 90s, 15m or 4h, got {value!r}")  # noqa: TRY004 (pydantic)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration such as 90s, 15m or 4h, got {value!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest of `90s`, `15m`, `4h` that says `seconds` exactly."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


@dataclass(frozen=True)
class CommandSpec:
    """A command: an argument list, or a shell string only when written `{shell: "..."}`."""

    argv: tuple[str, ...] = ()
    shell: str | None = None

    def describe(self) -> str:
        """How the command reads in a log line."""
        return self.shell if self.shell is not None else " ".join(self.argv)


def parse_command(value: Any) -> CommandSpec:
    """Accept `[arg, ...]` or `{shell: "..."}`; nothing else."""
    if isinstance(value, CommandSpec):
        return value
    if isinstance(value, list) and value and all(isinstance(arg, str) for arg in value):
        return CommandSpec(argv=tuple(value))
    if isinstance(value, dict) and set(value) == {"shell"} and isinstance(value["shell"], str):
        return CommandSpec(shell=value["shell"])
    raise ValueError('expected a list of arguments such as [systemctl, stop, app] or {shell: "..."}')


Command = Annotated[CommandSpec, PlainValidator(parse_command)]


class Paths(_Section):
    inbox: Path = Path("/var/lib/dropgate/inbox")
    state: Path = Path("/var/lib/dropgate/state")
    backups: Path = Path("/var/backups/dropgate")


class Services(_Section):
    stop: list[Command] = []
    start: list[Command] = []
    restart: list[Command] = []


class Platform(_Section):
    product: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    root: Path
    data: list[Path] = []
    keep_releases: int = Field(default=3, ge=1)
    services: Services = Services()
    # How apply runs a migration or hook by its suffix, e.g. {".sql": [psql, -v, ON_ERROR_STOP=1, -f]}:
    # the file's path is appended. Without a runner, an executable file or one with a #! line runs as is.
    migration_runners: dict[str, Command] = {}


class Trust(_Section):
    keys: list[Path] = []


class Inbox(_Section):
    settle_seconds: float = Field(default=2.0, ge=0)
    rescan_seconds: float = Field(default=60.0, gt=0)
    incomplete_timeout: Duration = 86400.0
    ignore: list[str] = [".*", "*.part", "*.filepart", "*.tmp"]


class Limits(_Section):
    max_archive_bytes: int = Field(default=8 * 2**30, gt=0)
    max_unpacked_bytes: int = Field(default=32 * 2**30, gt=0)
    max_file_bytes: int = Field(default=8 * 2**30, gt=0)
    max_members: int = Field(default=200_000, gt=0)
    max_ratio: float = Field(default=200.0, gt=1)


class Prereq(_Section):
    min_cpus: int = Field(default=4, ge=1)
    recommended_cpus: int = Field(default=8, ge=1)
    min_memory_gib: float = Field(default=8.0, gt=0)
    recommended_memory_gib: float = Field(default=16.0, gt=0)
    min_free_percent: float = Field(default=30.0, ge=0, le=100)
    # The bytes an update writes on a filesystem (release, backup) are raised by
    # this share before they are compared with its free space (dumps, logs, growth).
    free_margin_percent: float = Field(default=10.0, ge=0)


class Dump(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    command: Command
    restore: Command | None = None


class Backup(_Section):
    keep: int = Field(default=5, ge=1)
    dumps: list[Dump] = []


class Background(_Section):
    """How staging and the backup (and its dumps) yield to the platform (pipeline/priority.py)."""

    io_class: Literal["idle", "best-effort", "none"] = "idle"
    nice: int = Field(default=10, ge=0, le=19)


class Maintenance(_Section):
    flag_file: Path = Path("/run/dropgate/maintenance")
    retry_after: Duration = 900.0


class HttpCheck(_Section):
    url: str = Field(pattern=r"^https?://")
    status: int = 200
    contains: str | None = None
    version: bool = False
    timeout_seconds: float = Field(default=5.0, gt=0)


class Verify(_Section):
    http: list[HttpCheck] = []
    commands: list[Command] = []
    interval_seconds: float = Field(default=2.0, gt=0)
    soak_seconds: Duration = 0.0
    command_timeout: Duration = 60.0  # one check command running longer than this fails the pass


class Timeouts(_Section):
    """Per-step time limits; 0 means none (the waiting steps have none by default)."""

    validate_: Duration = Field(default=1800.0, alias="validate")
    prereq: Duration = 600.0
    approval: Duration = 0.0
    window: Duration = 0.0
    backup: Duration = 4 * 3600.0
    maintenance: Duration = 900.0
    apply: Duration = 2 * 3600.0
    verify: Duration = 1800.0
    rollback: Duration = 2 * 3600.0

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def limit(self, step: str) -> float:
        """The time limit of `step` in seconds (0: none)."""
        return float(getattr(self, "validate_" if step == "validate" else step))


_WINDOW = re.compile(
    r"^(?P<days>(Mon|Tue|Wed|Thu|Fri|Sat|Sun)(-(Mon|Tue|Wed|Thu|Fri|Sat|Sun))?)"
    r"\s+(?P<start>\d\d:\d\d)-(?P<end>\d\d:\d\d)$"
)


class Policy(_Section):
    on_failure: Literal["rollback", "hold"] = "rollback"
    require_approval: bool = False
    channels: list[Literal["stable", "unstable"]] = ["stable"]
    windows: list[str] = []
    timeouts: Timeouts = Timeouts()

    @field_validator("windows")
    @classmethod
    def _check_windows(cls, windows: list[str]) -> list[str]:
        for window in windows:
            if not _WINDOW.match(window.strip()):
                raise ValueError(f"window {window!r} is not like 'Mon-Tue 07:00-12:00'")
        return windows


class Tls(_Section):
    cert: Path
    key: Path


class Metrics(_Section):
    listen: str = Field(default="127.0.0.1:9108", pattern=r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$")
    textfile: Path | None = None
    tls: Tls | None = None


class Control(_Section):
    admin_group: str = "dropgate-admin"


class AutoUpdate(_Section):
    enabled: bool = False
    feed: str | None = None
    schedule: str = "0 0 * * *"
    channel: Literal["stable", "unstable"] = "stable"


class Config(_Section):
    paths: Paths = Paths()
    platform: Platform
    trust: Trust = Trust()
    inbox: Inbox = Inbox()
    limits: Limits = Limits()
    prereq: Prereq = Prereq()
    backup: Backup = Backup()
    background: Background = Background()
    maintenance: Maintenance = Maintenance()
    verify: Verify = Verify()
    policy: Policy = Policy()
    metrics: Metrics = Metrics()
    control: Control = Control()
    auto_update: AutoUpdate = AutoUpdate()
    source: Path | None = Field(default=None, exclude=True)

    @property
    def listen_address(self) -> tuple[str, int]:
        host, _, port = self.metrics.listen.rpartition(":")
        return host.strip("[]"), int(port)


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item).rstrip("_"))
    return "".join(parts) or "(top level)"


def _describe(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _cross_field_problems(config: Config) -> list[str]:
    problems = []
    prereq = config.prereq
    if prereq.recommended_cpus < prereq.min_cpus:
        problems.append("prereq.recommended_cpus: must be at least prereq.min_cpus")
    if prereq.recommended_memory_gib < prereq.min_memory_gib:
        problems.append("prereq.recommended_memory_gib: must be at least prereq.min_memory_gib")
    if config.auto_update.enabled:
        # Accepted and documented so that configurations can be written now; refusing it beats
        # an operator believing updates arrive at midnight when nothing fetches them.
        problems.append(
            "auto_update.enabled: the scheduled fetcher is not part of this release; "
            "drop archives into paths.inbox (or fetch them there with your own timer)"
        )
    names = [dump.name for dump in config.backup.dumps]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"backup.dumps: the name {name!r} is used twice")
    return problems


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the path-valued keys absolute, relative to the configuration's folder."""

    def fix(section: str, key: str) -> None:
        part = raw.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str):
            part[key] = str(base / os.path.expanduser(part[key]))

    for key in ("inbox", "state", "backups"):
        fix("paths", key)
    fix("platform", "root")
    fix("maintenance", "flag_file")
    fix("metrics", "textfile")
    for section, key in (("platform", "data"), ("trust", "keys")):
        part = raw.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), list):
            part[key] = [str(base / os.path.expanduser(p)) if isinstance(p, str) else p for p in part[key]]
    tls = raw.get("metrics", {}).get("tls") if isinstance(raw.get("metrics"), dict) else None
    if isinstance(tls, dict):
        for key in ("cert", "key"):
            if isinstance(tls.get(key), str):
                tls[key] = str(base / tls[key])


def parse_config(raw: Any, *, base: Path, source: str = "") -> Config:
    """Validate an already-loaded YAML document; raise ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of sections"], source)
    _resolve_paths(raw, base)
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        problems = [f"{_key_path(e['loc'])}: {_describe(e)}" for e in error.errors()]
        raise ConfigError(problems, source) from None
    problems = _cross_field_problems(config)
    if problems:
        raise ConfigError(problems, source)
    return config.model_copy(update={"source": Path(source) if source else None})


def load_config(path: Path) -> Config:
    """Read and validate the configuration file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"cannot read the configuration: {error.strerror}"], str(path)) from error
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError([f"{where}not valid YAML ({getattr(error, 'problem', error)})"], str(path)) from None
    return parse_config(raw, base=path.resolve().parent, source=str(path))


def config_path(explicit: str | None) -> Path:
    """`--config`, else `$DROPGATE_CONFIG`, else /etc/dropgate/dropgate.yaml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("DROPGATE_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH
