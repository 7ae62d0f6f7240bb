"""Authenticate before parsing: read the head, verify its signature, then read the manifest.

manifest.sig is read first by a strict, flat schema (anyone can send one). The
manifest's bytes are held once, behind the signature's context prefix, only
as long as the signature check needs them; they also go to a temporary file
from which the manifest is read entry by entry once the signature verified.
So memory is bounded by `limits.max_manifest_bytes`, never by the archive.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from cryptography.exceptions import InvalidSignature

from pipeline.archive.format import (
    ANNOUNCE_READ_BYTES,
    ANNOUNCED,
    BLOCK,
    CHUNK,
    GZIP_MAGIC,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
)
from pipeline.archive.jsonstream import JsonStream
from pipeline.archive.manifest import Manifest, read_manifest
from pipeline.archive.names import quote
from pipeline.archive.reader import REGULAR, TAR_KINDS, Inflater, TarHeader, parse_header, skip_padding
from pipeline.config import Limits
from pipeline.errors import ArchiveRejected, StepFailed
from pipeline.signing import KEY_ID, SIGNATURE_CONTEXT, TrustStore

HEAD_CHUNK = 64 * 2**10  # the head is read in smaller steps than the payload: little is read past it
_SIGNATURE_BYTES = 64

Checkpoint = Callable[[], None]


def _nothing() -> None:
    return None


def open_archive(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise ArchiveRejected(f"{path.name} is a folder, not an update archive") from None
    except OSError as error:
        raise ArchiveRejected(f"cannot read the archive {path.name}: {error.strerror}") from error


def _check_start(handle: IO[bytes], size: int) -> None:
    """Reject at once what is not a gzip stream: empty files, zips, plain text."""
    if size == 0:
        raise ArchiveRejected("empty file (0 bytes): not an update archive")
    start = handle.read(4)
    handle.seek(0)
    if start.startswith(b"PK"):
        raise ArchiveRejected("a zip archive, not a dropgate .tgz (archives are built with dropgate pack)")
    if not start.startswith(GZIP_MAGIC):
        raise ArchiveRejected(
            f"not a dropgate archive: it starts with bytes {start.hex(' ')}, expected the gzip signature 1f 8b"
        )


def _head_header(inflater: Inflater, name: str, limit: int, limit_name: str) -> TarHeader:
    """The tar header of manifest.json or manifest.sig, which must be a regular file of at most `limit` bytes."""
    position = "first" if name == MANIFEST_NAME else "second"
    block = inflater.read_up_to(BLOCK)
    if len(block) < BLOCK:
        raise ArchiveRejected(
            f"not a dropgate archive: the first gzip member ends where the tar header of {name} should be"
        )
    try:
        header = parse_header(block)
    except ArchiveRejected:
        raise ArchiveRejected(f"not a dropgate archive: no valid tar header where {name} should be") from None
    if header.name.rstrip(b"/") != name.encode():
        raise ArchiveRejected(
            f"not a dropgate archive: the {position} member is {quote(header.name)}, expected the file {name}"
        )
    if header.kind not in REGULAR:
        kind = "a folder" if header.kind == b"5" else TAR_KINDS.get(header.kind, f"of tar type {quote(header.kind)}")
        raise ArchiveRejected(f"{name} is {kind}, expected a regular file")
    if header.size > limit:
        raise ArchiveRejected(f"{name} is {header.size} bytes, above {limit_name} ({limit})")
    return header


def _stream(inflater: Inflater, size: int, what: str) -> Iterator[bytes]:
    """The next `size` bytes of the current member, in chunks; then the tar padding is skipped."""
    remaining = size
    while remaining:
        data = inflater.read(min(remaining, CHUNK))
        if not data:
            raise ArchiveRejected(f"the archive ends inside {what} (truncated)")
        remaining -= len(data)
        yield data
    skip_padding(inflater, size, what)


def _start_head(inflater: Inflater) -> None:
    if not inflater.next_member():
        raise ArchiveRejected("empty file (0 bytes): not an update archive")


def check_head_ends(inflater: Inflater) -> None:
    """The first gzip member ends right after manifest.sig: the payload is a member of its own."""
    if not inflater.at_member_end():
        raise ArchiveRejected(
            f"the first gzip member goes on after {SIGNATURE_NAME}: it must hold only {MANIFEST_NAME} and "
            f"{SIGNATURE_NAME}, and the payload a gzip member of its own"
        )


def skip_head(inflater: Inflater, manifest: Manifest) -> None:
    """Read past the head again (for the payload pass), checking it is still the manifest that was signed."""
    _start_head(inflater)
    header = _head_header(inflater, MANIFEST_NAME, MAX_MANIFEST_BYTES, "the format's limit")
    hasher = hashlib.sha256()
    for data in _stream(inflater, header.size, MANIFEST_NAME):
        hasher.update(data)
    if hasher.hexdigest() != manifest.digest:
        raise ArchiveRejected("the archive changed after its signature was checked (its manifest differs)")
    header = _head_header(inflater, SIGNATURE_NAME, MAX_SIGNATURE_BYTES, "the format's limit")
    for _data in _stream(inflater, header.size, SIGNATURE_NAME):
        pass
    check_head_ends(inflater)


def _not_a_signature(problem: str) -> ArchiveRejected:
    return ArchiveRejected(
        f'manifest.sig is not a dropgate signature ({{"algorithm": "ed25519", "key_id", "signature"}}): {problem}'
    )


def read_signature(data: bytes) -> tuple[str, bytes]:
    """The key id and the raw signature of manifest.sig, read by its exact, flat schema."""
    stream = JsonStream(iter([data]), _not_a_signature)
    found: dict[str, str] = {}
    expected = {
        "algorithm": "the text ed25519",
        "key_id": "the id of a key (text)",
        "signature": "a base64 Ed25519 signature (text)",
    }
    for key in stream.keys("manifest.sig", "a JSON object"):
        if key not in expected:
            raise _not_a_signature(f"unknown key {quote(key)}")
        if key in found:
            raise _not_a_signature(f"key {quote(key)} appears twice")
        found[key] = stream.text(key, expected[key])
    stream.finish()
    for key in expected:
        if key not in found:
            raise _not_a_signature(f"{key} is missing")
    if found["algorithm"] != "ed25519":
        raise ArchiveRejected(f"manifest.sig: algorithm {quote(found['algorithm'])}, expected ed25519")
    key_id = found["key_id"]
    if not KEY_ID.fullmatch(key_id):
        raise _not_a_signature(f"key_id {quote(key_id)} is not 1-64 letters, digits, '.', '_' or '-'")
    try:
        raw = base64.b64decode(found["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise _not_a_signature("signature is not base64") from None
    if len(raw) != _SIGNATURE_BYTES:
        raise _not_a_signature(f"signature is {len(raw)} bytes, an Ed25519 signature is {_SIGNATURE_BYTES}")
    return key_id, raw


def _check_signature(signed: bytearray, signature_bytes: bytes, keys: TrustStore) -> str:
    """The key id that signed the manifest; raise ArchiveRejected unless a trusted key did.

    `signed` is the signature's context prefix followed by manifest.json.
    """
    key_id, raw = read_signature(signature_bytes)
    if len(keys) == 0:
        raise ArchiveRejected("no trusted keys are configured (trust.keys is empty): cannot authenticate any archive")
    key = keys.keys.get(key_id)
    if key is None:
        raise ArchiveRejected(
            f"the manifest is signed with key {quote(key_id)}, which is not trusted here (trusted: {', '.join(keys)})"
        )
    try:
        key.verify(raw, signed)
    except InvalidSignature:
        raise ArchiveRejected(
            f"the signature does not verify with the trusted key {quote(key_id)}: "
            "the manifest was altered or signed with another key"
        ) from None
    return key_id


def read_announced_length(path: Path) -> int | None:
    """The full length the archive announces at its start, or None if it does not start like one.

    Reads at most the first 64 KiB (the file may still be growing) and never
    raises for bad input: the value is not authenticated, it only tells an
    upload in progress from a finished one; `authenticate` checks it for real.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(ANNOUNCE_READ_BYTES)
    except OSError:
        return None
    if not raw.startswith(GZIP_MAGIC):
        return None
    try:
        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw, BLOCK + 64)
        header = parse_header(out[:BLOCK]) if len(out) >= BLOCK else None
    except (zlib.error, ArchiveRejected):
        return None
    if header is None or header.name != MANIFEST_NAME.encode() or header.kind not in REGULAR:
        return None
    match = ANNOUNCED.match(out[BLOCK:])
    return int(match.group(1)) if match else None


