"""Console sessions: a random token in an HttpOnly cookie, idle and absolute expiry, a CSRF token each.

Sessions live in the daemon's memory only (a restart signs everyone out) and
are keyed by the SHA-256 of their token, so a lookup compares no secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SESSIONS = 1000  # beyond it the oldest sessions are dropped


def _key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass
class Session:
    account: str
    address: str
    created: float
    last_seen: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, message) shown on the next page

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, *, idle: float, absolute: float, now: Callable[[], float] = time.time) -> None:
        self.idle = idle
        self.absolute = absolute
        self.now = now
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def open(self, account: str, address: str) -> tuple[str, Session]:
        """A new session; returns its token (for the cookie only) and the session."""
        token = secrets.token_urlsafe(32)
        now = self.now()
        session = Session(account=account, address=address, created=now, last_seen=now)
        with self._lock:
            self._expire(now)
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].last_seen)
                del self._sessions[oldest]
            self._sessions[_key(token)] = session
        return token, session

    def get(self, token: str | None, *, touch: bool = True) -> Session | None:
        """The live session of `token`, or None (unknown, expired: an expired one is removed)."""
        if not token:
            return None
        now = self.now()
        with self._lock:
            key = _key(token)
            session = self._sessions.get(key)
            if session is None:
                return None
            if now - session.last_seen > self.idle or now - session.created > self.absolute:
                del self._sessions[key]
                return None
            if touch:
                session.last_seen = now
            return session

    def close(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._sessions.pop(_key(token), None)

    def close_account(self, account: str) -> None:
        """Sign an account out everywhere (it left the admin group)."""
        with self._lock:
            for key in [k for k, s in self._sessions.items() if s.account == account]:
                del self._sessions[key]

    def _expire(self, now: float) -> None:
        for key in [
            k for k, s in self._sessions.items() if now - s.last_seen > self.idle or now - s.created > self.absolute
        ]:
            del self._sessions[key]
