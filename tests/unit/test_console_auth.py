"""Sign-in rule, throttle and sessions, with the clock injected (the real PAM is in tests/e2e/test_console.py)."""

from __future__ import annotations

import concurrent.futures
import grp
import os
import pwd
import threading
import time

import pytest

from pipeline.config import ConsoleThrottle
from pipeline.console.auth import (
    BUSY,
    MAX_TRACKED,
    MAX_WAITING,
    REFUSED,
    SignIn,
    Throttle,
    in_group,
    pam_authenticate,
)
from pipeline.console.sessions import Sessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, **settings: float) -> Throttle:
    return Throttle(ConsoleThrottle(**{"free_attempts": 3, "window": 600, "max_delay": 60, **settings}), now=clock)


def test_the_free_attempts_cost_nothing_then_each_try_waits_twice_as_long_up_to_the_cap() -> None:
    clock = Clock()
    gate = throttle(clock)
    keys = ["account alice", "address 192.0.2.1"]
    waits = []
    for _ in range(10):
        waits.append(gate.wait_seconds(keys))
        gate.failed(keys)
    assert waits == [0, 0, 0, 8, 16, 32, 60, 60, 60, 60]  # three free attempts, then doubling, capped at max_delay
    assert gate.wait_seconds(keys) == 60.0
    clock.now += 59.0
    assert gate.wait_seconds(keys) == pytest.approx(1.0)
    clock.now += 1.0
    assert gate.wait_seconds(keys) == 0.0


@pytest.mark.parametrize(("failures", "wait"), [(2, 0.0), (3, 8.0), (4, 16.0), (5, 32.0), (6, 60.0), (9, 60.0)])
def test_the_wait_at_each_count_of_failures(failures: int, wait: float) -> None:
    clock = Clock()
    gate = throttle(clock)
    for _ in range(failures):
        gate.failed(["account bob"])
    assert gate.wait_seconds(["account bob"]) == wait


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    gate = throttle(clock, window=100)
    for _ in range(5):
        gate.failed(["address 198.51.100.1"])
    assert gate.wait_seconds(["address 198.51.100.1"]) > 0
    clock.now += 100.0
    assert gate.wait_seconds(["address 198.51.100.1"]) == 0.0


def test_a_key_counts_for_itself_and_the_longest_wait_of_the_keys_applies() -> None:
    clock = Clock()
    gate = throttle(clock)
    for _ in range(4):
        gate.failed(["address 192.0.2.7"])
    assert gate.wait_seconds(["account carol", "address 192.0.2.8"]) == 0.0
    assert gate.wait_seconds(["account carol", "address 192.0.2.7"]) == 16.0


def test_guessing_many_names_cannot_fill_memory() -> None:
    clock = Clock()
    gate = throttle(clock)
    for n in range(MAX_TRACKED + 500):
        gate.failed([f"account guess-{n}"])
    assert len(gate._failures) == MAX_TRACKED


def test_every_refusal_reads_the_same_and_only_a_member_with_the_right_password_passes() -> None:
    passwords = {"alice": "right", "mallory": "right"}
    members = {"alice"}
    rule = SignIn(
        service="dropgate",
        group="admins",
        throttle=throttle(Clock(), free_attempts=100),
        authenticate=lambda _service, account, password: passwords.get(account) == password,
        member=lambda account, _group: account in members,
    )
    assert rule.check("alice", "right", "192.0.2.1") == (True, "")
    for account, password in (("alice", "wrong"), ("mallory", "right"), ("nobody", "right"), ("", "")):
        assert rule.check(account, password, "192.0.2.1") == (False, REFUSED)


def test_a_good_sign_in_clears_its_account_but_not_its_address() -> None:
    clock = Clock()
    gate = throttle(clock, free_attempts=2)
    rule = SignIn(
        service="dropgate",
        group="admins",
        throttle=gate,
        authenticate=lambda _service, _account, password: password == "right",
        member=lambda _account, _group: True,
    )
    rule.check("alice", "wrong", "192.0.2.1")
    assert rule.check("alice", "right", "192.0.2.1")[0]
    assert gate.wait_seconds(["account alice"]) == 0.0
    rule.check("bob", "wrong", "192.0.2.1")
    refused = rule.check("carol", "right", "192.0.2.1")  # the address has 2 failures now
    assert refused[0] is False and refused[1].startswith("Too many failed sign-ins")


