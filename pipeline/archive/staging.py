"""The payload: checked member by member against the signed manifest and the limits, streamed into staging."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.archive.authentication import authenticate, open_archive, skip_head
from pipeline.archive.entries import FILE, FOLDER
from pipeline.archive.format import CHUNK, MANIFEST_NAME, PAYLOAD, SIGNATURE_NAME
from pipeline.archive.manifest import Manifest
from pipeline.archive.names import path_problem, quote
from pipeline.archive.reader import REGULAR, TAR_KINDS, Inflater, TarHeader, TarStream, skip_padding
from pipeline.config import Limits
from pipeline.errors import ArchiveRejected, StepFailed
from pipeline.signing import TrustStore

Checkpoint = Callable[[], None]
Progress = Callable[[float], None]

_LATEST_MTIME = 2**33  # year 2242: later (or negative) times in a header are clamped


def _nothing() -> None:
    return None


def _ignore_progress(_ratio: float) -> None:
    return None


def check_limits(manifest: Manifest, limits: Limits) -> None:
    """What the signed manifest announces must fit the limits before a byte of payload is read."""
    entries = manifest.entries
    if len(entries) > limits.max_members:
        raise ArchiveRejected(
            f"the manifest lists {len(entries)} entries, above limits.max_members ({limits.max_members})"
        )
    if manifest.length > limits.max_archive_bytes:
        raise ArchiveRejected(
            f"the archive is {manifest.length} bytes, above limits.max_archive_bytes ({limits.max_archive_bytes})"
        )
    largest = entries.largest
    if largest is not None and entries.size(largest) > limits.max_file_bytes:
        raise ArchiveRejected(
            f"file {quote(entries.name(largest))} is {entries.size(largest)} bytes, "
            f"above limits.max_file_bytes ({limits.max_file_bytes})"
        )
    total = manifest.unpacked_bytes
    if total > limits.max_unpacked_bytes:
        raise ArchiveRejected(
            f"the payload unpacks to {total} bytes, above limits.max_unpacked_bytes ({limits.max_unpacked_bytes})"
        )


@dataclass
class _Staging:
    """Where payload files go: a folder, or nowhere (verify only hashes).

    Folders are made on demand (a file's folder may come after it in the tar
    stream); nothing is tracked in memory per folder.
    """

    dest: Path | None

    def make_dir(self, rel: str) -> None:
        if self.dest is not None:
            os.makedirs(self.dest / rel, mode=0o755, exist_ok=True)

    @contextlib.contextmanager
    def open_file(self, rel: str, mode: int, mtime: int) -> Iterator[IO[bytes] | None]:
        if self.dest is None:
            yield None
            return
        target = self.dest / rel
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(target, flags, 0o600)
        except FileNotFoundError:
            self.make_dir(rel.rpartition("/")[0])
            fd = os.open(target, flags, 0o600)
        with open(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            mtime = min(max(mtime, 0), _LATEST_MTIME)
            os.utime(handle.fileno(), (mtime, mtime))


def _member(header: TarHeader, manifest: Manifest) -> int | None:
    """The manifest entry of a payload member (marked seen); None for the `payload/` folder itself.

    Every rule of the allowlist is checked here, in the order an operator
    would want to hear about it.
    """
    try:
        name = header.name.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveRejected(f"member {quote(header.name)}: the name is not valid UTF-8") from None
    kind = header.kind
    if kind not in REGULAR and kind != b"5":
        what = TAR_KINDS.get(kind, f"an entry of unknown tar type {quote(kind)}")
        target = f" (→ {quote(header.link)})" if header.link else ""
        raise ArchiveRejected(f"member {quote(name)} is {what}{target}; only regular files and folders are allowed")
    is_dir = kind == b"5"
    if is_dir and name.endswith("/"):
        name = name[:-1]
    problem = path_problem(name)
    if problem:
        raise ArchiveRejected(f"member {quote(name)}: {problem}")
    if header.mode & 0o7000:
        raise ArchiveRejected(
            f"member {quote(name)}: mode {header.mode & 0o7777:04o} has a setuid, setgid or sticky bit; not allowed"
        )
    if is_dir and header.size:
        raise ArchiveRejected(f"member {quote(name)}: a folder entry that carries {header.size} bytes of data")
    if name == PAYLOAD and is_dir:
        return None
    if not name.startswith(PAYLOAD + "/"):
        raise ArchiveRejected(
            f"member {quote(name)} is outside {PAYLOAD}/ "
            f"(only {MANIFEST_NAME} and {SIGNATURE_NAME} may precede the payload)"
        )
    entries = manifest.entries
    index = entries.find(name[len(PAYLOAD) + 1 :])
    if index >= 0 and entries.was_seen(index):
        raise ArchiveRejected(f"member {quote(name)} appears twice in the archive")
    if is_dir:
        if index < 0 or entries.kind(index) != FOLDER:
            listed = "as a file" if index >= 0 else "at all"
            raise ArchiveRejected(f"member {quote(name)} is a folder that the signed manifest does not list {listed}")
    else:
        if index < 0 or entries.kind(index) != FILE:
            listed = " (it lists a folder there)" if index >= 0 else ""
            raise ArchiveRejected(f"member {quote(name)} is not listed in the signed manifest{listed}")
        size, mode = entries.size(index), entries.mode(index)
        if header.size != size:
            raise ArchiveRejected(f"member {quote(name)}: {header.size} bytes in the archive, the manifest says {size}")
        if header.mode & 0o777 != mode:
            raise ArchiveRejected(
                f"member {quote(name)}: mode {header.mode & 0o777:04o} in the archive, the manifest says {mode:04o}"
            )
    entries.mark_seen(index)
    return index


def _stream_payload(
    inflater: Inflater,
    manifest: Manifest,
    staging: _Staging,
    *,
    checkpoint: Checkpoint,
    progress: Progress,
) -> None:
    if not inflater.next_member():
        raise ArchiveRejected("the archive has no payload: nothing follows the head's gzip member")
    if inflater.at_member_end():
        raise ArchiveRejected("the second gzip member is empty: it must hold the payload")
    entries = manifest.entries
    entries.forget_seen()
    tar = TarStream(inflater)
    total = max(1, manifest.length)
    reported = 0.0
    chunks = 0
    while (header := tar.next()) is not None:
        checkpoint()
        if tar.index > len(entries) + 1:
            raise ArchiveRejected(f"more members than the {len(entries)} the manifest lists")
        index = _member(header, manifest)
        if index is None:
            continue
        rel = entries.name(index)
        if entries.kind(index) == FOLDER:
            staging.make_dir(rel)
            continue
        expected = entries.sha256(index)
        hasher = hashlib.sha256()
        remaining = entries.size(index)
        with staging.open_file(rel, entries.mode(index), header.mtime) as out:
            while remaining:
                data = inflater.read(min(remaining, CHUNK))
                if not data:
                    raise ArchiveRejected(
                        f"member {quote(PAYLOAD + '/' + rel)} is cut short: the archive ends inside it"
                    )
                hasher.update(data)
                if out is not None:
                    out.write(data)
                remaining -= len(data)
                chunks += 1
                if chunks % 16 == 0:
                    checkpoint()
                    done = inflater.consumed / total
                    if done - reported >= 0.01:
                        progress(done)
                        reported = done
            if hasher.digest() != expected:
                raise ArchiveRejected(
                    f"member {quote(PAYLOAD + '/' + rel)}: SHA-256 {hasher.hexdigest()} "
                    f"does not match the manifest's {expected.hex()}"
                )
        skip_padding(inflater, entries.size(index), f"member {quote(rel)}")
        done = inflater.consumed / total
        if done - reported >= 0.01:
            progress(done)
            reported = done
    while trailing := inflater.read(CHUNK):
        checkpoint()
        if trailing.count(0) != len(trailing):
            raise ArchiveRejected("data after the tar end-of-archive marker (only zero padding may follow it)")
    if not inflater.at_end():
        raise ArchiveRejected(
            f"corrupt gzip stream: data follows the payload's gzip member at byte {inflater.position} "
            "(the archive must end with it)"
        )
    missing = entries.first_unseen()
    if missing >= 0:
        what = "file" if entries.kind(missing) == FILE else "folder"
        raise ArchiveRejected(
            f"{what} {quote(entries.name(missing))} is listed in the signed manifest but missing from the payload"
        )
    progress(1.0)


def _check_payload(
    path: Path,
    manifest: Manifest,
    limits: Limits,
    staging: _Staging,
    *,
    checkpoint: Checkpoint,
    progress: Progress,
) -> None:
    check_limits(manifest, limits)
    with open_archive(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != manifest.length:
            raise ArchiveRejected(f"the archive is {size} bytes, its manifest announces {manifest.length}")
        inflater = Inflater(handle, limit=size, max_ratio=limits.max_ratio, checkpoint=checkpoint)
        skip_head(inflater, manifest)
        _stream_payload(inflater, manifest, staging, checkpoint=checkpoint, progress=progress)


def stage_payload(
    path: Path,
    manifest: Manifest,
    dest: Path,
    limits: Limits,
    *,
    checkpoint: Checkpoint = _nothing,
    progress: Progress = _ignore_progress,
) -> None:
    """Stream the payload of an authenticated archive into `dest` (created here, absent before).

    One pass over the archive: each member is checked, written and hashed on
    the way. On any failure `dest` is removed and the error re-raised, so a
    rejected archive leaves nothing behind; nothing is ever written outside `dest`.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest.mkdir(mode=0o755)
    except FileExistsError:
        raise StepFailed(f"the staging folder {dest} already exists; remove it first") from None
    try:
        _check_payload(path, manifest, limits, _Staging(dest), checkpoint=checkpoint, progress=progress)
    except BaseException as error:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(error, OSError):
            raise StepFailed(f"cannot write the staging folder {dest}: {error.strerror or error}") from error
        raise


def verify_archive(
    path: Path,
    keys: TrustStore,
    limits: Limits | None = None,
    *,
    checkpoint: Checkpoint = _nothing,
    progress: Progress = _ignore_progress,
) -> Manifest:
    """Authenticate and check every payload file without writing anything (`dropgate verify`)."""
    limits = limits or Limits()
    manifest = authenticate(path, keys, limits, checkpoint=checkpoint)
    _check_payload(path, manifest, limits, _Staging(None), checkpoint=checkpoint, progress=progress)
    return manifest
