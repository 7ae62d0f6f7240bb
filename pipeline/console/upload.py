"""Import: a browser's multipart upload streamed into the inbox as `<name>.part`, renamed when complete.

The request body is parsed as it arrives (python-multipart's push parser), so
memory stays flat whatever the archive's size. The form's CSRF field must come
before the file (the page puts it first; a forged order is refused before any
byte is written). The file is limited to `limits.max_archive_bytes`; a cut,
stalled or refused upload removes its `.part`; a complete one is fsynced and
renamed into the inbox, from where it is an ordinary drop.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from pipeline.archive import parse_archive_name
from pipeline.errors import ArchiveRejected, UploadRefused
from pipeline.inbox.arrival import move_in

MAX_FIELD_BYTES = 4096  # a text field of the import form (the CSRF token)
MAX_HEADER_BYTES = 8192  # the headers of one part
FORM_OVERHEAD = 64 * 1024  # what a multipart body may carry besides the file
KEPT = 50  # finished uploads remembered for their page
MARK = "user.dropgate.console"  # the extended attribute that says a .part is the console's own


@dataclass
class Upload:
    """One upload through the console, as its page shows it."""

    id: int
    name: str
    account: str
    address: str
    expected: int  # the request's length: the file is a little smaller
    started: float
    received: int = 0
    state: str = "receiving"  # receiving, complete, failed
    sha256: str | None = None
    size: int | None = None
    error: str | None = None
    finished: float | None = None
    first_run: int = 0  # runs with a higher id may be this upload's

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "account": self.account,
            "bytes": self.received,
            "total": self.expected,
            "state": self.state,
            "sha256": self.sha256,
            "size": self.size,
            "error": self.error,
        }


class Uploads:
    """The console's uploads: those receiving now (shown on the overview) and the last finished ones."""

    def __init__(self, *, limit: int = 4) -> None:
        self.limit = limit
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._uploads: OrderedDict[int, Upload] = OrderedDict()

    def begin(self, *, account: str, address: str, expected: int, first_run: int) -> Upload:
        with self._lock:
            if sum(1 for u in self._uploads.values() if u.state == "receiving") >= self.limit:
                raise UploadRefused(f"{self.limit} uploads are already in progress; wait for one to finish", status=503)
            upload = Upload(next(self._ids), "", account, address, expected, time.time(), first_run=first_run)
            self._uploads[upload.id] = upload
            while len(self._uploads) > KEPT + self.limit:
                oldest = next(iter(self._uploads))
                if self._uploads[oldest].state == "receiving":
                    break
                del self._uploads[oldest]
            return upload

    def get(self, upload_id: int) -> Upload | None:
        with self._lock:
            return self._uploads.get(upload_id)

    def receiving(self) -> list[Upload]:
        with self._lock:
            return [u for u in self._uploads.values() if u.state == "receiving"]


def remove_stale_parts(inbox: Path) -> list[str]:
    """Remove the `.part` files the console was writing when the daemon died (marked by MARK); their names."""
    removed = []
    try:
        entries = list(os.scandir(inbox))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.name.endswith(".part") or not entry.is_file(follow_symlinks=False):
            continue
        try:
            ours = os.getxattr(entry.path, MARK, follow_symlinks=False) == b"1"
        except OSError:
            continue
        if ours:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def check_name(raw: str) -> str:
    """The file name the browser sent, if it can be an archive name in the inbox; else UploadRefused."""
    if not raw:
        raise UploadRefused("no file was chosen")
    if "/" in raw or raw in (".", ".."):
        raise UploadRefused(f"{raw!r} cannot be an archive name (expected <product>.<version>.tgz)")
    name = raw.rsplit("\\", 1)[-1]  # old browsers send a whole Windows path; browsers send the name only
    if name.startswith(".") or len(name.encode()) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UploadRefused(f"{name!r} cannot be an archive name (expected <product>.<version>.tgz)")
    try:
        parse_archive_name(name)
    except ArchiveRejected as error:
        raise UploadRefused(str(error)) from None
    return name


