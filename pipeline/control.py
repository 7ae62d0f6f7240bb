"""The control socket: how `approve`, `retry`, `rollback`, `resolve`, `reject` and `auto-update` reach the daemon.

A Unix stream socket in the state folder, mode 0660, group `control.admin_group`;
the peer's credentials are checked again on every connection (root, the
daemon's own user, or a member of the admin group). One JSON request per
connection, one JSON answer (`reason: "not_allowed"` when the peer may not).

A request may say until when its sender waits (`expires`, epoch seconds): the
daemon does not start a request that arrives later (a frozen daemon that
thaws must not approve what its operator was told had failed). The client
gives up after that moment, unless the daemon already works on it (a
rollback, for as long as the daemon's heartbeat says it is alive).
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ControlRefused, DaemonUnreachable, NotAllowed
from pipeline.heartbeat import STALE_SECONDS, last_beat
from pipeline.quickconfig import config_path, load_quick
from pipeline.terminal import printable

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.quickconfig import SiteConfig

log = logging.getLogger("dropgate")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024
REQUEST_SECONDS = 10.0
# How long the client waits for an answer; the daemon starts no request older than that.
PATIENCE_SECONDS = 15.0
ANSWER_GRACE_SECONDS = 2.0  # a request started just before it expired still gets its answer
CONNECT_SECONDS = 5.0
NOT_ALLOWED = "not_allowed"

Handler = Callable[[dict[str, Any], str], str]


def socket_path(config: SiteConfig) -> Path:
    return config.paths.state / SOCKET_NAME


def read_line(conn: socket.socket) -> bytes:
    """One newline-terminated message (or what came before the peer closed), bounded in size."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("message too long")
    return data


def _peer(conn: socket.socket) -> tuple[int, int, int]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def peer_groups(pid: int, uid: int, gid: int) -> set[int]:
    """The groups the connecting process really has (its supplementary groups, as the kernel
    knows them, which covers LDAP/SSSD members), or else those the user database lists."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(group) for group in line.split()[1:]}
    except OSError:
        pass
    try:
        return set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        return {gid}


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class ControlServer(threading.Thread):
    def __init__(self, config: Config, handler: Handler) -> None:
        super().__init__(name="dropgate-control", daemon=True)
        self.path = socket_path(config)
        self.group = config.control.admin_group
        self.handler = handler
        self._stop = threading.Event()
        self._gid: int | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def bind(self) -> None:
        """Create the socket (we hold the daemon lock, so a leftover one is stale)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o117)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        try:
            self._gid = grp.getgrnam(self.group).gr_gid
            os.chown(self.path, -1, self._gid)
            os.chmod(self.path, 0o660)
        except KeyError:
            os.chmod(self.path, 0o600)
            log.warning(
                "control: group %r does not exist; only root and this user may use the control socket", self.group
            )
        self.sock.listen(16)
        self.sock.settimeout(0.5)

    def _allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, os.geteuid()):
            return True
        if self._gid is None:
            return False
        return self._gid == gid or self._gid in peer_groups(pid, uid, gid)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="dropgate-control-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            pid, uid, gid = _peer(conn)
            who = f"{_user_name(uid)} (pid {pid})"
            if not self._allowed(pid, uid, gid):
                self._answer(
                    conn,
                    False,
                    f"{_user_name(uid)} may not control dropgate (need root or group {self.group})",
                    reason=NOT_ALLOWED,
                )
                return
            try:
                conn.settimeout(REQUEST_SECONDS)  # a silent client must not hold a thread forever
                request = self._read(conn)
                conn.settimeout(None)  # the answer may wait for a whole rollback
                expires = request.get("expires")
                if isinstance(expires, int | float) and not isinstance(expires, bool) and time.time() > expires:
                    log.warning(
                        "control: %s from %s came after its sender had stopped waiting: not done",
                        request.get("command"),
                        who,
                    )
                    self._answer(conn, False, "the request came after its sender had stopped waiting: nothing was done")
                    return
                message = self.handler(request, who)
            except ControlRefused as refused:
                self._answer(conn, False, str(refused))
                return
            except (ValueError, KeyError, TimeoutError) as error:
                self._answer(conn, False, f"bad request: {error or 'nothing received in time'}")
                return
            except Exception as error:
                log.exception("control: %s failed", who)
                self._answer(conn, False, f"the daemon could not do it: {error}")
                return
            self._answer(conn, True, message)

    @staticmethod
    def _read(conn: socket.socket) -> dict[str, Any]:
        request = json.loads(read_line(conn))
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            raise ValueError('expected {"command": ...}')  # noqa: TRY004 (answered as a bad request)
        return request

    @staticmethod
    def _answer(conn: socket.socket, ok: bool, message: str, *, reason: str | None = None) -> None:
        answer: dict[str, Any] = {"ok": ok, "message": message}
        if reason is not None:
            answer["reason"] = reason
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(answer).encode() + b"\n")

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _silence(config: SiteConfig) -> str:
    """What the heartbeat says about a daemon that does not answer."""
    beat = last_beat(config.paths.state)
    if beat is None:
        return "it has no heartbeat"
    return f"its main loop last beat {max(0.0, time.time() - beat):.0f} s ago"


