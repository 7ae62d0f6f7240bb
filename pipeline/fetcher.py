"""Downloads from the vendor: the feed, and archives into `<inbox>/<name>.part`, resumed with HTTP Range.

HTTPS only, TLS always verified (the system's CAs, plus `auto_update.ca_file`),
proxies from the environment (`HTTPS_PROXY`, `NO_PROXY`, as curl reads them),
redirects followed only to https. An archive's bytes are bounded by the length
the signed feed announces and hashed as they arrive; a dropped connection
resumes from the `.part` at once as long as each attempt brought new bytes,
and a restart resumes from it too. Bytes whose SHA-256 is not the feed's are
moved aside, never renamed into the inbox. The caller renames a verified
`.part` into the inbox; from there it is an ordinary drop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import re
import shutil
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pipeline import __version__
from pipeline.errors import FetchFailed, FetchStopped

log = logging.getLogger("dropgate")

CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 60.0  # no byte for this long: the connection is given up (and resumed)
LOW_SPEED_SECONDS = 120.0  # slow retrieval: fewer than LOW_SPEED_BYTES in this long ends the attempt
LOW_SPEED_BYTES = 120 * 2**10
MAX_RESUMES = 20  # per check; the next check resumes again from the .part
RESUME_PAUSE = 1.0
MAX_REDIRECTS = 5
SPACE_MARGIN = 64 * 2**20
PROGRESS_INTERVAL = 0.5
_HASH_CHUNK = 2**20
SINK_BLOCK = 2**20
SINK_QUEUE = 8
SINK_SECONDS = 1.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)", re.ASCII)
Progress = Callable[[int, int], None]


@dataclass
class Throttle:
    """Keeps a transfer at or below `rate` bytes per second (0: no limit) by pausing between chunks."""

    rate: float
    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Any] = time.sleep
    _start: float = field(default=0.0, init=False)
    _bytes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._start = self.now()

    def account(self, count: int) -> None:
        if self.rate <= 0:
            return
        self._bytes += count
        ahead = self._bytes / self.rate - (self.now() - self._start)
        if ahead > 0:
            self.sleep(ahead)


@dataclass
class _State:
    """How far a download is: bytes in the .part, and their running hash."""

    have: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)

    def restart(self) -> None:
        self.have, self.hasher = 0, hashlib.sha256()


class _Sink:
    """Writes and hashes what arrives on a thread of its own, in buffers of SINK_BLOCK bytes.

    Reading the socket (TLS decryption), hashing and writing then overlap
    instead of taking turns (when a core is free). The buffers come from a
    pool of SINK_QUEUE + 1: the reader fills one (`space`/`filled`, straight
    from the socket, or `add`) while the thread writes and hashes the others,
    so memory stays bounded whatever the download's size. Leaving the `with`
    writes every byte received so far (a resume starts after them) and raises
    a write error.
    """

    def __init__(self, fd: int, state: _State, part: Path) -> None:
        self._fd, self._state, self._part = fd, state, part
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(SINK_QUEUE + 1):
            self._free.put(bytearray(SINK_BLOCK))
        self._work: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._buffer, self._used = self._free.get(), 0
        self._submitted = time.monotonic()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._drain, name="dropgate-fetch-writer", daemon=True)

    def __enter__(self) -> _Sink:
        self._thread.start()
        return self

    def space(self) -> memoryview:
        """The free end of the current buffer, to receive into."""
        return memoryview(self._buffer)[self._used :]

    def filled(self, count: int) -> None:
        """`count` bytes were received into `space()`."""
        self._used += count
        if self._used >= SINK_BLOCK or time.monotonic() - self._submitted >= SINK_SECONDS:
            self._submit()  # on a slow link too, the .part (what `status` shows) follows within a second

    def add(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self.space()
            take = min(len(room), len(view))
            room[:take] = view[:take]
            view = view[take:]
            self.filled(take)

    def _submit(self) -> None:
        if self._error is not None:
            raise FetchFailed(f"cannot write {self._part}: {self._error.strerror}")
        self._submitted = time.monotonic()
        if self._used:
            self._work.put((self._buffer, self._used))
            self._buffer, self._used = self._free.get(), 0

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(FetchFailed):
            self._submit()
        self._work.put(None)
        self._thread.join()
        if self._error is not None:
            raise FetchFailed(f"cannot write {self._part}: {self._error.strerror}")

    def _drain(self) -> None:
        while (item := self._work.get()) is not None:
            buffer, used = item
            if self._error is None:
                data = memoryview(buffer)[:used]
                try:
                    while data:
                        data = data[os.write(self._fd, data) :]
                except OSError as error:
                    self._error = error
                else:
                    self._state.hasher.update(memoryview(buffer)[:used])
                    self._state.have += used
            self._free.put(buffer)  # back to the reader, also after an error: it must never wait forever


def _tls_socket(response: httpx.Response) -> ssl.SSLSocket | None:
    """The TLS socket the body arrives on, when the rest of it may be read from there directly.

    Past the headers, a body of known length is plain bytes on the socket; reading it
    there in large pieces skips a parser round per 16 KiB TLS record (half the CPU of
    a download). Only for a body with Content-Length and no transfer coding, on
    httpcore's own TLS socket (not TLS inside TLS through an https:// proxy, where
    that socket carries the proxy's encryption). Whatever the path, the bytes are
    checked against the signed length and SHA-256.
    """
    headers = response.headers
    if "content-length" not in headers or "transfer-encoding" in headers:
        return None
    if urllib.request.getproxies().get("https", "").startswith("https:"):
        return None
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    return sock if isinstance(sock, ssl.SSLSocket) else None


class _Transfer:
    """One response's accounting: bytes so far, progress, the slow-retrieval floor, the bandwidth limit, stop."""

    def __init__(self, fetcher: Fetcher, url: str, part: Path, have: int, length: int) -> None:
        self.fetcher, self.url, self.part, self.have, self.length = fetcher, url, part, have, length
        self.received = 0
        self.throttle = Throttle(fetcher.bandwidth, sleep=fetcher.cancel.wait)
        self.window_start, self.window_bytes = time.monotonic(), 0
        self.reported = 0.0

    def account(self, count: int) -> None:
        fetcher = self.fetcher
        if fetcher.cancel.is_set():
            raise fetcher._stop(self.part, self.have, self.length)
        self.have += count
        self.received += count
        self.window_bytes += count
        now = time.monotonic()
        if fetcher.on_progress is not None and (now - self.reported >= PROGRESS_INTERVAL or self.have >= self.length):
            self.reported = now
            fetcher.on_progress(self.have, self.length)
        if now - self.window_start >= LOW_SPEED_SECONDS:
            if self.window_bytes < LOW_SPEED_BYTES:
                raise _Cut(
                    f"{httpx.URL(self.url).host}: only {self.window_bytes} bytes in "
                    f"{now - self.window_start:.0f}s (too slow)",
                    0,
                )
            self.window_start, self.window_bytes = now, 0
        self.throttle.account(count)