def authenticate(
    path: Path, keys: TrustStore, limits: Limits | None = None, *, checkpoint: Checkpoint = _nothing
) -> Manifest:
    """The archive's manifest, once its signature verified with a trusted key.

    Reads the archive's head only (manifest.json, manifest.sig), verifies the
    signature before reading the manifest, reads the manifest against the
    exact schema and `limits` (default: the default limits), then checks the
    file's length against the length the manifest announces and that the head
    is a gzip member of its own.
    """
    limits = limits or Limits()
    try:
        return _authenticate(path, keys, limits, checkpoint)
    except OSError as error:  # the site's fault (a disk, the temporary folder), not the archive's
        where = f" ({error.filename})" if error.filename else ""
        raise StepFailed(f"cannot read the archive {path.name}{where}: {error.strerror or error}") from error


def _authenticate(path: Path, keys: TrustStore, limits: Limits, checkpoint: Checkpoint) -> Manifest:
    with open_archive(path) as handle, tempfile.TemporaryFile(prefix="dropgate-manifest-") as spool:
        size = os.fstat(handle.fileno()).st_size
        _check_start(handle, size)
        inflater = Inflater(handle, limit=size, chunk=HEAD_CHUNK, checkpoint=checkpoint)
        _start_head(inflater)
        header = _head_header(inflater, MANIFEST_NAME, limits.max_manifest_bytes, "limits.max_manifest_bytes")
        manifest_size = header.size
        signed = bytearray(len(SIGNATURE_CONTEXT) + header.size)  # allocated once: no copy of a large manifest
        signed[: len(SIGNATURE_CONTEXT)] = SIGNATURE_CONTEXT
        view = memoryview(signed)
        filled = len(SIGNATURE_CONTEXT)
        hasher = hashlib.sha256()
        for data in _stream(inflater, header.size, MANIFEST_NAME):
            view[filled : filled + len(data)] = data
            filled += len(data)
            hasher.update(data)
            spool.write(data)
        view.release()
        header = _head_header(inflater, SIGNATURE_NAME, MAX_SIGNATURE_BYTES, "the format's limit")
        signature_bytes = b"".join(_stream(inflater, header.size, SIGNATURE_NAME))
        key_id = _check_signature(signed, signature_bytes, keys)
        del signed  # only the signature check needed the whole manifest at once
        spool.seek(0)
        manifest = read_manifest(
            iter(lambda: spool.read(CHUNK), b""),
            key_id=key_id,
            digest=hasher.hexdigest(),
            limits=limits,
            checkpoint=checkpoint,
            size=manifest_size,
        )
        if size < manifest.length:
            raise ArchiveRejected(
                f"incomplete archive: {size} of the {manifest.length} bytes its manifest announces "
                "(upload not finished, or truncated)"
            )
        if size > manifest.length:
            raise ArchiveRejected(
                f"the archive is {size} bytes, its manifest announces {manifest.length}: data was appended to it"
            )
        check_head_ends(inflater)
    return manifest
