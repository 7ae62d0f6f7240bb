"""Authenticate before parsing: read the head, verify its signature, then parse the manifest."""

from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path
from typing import IO

from pipeline.archive.format import (
    ANNOUNCE_READ_BYTES,
    ANNOUNCED,
    BLOCK,
    GZIP_MAGIC,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
)
from pipeline.archive.manifest import Manifest, parse_manifest
from pipeline.archive.names import quote
from pipeline.archive.reader import REGULAR, Inflater, parse_header, skip_padding
from pipeline.errors import ArchiveRejected
from pipeline.signing import TrustStore


def open_archive(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
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


def read_head(inflater: Inflater) -> tuple[bytes, bytes]:
    """manifest.json and manifest.sig, the archive's first two members, as bytes.

    They are the whole content of the first gzip member (`check_head_ends`).
    """
    if not inflater.next_member():
        raise ArchiveRejected("empty file (0 bytes): not an update archive")
    found: list[bytes] = []
    for name, limit in ((MANIFEST_NAME, MAX_MANIFEST_BYTES), (SIGNATURE_NAME, MAX_SIGNATURE_BYTES)):
        block = inflater.read_up_to(BLOCK)
        if len(block) < BLOCK:
            raise ArchiveRejected(
                f"not a dropgate archive: the gzip stream ends where the tar header of {name} should be"
            )
        try:
            header = parse_header(block)
        except ArchiveRejected:
            raise ArchiveRejected(f"not a dropgate archive: no valid tar header where {name} should be") from None
        if header.name != name.encode() or header.kind not in REGULAR:
            position = "first" if name == MANIFEST_NAME else "second"
            raise ArchiveRejected(
                f"not a dropgate archive: the {position} member is {quote(header.name)}, expected the file {name}"
            )
        if header.size > limit:
            raise ArchiveRejected(f"{name} is {header.size} bytes, above the {limit}-byte limit")
        found.append(inflater.read_exact(header.size, name))
        skip_padding(inflater, header.size, name)
    return found[0], found[1]


def check_head_ends(inflater: Inflater) -> None:
    """The first gzip member ends right after manifest.sig: the payload is a member of its own."""
    if not inflater.at_member_end():
        raise ArchiveRejected(
            f"the first gzip member goes on after {SIGNATURE_NAME}: it must hold only {MANIFEST_NAME} and "
            f"{SIGNATURE_NAME}, and the payload a gzip member of its own"
        )


def _check_signature(manifest_bytes: bytes, signature_bytes: bytes, keys: TrustStore) -> str:
    """The key id that signed the manifest; raise ArchiveRejected unless a trusted key did."""
    try:
        signature = json.loads(signature_bytes.decode("utf-8"))
        key_id = signature["key_id"]
        algorithm = signature["algorithm"]
        raw = base64.b64decode(signature["signature"], validate=True)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise ArchiveRejected(
            'manifest.sig is not a dropgate signature ({"algorithm": "ed25519", "key_id", "signature"})'
        ) from None
    if algorithm != "ed25519" or not isinstance(key_id, str):
        raise ArchiveRejected(f"manifest.sig: algorithm {algorithm!r}, expected ed25519")
    if len(keys) == 0:
        raise ArchiveRejected("no trusted keys are configured (trust.keys is empty): cannot authenticate any archive")
    if key_id not in keys.keys:
        raise ArchiveRejected(
            f"the manifest is signed with key {quote(key_id)}, which is not trusted here (trusted: {', '.join(keys)})"
        )
    if not keys.verify(key_id, manifest_bytes, raw):
        raise ArchiveRejected(
            f"the signature does not verify with the trusted key {quote(key_id)}: "
            "the manifest was altered or signed with another key"
        )
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


def authenticate(path: Path, keys: TrustStore) -> Manifest:
    """The archive's manifest, once its signature verified with a trusted key.

    Reads the archive's head only (manifest.json, manifest.sig), verifies the
    signature before parsing the manifest, then checks the file's length
    against the length the manifest announces.
    """
    with open_archive(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        _check_start(handle, size)
        inflater = Inflater(handle, limit=size, chunk=16 * 2**10)
        manifest_bytes, signature_bytes = read_head(inflater)
        key_id = _check_signature(manifest_bytes, signature_bytes, keys)
        manifest = parse_manifest(manifest_bytes, key_id=key_id)
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