class Receiver:
    """Feeds one request body through the multipart parser into `<inbox>/<name>.part`."""

    def __init__(
        self,
        upload: Upload,
        *,
        content_type: str,
        inbox: Path,
        max_bytes: int,
        csrf_ok: Callable[[str | None], bool],
    ) -> None:
        self.upload = upload
        self.inbox = inbox
        self.max_bytes = max_bytes
        self.csrf_ok = csrf_ok
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise UploadRefused("expected a form upload (multipart/form-data)", status=415)
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
            },
        )
        self.fields: dict[str, str] = {}
        self.part: Path | None = None
        self.target: Path | None = None
        self._fd: int | None = None
        self._digest = hashlib.sha256()
        self._pending: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._header_bytes = 0
        self._field: str | None = None
        self._field_data = b""
        self._in_file = False
        self._file_done = False

    # -- parser callbacks (run inside feed(); they only collect) --------------
    def _part_begin(self) -> None:
        self._headers = {}
        self._header_bytes = 0
        self._field = None
        self._field_data = b""
        self._in_file = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]
        self._count_header(end - start)

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]
        self._count_header(end - start)

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise UploadRefused("a part of the form has oversized headers")

    def _header_end(self) -> None:
        self._headers[self._hname.lower()] = self._hvalue
        self._hname = self._hvalue = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            self._field = name
            return
        if name != "archive" or self._file_done or self.part is not None:
            raise UploadRefused("the form carries an unexpected file")
        if not self.csrf_ok(self.fields.get("csrf")):
            raise UploadRefused("the form's security token is missing or out of date: reload the page", status=403)
        filename = check_name(options[b"filename"].decode("utf-8", "replace"))
        self.upload.name = filename
        self._open(filename)
        self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._pending.append(data[start:end])
            self.upload.received += end - start
            if self.upload.received > self.max_bytes:
                raise UploadRefused(
                    f"{self.upload.name} is larger than limits.max_archive_bytes ({self.max_bytes} bytes)", status=413
                )
        elif self._field is not None:
            self._field_data += data[start:end]
            if len(self._field_data) > MAX_FIELD_BYTES:
                raise UploadRefused("a field of the form is too long")

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            self._file_done = True
        elif self._field is not None:
            self.fields[self._field] = self._field_data.decode("utf-8", "replace")
            self._field = None

    # -- the file ---------------------------------------------------------------
    def _open(self, name: str) -> None:
        target = self.inbox / name
        part = self.inbox / f"{name}.part"
        if target.exists() or target.is_symlink():
            raise UploadRefused(f"{name} is already in the inbox, waiting to be taken", status=409)
        try:
            self._fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        except FileExistsError:
            raise UploadRefused(f"{name} is being uploaded already ({part.name} exists)", status=409) from None
        except OSError as error:
            raise UploadRefused(f"cannot create {part}: {error.strerror}", status=500) from error
        with contextlib.suppress(OSError):  # a filesystem without user xattrs: no clean-up after a crash
            os.setxattr(self._fd, MARK, b"1")
        self.part, self.target = part, target

    def feed(self, chunk: bytes) -> list[bytes]:
        """Parse `chunk`; return the file's bytes it held, for `write` (UploadRefused on a bad form)."""
        try:
            self.parser.write(chunk)
        except FormParserError as error:
            raise UploadRefused(f"the upload is not a well-formed form ({error})") from None
        pending, self._pending = self._pending, []
        return pending

    def write(self, blocks: list[bytes]) -> None:
        """Append to the `.part` and hash (blocking: call it from a worker thread)."""
        for block in blocks:
            self._digest.update(block)
            view = memoryview(block)
            while view:
                assert self._fd is not None
                try:
                    written = os.write(self._fd, view)
                except OSError as error:
                    raise UploadRefused(f"cannot write {self.part}: {error.strerror}", status=507) from error
                view = view[written:]

    def finish(self) -> Path:
        """The body is complete: make the file durable and rename it into the inbox (blocking)."""
        try:
            self.parser.finalize()
        except FormParserError as error:
            raise UploadRefused(f"the upload is not a well-formed form ({error})") from None
        if not self._file_done or self._fd is None or self.part is None or self.target is None:
            raise UploadRefused("no file was chosen" if self.part is None else "the upload ended before the file did")
        try:
            os.fsync(self._fd)
        except OSError as error:
            raise UploadRefused(f"cannot write {self.part}: {error.strerror}", status=507) from error
        os.close(self._fd)
        self._fd = None
        try:
            move_in(self.part, self.target)
        except FileExistsError:
            raise UploadRefused(
                f"{self.target.name} appeared in the inbox meanwhile; this upload is dropped", status=409
            ) from None
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self.part = None
        self.upload.sha256 = self._digest.hexdigest()
        self.upload.size = self.upload.received
        return self.target

    def abandon(self) -> None:
        """Remove what was written: a cut or refused upload leaves nothing in the inbox."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self.part is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.part)
            self.part = None
