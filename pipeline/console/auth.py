"""Who may sign in to the console: a machine account (PAM) in `control.admin_group`, not guessed.

The rule is the control socket's: membership of the admin group (primary or
supplementary, as the user database and NSS, e.g. SSSD, list it). Every
refusal reads the same, so the page never tells whether an account exists.
The throttle counts failures per account name and per source address and
makes each try past the free ones wait, doubling up to `max_delay`.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import pam

from pipeline.config import ConsoleThrottle

log = logging.getLogger("dropgate")

REFUSED = "Sign-in refused: the account name or the password is wrong, or this account may not update the platform."
MAX_NAME = 256
MAX_PASSWORD = 4096
FIRST_DELAY = 8.0  # seconds before the first try past the free ones; then 16, 32, … up to max_delay
MAX_WAITING = 8  # sign-ins queued behind the one PAM is checking; more are turned away at once
BUSY = "Too many sign-ins at once: try again in a moment."
MAX_TRACKED = 10_000  # throttle entries kept (oldest forgotten first), so guessing cannot fill memory

Authenticator = Callable[[str, str, str], bool]


def pam_authenticate(service: str, account: str, password: str) -> bool:
    """Whether PAM's `service` accepts this account and password (auth and account management)."""
    if not account or len(account) > MAX_NAME or len(password) > MAX_PASSWORD:
        return False
    if "\0" in account or "\0" in password:
        return False
    handle = pam.pam()  # one handle per call: a PAM handle is not shared between threads
    return bool(handle.authenticate(account, password, service=service, resetcreds=False))


def in_group(account: str, group: str) -> bool:
    """Whether `account` is a member of `group` (primary group or supplementary, as getgrouplist says)."""
    try:
        user = pwd.getpwnam(account)
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return False
    return gid == user.pw_gid or gid in set(_grouplist(account, user.pw_gid))


def _grouplist(account: str, gid: int) -> list[int]:
    try:
        return os.getgrouplist(account, gid)
    except OSError:
        return [gid]


@dataclass
class _Failures:
    times: list[float] = field(default_factory=list)


class Throttle:
    """Failed sign-ins per key ("account NAME", "address ADDR"): past the free ones, each try waits.

    A try refused by the throttle is not counted: it did not reach PAM.
    """

    def __init__(self, settings: ConsoleThrottle, *, now: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.now = now
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def _recent(self, key: str, now: float) -> list[float]:
        entry = self._failures.get(key)
        if entry is None:
            return []
        entry.times = [t for t in entry.times if now - t < self.settings.window]
        if not entry.times:
            del self._failures[key]
            return []
        return entry.times

    def wait_seconds(self, keys: list[str]) -> float:
        """How long before these keys may try again (0: now)."""
        settings = self.settings
        now = self.now()
        longest = 0.0
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                over = len(times) - settings.free_attempts + 1
                if over <= 0:
                    continue
                delay = min(settings.max_delay, FIRST_DELAY * 2.0 ** min(over - 1, 30))
                longest = max(longest, times[-1] + delay - now)
        return max(0.0, longest)

    def failed(self, keys: list[str]) -> None:
        now = self.now()
        with self._lock:
            for key in keys:
                entry = self._failures.pop(key, None) or _Failures()
                entry.times.append(now)
                entry.times = entry.times[-(self.settings.free_attempts + 32) :]
                self._failures[key] = entry
            while len(self._failures) > MAX_TRACKED:
                self._failures.popitem(last=False)

    def succeeded(self, account_key: str) -> None:
        """A good sign-in clears its account's count (not the address's: one good password from an
        address says nothing about the other names tried from it)."""
        with self._lock:
            self._failures.pop(account_key, None)


@dataclass
class SignIn:
    """The sign-in rule: throttle, PAM, then group membership; one message for every refusal."""

    service: str
    group: str
    throttle: Throttle
    authenticate: Authenticator = pam_authenticate
    member: Callable[[str, str], bool] = in_group
    # One sign-in at a time: pam_unix reads the shadow file through non-reentrant calls, and parallel
    # guesses must each see the failures counted before them.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiting: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(MAX_WAITING))

    def check(self, account: str, password: str, address: str) -> tuple[bool, str]:
        """(True, "") when `account` may use the console, else (False, what to show). Blocking (PAM)."""
        keys = [f"account {account.lower()}", f"address {address}"]
        throttled = self._throttled(account, address, keys)  # at once, without queueing behind PAM
        if throttled:
            return False, throttled
        if not self._waiting.acquire(blocking=False):
            log.warning("console: sign-in as %r from %s not tried: too many sign-ins at once", account[:64], address)
            return False, BUSY
        try:
            with self._lock:
                return self._check(account, password, address, keys)
        finally:
            self._waiting.release()

    def _throttled(self, account: str, address: str, keys: list[str]) -> str:
        wait = self.throttle.wait_seconds(keys)
        if wait > 0:
            log.warning(
                "console: sign-in as %r from %s not tried: too many failures, next try in %.0fs",
                account[:64],
                address,
                wait,
            )
            return f"Too many failed sign-ins from here or for this account: try again in {wait:.0f} s."
        return ""

    def _check(self, account: str, password: str, address: str, keys: list[str]) -> tuple[bool, str]:
        throttled = self._throttled(account, address, keys)  # again: the failures counted while this one waited
        if throttled:
            return False, throttled
        if self.authenticate(self.service, account, password) and self.member(account, self.group):
            self.throttle.succeeded(keys[0])
            log.info("console: %s signed in from %s", account, address)
            return True, ""
        self.throttle.failed(keys)
        log.warning("console: sign-in refused for %r from %s", account[:64], address)
        return False, REFUSED