@pytest.mark.parametrize(
    ("account", "password"), [("", "x"), ("a\0b", "x"), ("alice", "p\0w"), ("x" * 300, "x"), ("alice", "p" * 5000)]
)
def test_pam_is_not_even_asked_for_impossible_input(account: str, password: str) -> None:
    assert pam_authenticate("dropgate", account, password) is False


def test_group_membership_follows_the_user_database() -> None:
    me = pwd.getpwuid(os.getuid())
    primary = grp.getgrgid(me.pw_gid).gr_name
    assert in_group(me.pw_name, primary)
    assert not in_group("no-such-account-dropgate", primary)
    assert not in_group(me.pw_name, "no-such-group-dropgate")


def test_sessions_end_when_idle_or_old_and_a_refresh_is_no_activity() -> None:
    clock = Clock()
    sessions = Sessions(idle=10, absolute=25, now=clock)
    token, session = sessions.open("alice", "192.0.2.1")
    assert sessions.get(token) is session
    clock.now += 9
    assert sessions.get(token, touch=False) is session  # a refresh: last_seen unchanged
    clock.now += 2
    assert sessions.get(token) is None  # 11 s idle
    token, session = sessions.open("alice", "192.0.2.1")
    for _ in range(4):
        clock.now += 6
        assert sessions.get(token) is session  # kept alive by clicks...
    clock.now += 2
    assert sessions.get(token) is None  # ...until 26 s after it opened
    assert sessions.get(None) is None and sessions.get("") is None and sessions.get("made-up") is None


def test_a_closed_session_and_the_sessions_of_an_account_are_gone() -> None:
    sessions = Sessions(idle=100, absolute=100, now=Clock())
    first, _ = sessions.open("alice", "a")
    second, _ = sessions.open("alice", "b")
    third, _ = sessions.open("bob", "c")
    sessions.close(first)
    assert sessions.get(first) is None and sessions.get(second) is not None
    sessions.close_account("alice")
    assert sessions.get(second) is None and sessions.get(third) is not None


def test_the_csrf_token_is_compared_exactly() -> None:
    _, session = Sessions(idle=100, absolute=100, now=Clock()).open("alice", "a")
    assert session.csrf_ok(session.csrf)
    for forged in (None, "", session.csrf[:-1], session.csrf + "x", session.csrf.upper()):
        assert not session.csrf_ok(forged)


def test_parallel_guesses_each_see_the_failures_counted_before_them() -> None:
    # Given an authenticator as slow as pam_unix's failure delay, and three free attempts
    asked: list[str] = []

    def slow_refusal(_service: str, account: str, _password: str) -> bool:
        asked.append(account)
        time.sleep(0.05)
        return False

    rule = SignIn(service="dropgate", group="admins", throttle=throttle(Clock()), authenticate=slow_refusal)
    # When ten guesses for one account arrive at once
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda n: rule.check("alice", f"guess-{n}", f"192.0.2.{n}"), range(10)))
    # Then only the free attempts reached PAM; the others were throttled (or turned away) without asking it
    assert len(asked) == 3
    assert [message for _, message in answers].count(REFUSED) == 3
    assert all(message.startswith("Too many") for _, message in answers if message != REFUSED)
    assert not any(ok for ok, _ in answers)


def test_sign_ins_queued_behind_pam_are_bounded_and_the_rest_turned_away_at_once() -> None:
    # Given PAM stuck on one sign-in (a slow directory server)
    release = threading.Event()
    entered = threading.Event()

    def stuck(_service: str, _account: str, _password: str) -> bool:
        entered.set()
        release.wait(30)
        return False

    rule = SignIn(
        service="dropgate", group="admins", throttle=throttle(Clock(), free_attempts=1000), authenticate=stuck
    )
    with concurrent.futures.ThreadPoolExecutor(max_workers=MAX_WAITING) as pool:
        first = pool.submit(rule.check, "alice", "x", "192.0.2.1")
        assert entered.wait(30)
        queued = [pool.submit(rule.check, f"user{n}", "x", f"192.0.2.{n + 2}") for n in range(MAX_WAITING - 1)]
        # When one more arrives while the queue is full, Then it is answered at once, not queued
        deadline = time.monotonic() + 30
        while rule._waiting._value > 0 and time.monotonic() < deadline:  # the queued ones have taken their places
            time.sleep(0.01)
        assert rule.check("mallory", "x", "198.51.100.1") == (False, BUSY)
        release.set()
        assert first.result(30) == (False, REFUSED)
        assert all(f.result(30) == (False, REFUSED) for f in queued)
