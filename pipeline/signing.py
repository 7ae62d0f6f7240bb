"""Vendor keys: Ed25519 key pairs in one-line text files, the trust store, sign and verify.

Signatures use `cryptography` (OpenSSL's Ed25519, maintained, already a
dependency for TLS); the key files are our own one-line text format so that
the key id travels with the key and an operator can read what a file is:

    dropgate-ed25519-public <key-id> <base64 of the 32-byte public key>
    dropgate-ed25519-private <key-id> <base64 of the 32-byte private seed>

Lines starting with `#` and blank lines are ignored. A signature is made over
`SIGNATURE_CONTEXT + manifest bytes`, so a vendor key used for dropgate cannot
be tricked into signing anything that reads as a manifest elsewhere. The feed
(pipeline/feed.py) is signed with the same keys over `FEED_SIGNATURE_CONTEXT +
feed bytes`: the two contexts differ from their first distinct byte on, so a
feed's signature never verifies as a manifest's, nor the other way round.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from pipeline.errors import ConfigError, KeyFileError

PUBLIC_TAG = "dropgate-ed25519-public"
PRIVATE_TAG = "dropgate-ed25519-private"
SIGNATURE_CONTEXT = b"dropgate manifest v1\n"
FEED_SIGNATURE_CONTEXT = b"dropgate feed v1\n"
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_KEY_FILE = 4096


@dataclass(frozen=True)
class SigningKey:
    """A vendor's private key and the id recorded with every signature it makes."""

    key_id: str
    key: Ed25519PrivateKey

    def sign(self, manifest: bytes, *, context: bytes = SIGNATURE_CONTEXT) -> bytes:
        return self.key.sign(context + manifest)

    @property
    def public(self) -> Ed25519PublicKey:
        return self.key.public_key()


@dataclass(frozen=True)
class TrustStore:
    """The public keys an archive may be signed with, by key id (several at once for rotation)."""

    keys: Mapping[str, Ed25519PublicKey]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.keys))

    def __len__(self) -> int:
        return len(self.keys)

    def verify(self, key_id: str, manifest: bytes, signature: bytes, *, context: bytes = SIGNATURE_CONTEXT) -> bool:
        """True when `signature` over `context + manifest` verifies with the trusted key `key_id`."""
        key = self.keys.get(key_id)
        if key is None:
            return False
        try:
            key.verify(signature, context + manifest)
        except InvalidSignature:
            return False
        return True


def _read_key_line(path: Path, tag: str, what: str) -> tuple[str, bytes]:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_KEY_FILE + 1)
    except OSError as error:
        raise KeyFileError(f"cannot read {what} {path}: {error.strerror}") from error
    if len(raw) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path} is not a dropgate {what}: larger than {_MAX_KEY_FILE} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not a dropgate {what}: not ASCII text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        raise KeyFileError(f"{path} is not a dropgate {what}: expected one line '{tag} <key-id> <base64>'")
    parts = lines[0].split()
    if len(parts) != 3 or parts[0] != tag:
        found = parts[0] if parts else ""
        raise KeyFileError(f"{path} is not a dropgate {what}: expected a line starting with '{tag}', found {found!r}")
    key_id, encoded = parts[1], parts[2]
    if not KEY_ID.match(key_id):
        raise KeyFileError(f"{path}: key id {key_id!r} is not 1-64 letters, digits, '.', '_' or '-'")
    try:
        material = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise KeyFileError(f"{path}: the key is not valid base64") from None
    if len(material) != 32:
        raise KeyFileError(f"{path}: expected a 32-byte Ed25519 key, found {len(material)} bytes")
    return key_id, material


def load_public_key(path: Path) -> tuple[str, Ed25519PublicKey]:
    """The key id and key of a public key file."""
    key_id, material = _read_key_line(path, PUBLIC_TAG, "public key")
    return key_id, Ed25519PublicKey.from_public_bytes(material)


def load_signing_key(path: Path) -> SigningKey:
    """A private key file, as written by `dropgate keygen`."""
    key_id, material = _read_key_line(path, PRIVATE_TAG, "private key")
    return SigningKey(key_id, Ed25519PrivateKey.from_private_bytes(material))


def load_trusted_keys(paths: Sequence[Path]) -> TrustStore:
    """The trust store from `trust.keys`; raise ConfigError naming every unusable file."""
    keys: dict[str, Ed25519PublicKey] = {}
    problems: list[str] = []
    for index, path in enumerate(paths):
        try:
            key_id, key = load_public_key(Path(path))
        except KeyFileError as error:
            problems.append(f"trust.keys[{index}]: {error}")
            continue
        if key_id in keys:
            problems.append(f"trust.keys[{index}]: {path}: key id {key_id!r} is used by another trusted key")
            continue
        keys[key_id] = key
    if problems:
        raise ConfigError(problems)
    return TrustStore(keys)


def public_key_line(key_id: str, key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return f"{PUBLIC_TAG} {key_id} {base64.b64encode(raw).decode('ascii')}\n"


def _private_key_line(key_id: str, key: Ed25519PrivateKey) -> str:
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return f"{PRIVATE_TAG} {key_id} {base64.b64encode(raw).decode('ascii')}\n"


def _write_new(path: Path, text: str, mode: int, *, force: bool) -> None:
    """Write `text` to `path` with `mode` from the first byte (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if force:
            tmp.replace(path)
        else:
            os.link(tmp, path)  # fails if `path` appeared meanwhile: never overwrite silently
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; use --force to replace it") from None
    finally:
        tmp.unlink(missing_ok=True)


def generate_keypair(prefix: Path, key_id: str | None = None, *, force: bool = False) -> tuple[Path, Path]:
    """Write PREFIX.key (private, 0600) and PREFIX.pub; the key id defaults to PREFIX's name.

    An existing key is never replaced unless `force`: archives already signed
    with it would no longer verify against the new public key.
    """
    key_id = key_id or prefix.name
    if not KEY_ID.match(key_id):
        raise KeyFileError(f"key id {key_id!r} is not 1-64 letters, digits, '.', '_' or '-' (it is taken from -o)")
    if not prefix.parent.is_dir():
        raise KeyFileError(f"the folder {prefix.parent} does not exist; create it first (keygen -o FOLDER/NAME)")
    private_path = prefix.with_name(prefix.name + ".key")
    public_path = prefix.with_name(prefix.name + ".pub")
    if not force:
        for path in (private_path, public_path):
            if os.path.lexists(path):
                raise KeyFileError(f"{path} already exists; use --force to replace it")
    key = Ed25519PrivateKey.generate()
    _write_new(private_path, _private_key_line(key_id, key), 0o600, force=force)
    _write_new(public_path, public_key_line(key_id, key.public_key()), 0o644, force=force)
    return private_path, public_path