class _Cut(Exception):
    """The connection ended before the archive was complete (after `received` new bytes)."""

    def __init__(self, message: str, received: int) -> None:
        super().__init__(message)
        self.received = received


def _what_failed(url: str, error: httpx.HTTPError) -> str:
    """One line naming the server and what went wrong, for any httpx error."""
    host = httpx.URL(url).host or url
    detail = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, httpx.ConnectTimeout):
        return f"{host}: no connection within {CONNECT_TIMEOUT:.0f}s"
    if isinstance(error, httpx.ReadTimeout):
        return f"{host}: no data for {READ_TIMEOUT:.0f}s"
    if isinstance(error, httpx.ProxyError):
        return f"{host}: the proxy refused or failed: {detail}"
    if "CERTIFICATE_VERIFY_FAILED" in detail or "certificate" in detail.lower():
        return f"{host}: its TLS certificate is not trusted ({detail}); set auto_update.ca_file if it uses a private CA"
    if isinstance(error, httpx.ConnectError):
        return f"{host}: cannot connect: {detail}"
    return f"{host}: {detail}"


class Fetcher:
    """One check's HTTP client; `cancel` stops a download between chunks (its .part is kept)."""

    def __init__(
        self,
        *,
        ca_file: Path | None = None,
        bandwidth: float = 0.0,
        cancel: threading.Event | None = None,
        on_progress: Progress | None = None,
        resume_pause: float = RESUME_PAUSE,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.ca_file = ca_file
        self.bandwidth = bandwidth
        self.cancel = cancel or threading.Event()
        self.on_progress = on_progress
        self.resume_pause = resume_pause
        self.read_timeout = read_timeout
        self.stop_reason = "stopped"

    def _client(self) -> httpx.Client:
        context = ssl.create_default_context()  # verification on: CERT_REQUIRED and host name checks
        if self.ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError) as error:
                raise FetchFailed(
                    f"auto_update.ca_file {self.ca_file}: cannot load it as PEM CA certificates: {error}"
                ) from None
        return httpx.Client(
            verify=context,
            trust_env=True,  # HTTPS_PROXY, NO_PROXY
            timeout=httpx.Timeout(self.read_timeout, connect=CONNECT_TIMEOUT),
            follow_redirects=False,
            headers={"User-Agent": f"dropgate/{__version__}", "Accept-Encoding": "identity"},
        )

    def _send(self, client: httpx.Client, url: str, headers: dict[str, str]) -> httpx.Response:
        """GET `url` as a stream, following up to MAX_REDIRECTS redirects, each to an https URL."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = client.send(client.build_request("GET", url, headers=headers), stream=True)
            except httpx.HTTPError as error:
                raise FetchFailed(_what_failed(url, error)) from None
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("location", "")
            response.close()
            target = str(response.url.join(location)) if location else ""
            if not target.startswith("https://"):
                raise FetchFailed(f"{url}: redirected to {target[:200]!r}, which is not an https URL")
            url = target
        raise FetchFailed(f"{url}: more than {MAX_REDIRECTS} redirects")

    # -- the feed ------------------------------------------------------------------
    def get(self, url: str, *, max_bytes: int) -> bytes:
        """The body of `url` (status 200), refused when longer than `max_bytes`."""
        with self._client() as client:
            response = self._send(client, url, {})
            try:
                if response.status_code != 200:
                    raise FetchFailed(f"{url}: the server answered {response.status_code} {response.reason_phrase}")
                announced = response.headers.get("content-length")
                if announced is not None and announced.isdigit() and int(announced) > max_bytes:
                    raise FetchFailed(f"{url}: {announced} bytes, more than the limit of {max_bytes}")
                data = bytearray()
                for chunk in response.iter_raw():
                    data += chunk
                    if len(data) > max_bytes:
                        raise FetchFailed(f"{url}: more than the limit of {max_bytes} bytes")
            except httpx.HTTPError as error:
                raise FetchFailed(_what_failed(url, error)) from None
            finally:
                response.close()
        return bytes(data)

    # -- an archive -------------------------------------------------------------------
    def download(self, url: str, *, length: int, sha256: str, part: Path, reject_dir: Path) -> None:
        """Complete `part` to the `length` bytes of `url` and check their SHA-256.

        A `.part` already there is resumed (its bytes are hashed first). Bytes
        that are not the feed's are moved to `reject_dir` and FetchFailed says so.
        """
        state = self._prefix(part, length)
        self._check_space(part, length - state.have)
        resumes = 0
        with self._client() as client:
            while state.have < length:
                try:
                    self._receive(client, url, part, state, length)
                except _Cut as cut:
                    if cut.received == 0 or resumes >= MAX_RESUMES:
                        raise FetchFailed(
                            f"{cut}; {state.have} of {length} bytes are kept in {part.name}, "
                            "the download resumes at the next check"
                        ) from None
                    resumes += 1
                    log.info("fetch: %s; resuming %s at byte %d (resume %d)", cut, part.name, state.have, resumes)
                    self.cancel.wait(self.resume_pause)
        digest = state.hasher.hexdigest()
        if digest != sha256:
            reason = (
                f"{part.name[: -len('.part')]}: the downloaded bytes have SHA-256 {digest}, "
                f"the signed feed says {sha256}: not used"
            )
            self._set_aside(part, reject_dir, reason)
            raise FetchFailed(f"{reason} (moved to {reject_dir})")
        with open(part, "rb+") as handle:
            os.fsync(handle.fileno())

    @staticmethod
    def _prefix(part: Path, length: int) -> _State:
        """What an earlier attempt left in `part`, and the hash of it."""
        state = _State()
        try:
            size = part.stat().st_size
        except FileNotFoundError:
            return state
        if size > length:
            log.warning("fetch: %s is longer than the %d bytes announced; starting again", part.name, length)
            os.truncate(part, 0)
            return state
        with open(part, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                state.hasher.update(chunk)
        state.have = size
        return state

    @staticmethod
    def _check_space(part: Path, needed: int) -> None:
        free = shutil.disk_usage(part.parent).free
        if free < needed + SPACE_MARGIN:
            raise FetchFailed(
                f"not enough space in {part.parent} for {part.name}: {needed} bytes to download "
                f"(+{SPACE_MARGIN // 2**20} MiB margin), {free} free"
            )

    def _stop(self, part: Path, have: int, length: int) -> FetchStopped:
        return FetchStopped(f"{self.stop_reason}; {have} of {length} bytes are kept in {part.name}")

    def _receive(self, client: httpx.Client, url: str, part: Path, state: _State, length: int) -> None:
        """One request from byte `state.have` on; advances `state`, or raises _Cut/FetchFailed."""
        have = state.have
        if self.cancel.is_set():
            raise self._stop(part, have, length)
        response = self._send(client, url, {"Range": f"bytes={have}-"} if have else {})
        try:
            status = response.status_code
            if have and status == 206:
                match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
                if match is None or int(match.group(1)) != have:
                    raise FetchFailed(
                        f"{url}: asked for bytes {have}- and the server answered the range "
                        f"{response.headers.get('content-range', '(none)')!r}"
                    )
            elif status == 200:
                if have:
                    log.info("fetch: %s ignores Range requests; downloading %s from byte 0", url, part.name)
                state.restart()
            elif status == 416 and have:
                log.warning("fetch: %s refused the range bytes=%d-; downloading %s from byte 0", url, have, part.name)
                os.truncate(part, 0)
                state.restart()
                return
            else:
                raise FetchFailed(f"{url}: the server answered {status} {response.reason_phrase}")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise FetchFailed(f"{url}: the server sent the archive with Content-Encoding {encoding!r}")
            announced = response.headers.get("content-length")
            if announced is not None and announced.isdigit() and int(announced) > length - state.have:
                raise FetchFailed(
                    f"{url}: the server announces {int(announced) + state.have} bytes, the signed feed {length}"
                )
            self._write(response, url, part, state, length)
        finally:
            response.close()

    def _write(self, response: httpx.Response, url: str, part: Path, state: _State, length: int) -> None:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        transfer = _Transfer(self, url, part, state.have, length)
        try:
            os.ftruncate(fd, state.have)
            os.lseek(fd, state.have, os.SEEK_SET)
            with _Sink(fd, state, part) as sink:
                try:
                    direct = _tls_socket(response)
                    body = response.iter_raw()  # kept: when it is closed, httpcore closes the connection
                    for chunk in body:
                        data = chunk[: length - transfer.have]  # never more than the signed length
                        sink.add(data)
                        transfer.account(len(data))
                        if transfer.have >= length or direct is not None:
                            break  # h11 has handed over what it had buffered: the socket has the rest
                    if direct is not None:
                        direct.settimeout(self.read_timeout)
                        while transfer.have < length:
                            room = sink.space()
                            count = direct.recv_into(room, min(len(room), length - transfer.have))
                            if count == 0:
                                break
                            sink.filled(count)
                            transfer.account(count)
                except httpx.HTTPError as error:
                    raise _Cut(_what_failed(url, error), transfer.received) from None
                except TimeoutError:
                    host = httpx.URL(url).host
                    raise _Cut(f"{host}: no data for {self.read_timeout:.0f}s", transfer.received) from None
                except OSError as error:
                    raise _Cut(f"{httpx.URL(url).host}: {error}", transfer.received) from None
        finally:
            os.close(fd)
        if transfer.have < length:
            raise _Cut(
                f"{httpx.URL(url).host}: the connection ended after byte {transfer.have} of {length}",
                transfer.received,
            )

    @staticmethod
    def _set_aside(part: Path, reject_dir: Path, reason: str) -> None:
        """Keep the last bad download of each name, with its reason, out of the inbox."""
        reject_dir.mkdir(parents=True, exist_ok=True)
        target = reject_dir / (part.name[: -len(".part")] + ".rejected")
        os.replace(part, target)
        with contextlib.suppress(OSError):
            target.with_name(target.name + ".reason").write_text(reason + "\n", encoding="utf-8")
