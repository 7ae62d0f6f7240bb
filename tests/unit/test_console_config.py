"""The `console` section: off by default, TLS required off loopback, and its cross-checks, each naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import ConfigError, is_loopback, parse_config


def config(**console: Any) -> dict[str, Any]:
    return {"platform": {"product": "gts", "root": "/srv/gts"}, "console": console}


def problems(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base=tmp_path)
    return caught.value.problems


def test_the_console_is_off_by_default(tmp_path: Path) -> None:
    loaded = parse_config({"platform": {"product": "gts", "root": "/srv/gts"}}, base=tmp_path)
    assert loaded.console.listen is None and loaded.console.address is None


@pytest.mark.parametrize("listen", ["127.0.0.1:9109", "127.8.9.10:9109", "[::1]:9109", "localhost:9109"])
def test_a_loopback_console_needs_no_tls(tmp_path: Path, listen: str) -> None:
    loaded = parse_config(config(listen=listen), base=tmp_path)
    assert loaded.console.address is not None and is_loopback(loaded.console.address[0])


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9109", "[::]:9109", "192.0.2.1:9109", "console.example:9109", "[2001:db8::1]:9109"]
)
def test_a_console_off_loopback_without_tls_is_a_configuration_error_naming_console_tls(
    tmp_path: Path, listen: str
) -> None:
    found = problems(config(listen=listen), tmp_path)
    assert len(found) == 1
    assert found[0].startswith(f"console.tls: required because console.listen ({listen}) is not a loopback address")


def test_with_tls_any_address_is_accepted_and_its_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    loaded = parse_config(config(listen="0.0.0.0:9109", tls={"cert": "tls/c.pem", "key": "tls/k.pem"}), base=tmp_path)
    assert loaded.console.tls is not None
    assert loaded.console.tls.cert == tmp_path / "tls" / "c.pem"
    assert loaded.console.tls.key == tmp_path / "tls" / "k.pem"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (config(listen="127.0.0.1:9108"), "console.listen: must differ from metrics.listen"),
        (
            {**config(listen="127.0.0.1:9109"), "inbox": {"ignore": [".*"]}},
            "inbox.ignore: must ignore '*.part' while the console is on",
        ),
        (
            config(listen="127.0.0.1:9109", session_idle="2h", session_max="1h"),
            "console.session_max: must be at least console.session_idle",
        ),
        (config(listen="127.0.0.1"), "console.listen: String should match pattern"),
        (config(trusted_proxies=["nginx.local"]), "console.trusted_proxies: 'nginx.local' is not an IP address"),
        (config(throttle={"free_attempts": 0}), "console.throttle.free_attempts: Input should be greater than"),
        (config(session_idle="soon"), "console.session_idle: expected a duration"),
        (config(pam_service="../../etc/shadow"), "console.pam_service: String should match pattern"),
        (config(listen="127.0.0.1:9109", password="x"), "console.password: unknown key"),
    ],
)
def test_each_console_mistake_names_its_key(tmp_path: Path, raw: dict[str, Any], expected: str) -> None:
    found = problems(raw, tmp_path)
    assert any(p.startswith(expected) for p in found), found


def test_durations_of_the_console_accept_the_usual_forms(tmp_path: Path) -> None:
    loaded = parse_config(
        config(listen="127.0.0.1:9109", session_idle="90s", session_max="4h", throttle={"window": "15m"}),
        base=tmp_path,
    )
    assert (loaded.console.session_idle, loaded.console.session_max) == (90.0, 14400.0)
    assert loaded.console.throttle.window == 900.0
