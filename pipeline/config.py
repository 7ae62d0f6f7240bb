"""The configuration: YAML validated against one typed schema (SPEC section 7).

Every problem is reported at once with its key path; unknown keys are errors.
Relative paths are taken relative to the configuration file's folder.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
)

from pipeline.errors import ConfigError
from pipeline.quickconfig import DEFAULT_CONFIG_PATH, config_path, reading_config  # noqa: F401 (here since the schema was)

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

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?(?:/s)?\s*$")
_RATE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
MIN_RATE = 16 * 2**10


def parse_rate(value: Any) -> float:
    """`10MiB/s`, `500KB/s`, a bare number of bytes per second, or 0 for no limit."""
    if isinstance(value, bool):
        raise ValueError(f"expected a rate such as 10MiB/s or 0 (no limit), got {value!r}")  # noqa: TRY004 (pydantic)
    match = _RATE.match(str(value))
    if not match:
        raise ValueError(f"expected a rate such as 10MiB/s or 0 (no limit), got {value!r}")
    rate = float(match.group(1)) * _RATE_UNITS[match.group(2)]
    if 0 < rate < MIN_RATE:
        raise ValueError(f"a rate below 16KiB/s would pass for a stalled download; got {value!r}")
    return rate


Rate = Annotated[float, BeforeValidator(parse_rate)]


def _check_zone(value: str | None) -> str | None:
    from pipeline.schedule import check_zone_name

    return None if value is None else check_zone_name(value)


def _check_cron(value: str) -> str:
    from pipeline.schedule import check_cron

    return check_cron(value)


def _check_https(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"https://[^\s/]+(/\S*)?", value):
        raise ValueError(f"{value!r} is not an https:// URL (the feed is only fetched over verified TLS)")
    return value


ZoneName = Annotated[str | None, BeforeValidator(_check_zone)]


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
    # manifest.json is held in memory whole while its signature is checked: this bounds the daemon's memory
    max_manifest_bytes: int = Field(default=32 * 2**20, gt=0, le=64 * 2**20)


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


class Policy(_Section):
    on_failure: Literal["rollback", "hold"] = "rollback"
    require_approval: bool = False
    approval_expires: Duration = 0.0  # a run waiting longer for its approval is rejected (0: never)
    channels: list[Literal["stable", "unstable"]] = ["stable"]
    windows: list[str] = []
    windows_for: Literal["downtime", "all"] = "downtime"
    timezone: ZoneName = None  # the windows' zone; None: the machine's
    timeouts: Timeouts = Timeouts()

    @field_validator("windows")
    @classmethod
    def _check_windows(cls, windows: list[str]) -> list[str]:
        from pipeline.schedule import parse_window

        for window in windows:
            parse_window(window)
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


class ConsoleThrottle(_Section):
    """Failed sign-ins allowed per account and per source address before each further try waits."""

    free_attempts: int = Field(default=5, ge=1)
    window: Duration = 900.0  # failures older than this are forgotten
    max_delay: Duration = 900.0  # the wait doubles with every failure up to this


class Console(_Section):
    """The administrators' browser console (off unless `listen` is set)."""

    listen: str | None = Field(default=None, pattern=r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$")
    tls: Tls | None = None
    pam_service: str = Field(default="dropgate", pattern=r"^[A-Za-z0-9_.-]+$")
    session_idle: Duration = 900.0
    session_max: Duration = 8 * 3600.0
    throttle: ConsoleThrottle = ConsoleThrottle()
    # Front proxies whose X-Forwarded-For/-Proto/-Prefix are believed (nginx on this machine).
    trusted_proxies: list[str] = ["127.0.0.1", "::1"]

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_address(proxy)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address") from None
        return proxies

    @property
    def address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether a listen address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AutoUpdate(_Section):
    enabled: bool = False  # the default; `dropgate auto-update on|off` overrides it and survives restarts
    feed: Annotated[str | None, AfterValidator(_check_https)] = None  # the vendor's feed URL
    schedule: Annotated[str, AfterValidator(_check_cron)] = "0 0 * * *"
    timezone: ZoneName = None  # the schedule's zone; None: the machine's
    jitter: Duration = 0.0  # each site checks up to this long after the scheduled time
    channel: Literal["stable", "unstable"] = "stable"
    ca_file: Path | None = None  # CA bundle for the feed's server (default: the system's)
    bandwidth: Rate = 0.0  # bytes per second for downloads (0: no limit)


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
    console: Console = Console()
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
    auto = config.auto_update
    if auto.enabled and auto.feed is None:
        problems.append("auto_update.feed: required when auto_update.enabled is true (the vendor's feed URL)")
    if auto.feed is not None and not any(fnmatch.fnmatchcase("x.tgz.part", p) for p in config.inbox.ignore):
        problems.append("inbox.ignore: must ignore *.part, where the fetcher downloads before renaming")
    if auto.channel == "unstable" and "unstable" not in config.policy.channels:
        problems.append("auto_update.channel: unstable archives would be rejected; add unstable to policy.channels")
    problems += _console_problems(config)
    names = [dump.name for dump in config.backup.dumps]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"backup.dumps: the name {name!r} is used twice")
    return problems


def _console_problems(config: Config) -> list[str]:
    console = config.console
    if console.address is None:
        return []
    problems = []
    host, port = console.address
    if not is_loopback(host) and console.tls is None:
        problems.append(
            f"console.tls: required because console.listen ({console.listen}) is not a loopback address "
            "(sign-in passwords and session cookies must not cross the network in clear)"
        )
    if port and console.listen == config.metrics.listen:
        problems.append("console.listen: must differ from metrics.listen (the metrics listener stays read-only)")
    sample = f"{config.platform.product}.1.0.0.tgz.part"
    if not any(fnmatch.fnmatchcase(sample, pattern) for pattern in config.inbox.ignore):
        problems.append(
            "inbox.ignore: must ignore '*.part' while the console is on (it uploads into the inbox as NAME.part)"
        )
    if console.session_max < console.session_idle:
        problems.append("console.session_max: must be at least console.session_idle")
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
    fix("auto_update", "ca_file")
    for section, key in (("platform", "data"), ("trust", "keys")):
        part = raw.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), list):
            part[key] = [str(base / os.path.expanduser(p)) if isinstance(p, str) else p for p in part[key]]
    tls = raw.get("metrics", {}).get("tls") if isinstance(raw.get("metrics"), dict) else None
    if isinstance(tls, dict):
        for key in ("cert", "key"):
            if isinstance(tls.get(key), str):
                tls[key] = str(base / tls[key])
    tls = raw.get("console", {}).get("tls") if isinstance(raw.get("console"), dict) else None
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
    with reading_config(path):
        text = path.read_text(encoding="utf-8")
    return config_from_text(text, path)


def config_from_text(text: str, path: Path) -> Config:
    """Validate the text of the configuration file at `path`."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError([f"{where}not valid YAML ({getattr(error, 'problem', error)})"], str(path)) from None
    return parse_config(raw, base=path.resolve().parent, source=str(path))
