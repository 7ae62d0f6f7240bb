"""The configuration: typed, every problem named by its key path, the example documents every key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import Config, ConfigError, load_config, parse_config, parse_duration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "dropgate.example.yaml"


def minimal(**extra: Any) -> dict[str, Any]:
    return {"platform": {"product": "gts", "root": "/srv/gts"}, **extra}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("4h", 14400), ("1d", 86400), (30, 30), ("2.5s", 2.5), ("500ms", 0.5)],
)
def test_durations_accept_the_documented_forms(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path: Path) -> None:
    # Given a configuration with four different mistakes
    raw = {
        "platform": {"root": "/srv", "prodcut": "gts"},
        "policy": {"on_failure": "retry", "timeouts": {"apply": "soon"}},
        "verify": {"commands": ["echo ok"]},
    }
    # When it is validated
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base=tmp_path)
    # Then each is named with its key path
    problems = caught.value.problems
    assert "platform.product: required key is missing" in problems
    assert "platform.prodcut: unknown key" in problems
    assert any(p.startswith("policy.on_failure: Input should be 'rollback' or 'hold'") for p in problems)
    assert any(p.startswith("policy.timeouts.apply: expected a duration") for p in problems)
    assert any(p.startswith("verify.commands[0]: expected a list of arguments") for p in problems)


def test_a_shell_string_is_only_accepted_when_written_as_shell(tmp_path: Path) -> None:
    config = parse_config(
        minimal(
            platform={
                "product": "gts",
                "root": "/srv",
                "services": {"stop": [["systemctl", "stop", "gts"], {"shell": "a | b"}]},
            }
        ),
        base=tmp_path,
    )
    stop = config.platform.services.stop
    assert stop[0].argv == ("systemctl", "stop", "gts") and stop[0].shell is None
    assert stop[1].shell == "a | b" and stop[1].argv == ()


def test_relative_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    config = parse_config(minimal(paths={"inbox": "in"}), base=tmp_path)
    assert config.paths.inbox == tmp_path / "in"
    assert config.platform.root == Path("/srv/gts")


def test_windows_must_be_well_formed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy.windows: .*'Mon 7' is not like 'Mon-Tue 07:00-12:00'"):
        parse_config(minimal(policy={"windows": ["Mon 7"]}), base=tmp_path)


def test_the_example_config_loads_and_documents_every_key(tmp_path: Path) -> None:
    # The example is the operator's reference: it must load, and name every key of the schema.
    config = load_config(EXAMPLE)
    assert config.platform.product
    text = EXAMPLE.read_text()
    raw = yaml.safe_load(text)

    def keys_of(model: type[BaseModel], prefix: str) -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            key = field.alias or name
            found.append(prefix + key)
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found += keys_of(annotation, prefix + key + ".")
        return found

    def present(path: str) -> bool:
        node: Any = raw
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [key for key in keys_of(Config, "") if not present(key) and f"# {key.rsplit('.', 1)[-1]}:" not in text]
    assert not missing, f"keys not documented in {EXAMPLE.name}: {missing}"


def test_a_bad_config_stops_the_daemon_with_exit_2_naming_the_key(tmp_path: Path) -> None:
    # Given a config with an unknown key and a bad duration
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(minimal(inbox={"settle_seconds": 2, "rescan_every": 5}, policy={"timeouts": {"apply": "x"}}))
    )
    # When the daemon is started with it
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(path), "run"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    # Then it stops with exit code 2 and names both keys
    assert result.returncode == 2
    assert "inbox.rescan_every: unknown key" in result.stderr
    assert "policy.timeouts.apply: expected a duration" in result.stderr


def test_a_missing_config_file_is_a_configuration_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(tmp_path / "nope.yaml"), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "nope.yaml: cannot read the configuration" in result.stderr


def test_auto_update_can_be_switched_on_with_a_feed_and_reads_every_key(tmp_path: Path) -> None:
    config = parse_config(
        minimal(
            auto_update={
                "enabled": True, "feed": "https://vendor.example/gts/feed.json", "schedule": "30 2 * * 1-5",
                "timezone": "Europe/Paris", "jitter": "30m", "ca_file": "ca.pem", "bandwidth": "10MiB/s",
            },
            policy={"timezone": "America/New_York", "windows_for": "all", "approval_expires": "3d",
                    "windows": ["Sat 22:00-Sun 04:00", "Mon-Fri 22:00-04:00"]},
        ),
        base=tmp_path,
    )
    auto = config.auto_update
    assert (auto.enabled, auto.schedule, auto.timezone, auto.jitter) == (True, "30 2 * * 1-5", "Europe/Paris", 1800)
    assert auto.ca_file == tmp_path / "ca.pem" and auto.bandwidth == 10 * 2**20
    assert (config.policy.timezone, config.policy.windows_for, config.policy.approval_expires) == (
        "America/New_York", "all", 3 * 86400)


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"auto_update": {"enabled": True}}, "auto_update.feed: required when auto_update.enabled is true"),
        ({"auto_update": {"feed": "http://vendor.example/feed.json"}},
         "auto_update.feed: 'http://vendor.example/feed.json' is not an https:// URL"),
        ({"auto_update": {"feed": "https://"}}, "auto_update.feed: 'https://' is not an https:// URL"),
        ({"auto_update": {"schedule": "0 0 * *"}}, "auto_update.schedule: '0 0 * *' is not a cron schedule"),
        ({"auto_update": {"schedule": "0 0 * * * *"}}, "auto_update.schedule: '0 0 * * * *' is not a cron schedule"),
        ({"auto_update": {"schedule": "61 0 * * *"}}, "auto_update.schedule: '61 0 * * *' is not a cron schedule"),
        ({"auto_update": {"timezone": "Mars/Olympus"}}, "auto_update.timezone: 'Mars/Olympus' is not an IANA"),
        ({"policy": {"timezone": "../../etc/passwd"}}, "policy.timezone: '../../etc/passwd' is not an IANA"),
        ({"auto_update": {"bandwidth": "1KB/s"}}, "auto_update.bandwidth: a rate below 16KiB/s"),
        ({"auto_update": {"bandwidth": "fast"}}, "auto_update.bandwidth: expected a rate such as 10MiB/s"),
        ({"auto_update": {"jitter": "soon"}}, "auto_update.jitter: expected a duration"),
        ({"auto_update": {"channel": "unstable"}}, "auto_update.channel: unstable archives would be rejected"),
        ({"auto_update": {"feed": "https://v.example/f.json"}, "inbox": {"ignore": [".*"]}},
         "inbox.ignore: must ignore *.part"),
        ({"policy": {"windows_for": "patches"}}, "policy.windows_for: Input should be 'downtime' or 'all'"),
        ({"policy": {"approval_expires": "a week"}}, "policy.approval_expires: expected a duration"),
        ({"policy": {"windows": ["Sat 22:00-Sat 21:00"]}}, "ends before it opens"),
        ({"policy": {"windows": ["Mon 09:00-09:00"]}}, "opens and closes at the same time"),
        ({"policy": {"windows": ["Mon 25:00-26:00"]}}, "25:00 is not a time of day"),
        ({"policy": {"windows": ["Mon 24:00-02:00"]}}, "24:00 is not a time of day"),
    ],
)
def test_auto_update_and_window_keys_are_checked_with_their_key_path(
    tmp_path: Path, section: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(**section), base=tmp_path)
    assert any(p.startswith(problem) or problem in p for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize(
    ("background", "problem"),
    [
        ({"nice": 20}, "background.nice: Input should be less than or equal to 19"),
        ({"nice": -1}, "background.nice: Input should be greater than or equal to 0"),
        ({"io_class": "realtime"}, "background.io_class: Input should be 'idle', 'best-effort' or 'none'"),
        ({"ionice": "idle"}, "background.ionice: unknown key"),
    ],
)
def test_background_priority_accepts_only_what_yields_to_the_platform(
    tmp_path: Path, background: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(background=background), base=tmp_path)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems
    defaults = parse_config(minimal(), base=tmp_path).background
    assert (defaults.io_class, defaults.nice) == ("idle", 10)