def _heartbeat_fresh(config: SiteConfig) -> bool:
    beat = last_beat(config.paths.state)
    return beat is not None and time.time() - beat <= STALE_SECONDS


def send(
    config: SiteConfig, request: dict[str, Any], *, patience: float = PATIENCE_SECONDS, long_running: bool = False
) -> tuple[bool, str]:
    """Send one request to the running daemon and wait for its answer.

    DaemonUnreachable when none runs, or none answers within `patience` seconds
    (the daemon will then not start the request either); NotAllowed when this
    user may not use the socket. A `long_running` request (a rollback) is
    waited for past `patience` as long as the daemon's heartbeat is fresh.
    """
    path = socket_path(config)
    expires = time.time() + patience
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_SECONDS)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as error:
        sock.close()
        raise DaemonUnreachable(
            f"the dropgate daemon is not running (nothing answers on {path}); "
            "start it (systemctl start dropgate) and try again"
        ) from error
    except PermissionError as error:
        sock.close()
        raise NotAllowed(
            f"no permission to use {path}: run as root or as a member of group {config.control.admin_group}"
        ) from error
    except OSError as error:  # a full listen queue: the daemon accepts nothing
        sock.close()
        raise DaemonUnreachable(
            f"the dropgate daemon does not accept connections on {path} ({_silence(config)}): "
            "it is frozen or overloaded; see `dropgate status`"
        ) from error
    with sock:
        sock.settimeout(1.0)
        # The daemon may answer (a refusal) and close before reading all of it: then read what it said.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(json.dumps({**request, "expires": expires}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            except TimeoutError:
                late = time.time() > expires + ANSWER_GRACE_SECONDS
                if late and not (long_running and _heartbeat_fresh(config)):
                    what = "nothing was done" if not long_running else "if it had begun, it goes on when it can"
                    raise DaemonUnreachable(
                        f"the dropgate daemon did not answer within {patience:.0f} s ({_silence(config)}): "
                        f"it is frozen or overloaded; {what}. See `dropgate status`"
                    ) from None
                continue
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                raise DaemonUnreachable(f"the daemon's answer on {path} is too long")
    if not data:
        raise DaemonUnreachable(f"the daemon closed {path} without answering (is it stopping?)")
    try:
        answer = json.loads(data)
    except ValueError as error:
        raise DaemonUnreachable(f"the daemon's answer on {path} is not JSON: {data[:200]!r}") from error
    if answer.get("reason") == NOT_ALLOWED:
        raise NotAllowed(str(answer["message"]))
    return bool(answer["ok"]), str(answer["message"])


def _command(args: argparse.Namespace, request: dict[str, Any], *, long_running: bool = False) -> int:
    config = load_quick(config_path(args.config))
    ok, message = send(config, request, long_running=long_running)
    if ok:
        print(printable(message))
    else:
        print(f"dropgate: {printable(message)}", file=sys.stderr)
    return 0 if ok else 1


def cmd_approve(args: argparse.Namespace) -> int:
    return _command(args, {"command": "approve", "id": args.id})


def cmd_retry(args: argparse.Namespace) -> int:
    return _command(args, {"command": "retry", "id": args.id})


def cmd_resolve(args: argparse.Namespace) -> int:
    return _command(args, {"command": "resolve", "id": args.id, "note": args.note})


def cmd_rollback(args: argparse.Namespace) -> int:
    # A rollback can take as long as a restore: wait for its answer while the daemon is alive.
    return _command(args, {"command": "rollback", "id": args.id}, long_running=True)


def cmd_reject(args: argparse.Namespace) -> int:
    return _command(args, {"command": "reject", "id": args.id, "note": args.note})


def cmd_auto_update(args: argparse.Namespace) -> int:
    return _command(args, {"command": "auto-update", "enabled": args.state == "on"})
