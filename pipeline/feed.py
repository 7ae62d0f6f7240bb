"""The vendor's feed: one signed JSON document listing the archives a site may fetch (docs/feed-format.md).

    {"format": "dropgate-feed/1",
     "signed": "<the feed document, a JSON text, exactly as signed>",
     "signatures": [{"key_id": ..., "algorithm": "ed25519", "signature": <base64>}]}

The receiver parses the small envelope, verifies a signature over the exact
bytes of `signed` (with the feed's own signing context, so that no archive
signature can pass for a feed's), and only then parses the document, against
an exact schema: exact types, bounded sizes and depth, integers only, every
string checked by a full match. Every refusal is one line. Whether a verified
feed is fresh (its expiry, its sequence against the newest seen here) is
`check_fresh`; what a site does with it is pipeline/autoupdate.py.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import calendar
import datetime as dt
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from pipeline.errors import ArchiveRejected, ConfigError, FeedRejected, KeyFileError, StepFailed
from pipeline.signing import FEED_SIGNATURE_CONTEXT, KEY_ID, SigningKey, TrustStore, load_signing_key, load_trusted_keys
from pipeline.versions import Version

ENVELOPE_FORMAT = "dropgate-feed/1"
FORMAT = 1
CHANNELS = ("stable", "unstable")
MAX_FEED_BYTES = 4 * 2**20
MAX_ENTRIES = 10_000
MAX_SIGNATURES = 8
MAX_DEPTH = 4  # envelope: object > signatures list > signature object; document: object > entries > entry
MAX_NOTES_CHARS = 64 * 1024
MAX_URL_CHARS = 2048
MAX_NAME_CHARS = 64
MAX_INT_DIGITS = 20
MAX_SEQUENCE = 2**53 - 1
MAX_LENGTH = 2**44  # 16 TiB: a bound on what an entry may announce, far above any archive limit
DEFAULT_EXPIRY_SECONDS = 7 * 86400

_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_PRODUCT = re.compile(r"[a-z0-9][a-z0-9_-]*", re.ASCII)
_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)*(?:[-~.]?[A-Za-z][A-Za-z0-9.]*)?", re.ASCII)
_URL = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+", re.ASCII)
_NOTES_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ENVELOPE_KEYS = frozenset({"format", "signed", "signatures"})
_SIGNATURE_KEYS = frozenset({"key_id", "algorithm", "signature"})
_DOCUMENT_KEYS = frozenset({"format", "product", "sequence", "published", "expires", "entries"})
_ENTRY_KEYS = frozenset(
    {"product", "version", "channel", "url", "length", "sha256", "published", "notes", "min_version"}
)
_ENTRY_OPTIONAL = frozenset({"notes", "min_version"})


@dataclass(frozen=True)
class FeedEntry:
    """One archive the feed offers."""

    product: str
    version: str
    channel: str
    url: str  # absolute (https) or relative to the feed's URL
    length: int
    sha256: str
    published: float
    notes: str = ""
    min_version: str | None = None

    @property
    def archive_name(self) -> str:
        """The name the archive gets in the inbox: from the signed product and version, never from its URL."""
        return f"{self.product}.{self.version}.tgz"

    def to_fields(self) -> dict[str, Any]:
        return {
            "product": self.product,
            "version": self.version,
            "channel": self.channel,
            "url": self.url,
            "length": self.length,
            "sha256": self.sha256,
            "published": format_time(self.published),
            "notes": self.notes,
            "min_version": self.min_version,
        }


@dataclass(frozen=True)
class Feed:
    """A feed whose signature verified with a trusted key."""

    product: str
    sequence: int
    published: float
    expires: float
    entries: tuple[FeedEntry, ...]
    key_id: str = ""  # the trusted key that verified it
    digest: str = ""  # SHA-256 of the signed document's bytes

    def to_fields(self) -> dict[str, Any]:
        """The signed document."""
        return {
            "format": FORMAT,
            "product": self.product,
            "sequence": self.sequence,
            "published": format_time(self.published),
            "expires": format_time(self.expires),
            "entries": [entry.to_fields() for entry in self.entries],
        }


def format_time(ts: float) -> str:
    """`2026-11-29T12:00:00Z` (whole seconds, UTC): the feed's only time format."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


def _refused(problem: str) -> FeedRejected:
    return FeedRejected(f"the feed is refused: {problem}")


def _q(value: Any) -> str:
    """An untrusted value as it may be printed: quoted, escaped, shortened."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- strict JSON ----------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {_q(key)} appears twice")
        result[key] = value
    return result


def _no_float(text: str) -> Any:
    raise ValueError(f"the number {_q(text)} has a fraction or an exponent; only integers are allowed")


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a finite number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _load_json(text: str, what: str) -> Any:
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
        )
    except RecursionError:
        raise _refused(f"{what} is nested too deeply") from None
    except ValueError as error:
        raise _refused(f"{what} is not valid JSON: {error}") from None
    if _depth(value) > MAX_DEPTH:
        raise _refused(f"{what} is nested deeper than {MAX_DEPTH} levels")
    return value


def _object(value: Any, where: str, keys: frozenset[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _refused(f"{where}: expected an object, found {type(value).__name__}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise _refused(f"{where}: unknown key {_q(unknown[0])} (expected {', '.join(sorted(keys))})")
    missing = sorted(keys - optional - set(value))
    if missing:
        raise _refused(f"{where}: the key {missing[0]!r} is missing")
    return value


def _string(value: Any, where: str, pattern: re.Pattern[str] | None = None, limit: int = MAX_NAME_CHARS) -> str:
    if not isinstance(value, str):
        raise _refused(f"{where}: expected a string, found {_q(value)}")
    if len(value) > limit:
        raise _refused(f"{where}: longer than {limit} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise _refused(f"{where}: {_q(value)} is not valid")
    return value


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _refused(f"{where}: expected an integer, found {_q(value)}")
    if not low <= value <= high:
        raise _refused(f"{where}: {value} is outside {low}..{high}")
    return value


def parse_time(value: Any, where: str) -> float:
    """A `YYYY-MM-DDTHH:MM:SSZ` string as seconds since the epoch."""
    text = _string(value, where, limit=20)
    match = _TIME.fullmatch(text)
    if not match:
        raise _refused(f"{where}: {_q(text)} is not a time like 2026-11-29T12:00:00Z")
    year, month, day, hour, minute, second = (int(part) for part in match.groups())
    try:
        moment = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    except ValueError as error:
        raise _refused(f"{where}: {_q(text)}: {error}") from None
    return float(calendar.timegm(moment.utctimetuple()))


def _version(value: Any, where: str) -> str:
    text = _string(value, where, _VERSION)
    try:
        Version.parse(text)
    except ValueError as error:
        raise _refused(f"{where}: {error}") from None
    return text


def _url(value: Any, where: str) -> str:
    text = _string(value, where, limit=MAX_URL_CHARS)
    if not _URL.fullmatch(text):
        raise _refused(f"{where}: {_q(text)} is not a URL (ASCII, no spaces or control characters)")
    parts = urlsplit(text)
    if parts.scheme:
        if parts.scheme != "https" or not parts.netloc:
            raise _refused(f"{where}: {_q(text)}: only https:// URLs or paths relative to the feed are allowed")
    elif text.startswith("//") or ":" in text.split("/", 1)[0]:
        raise _refused(f"{where}: {_q(text)}: a relative URL must be a path (no host, no scheme)")
    return text


def _entry(value: Any, where: str, product: str) -> FeedEntry:
    fields = _object(value, where, _ENTRY_KEYS, _ENTRY_OPTIONAL)
    claimed = _string(fields["product"], f"{where}.product", _PRODUCT)
    if claimed != product:
        raise _refused(f"{where} claims product {_q(claimed)} in a feed for {product!r}")
    channel = _string(fields["channel"], f"{where}.channel")
    if channel not in CHANNELS:
        raise _refused(f"{where}.channel: {_q(channel)} is not one of {', '.join(CHANNELS)}")
    notes = _string(fields.get("notes", ""), f"{where}.notes", limit=MAX_NOTES_CHARS)
    control = _NOTES_CONTROL.search(notes)
    if control:
        raise _refused(f"{where}.notes: the control character {control.group()!r} is not allowed")
    minimum = fields.get("min_version")
    return FeedEntry(
        product=claimed,
        version=_version(fields["version"], f"{where}.version"),
        channel=channel,
        url=_url(fields["url"], f"{where}.url"),
        length=_integer(fields["length"], f"{where}.length", 1, MAX_LENGTH),
        sha256=_string(fields["sha256"], f"{where}.sha256", _SHA256),
        published=parse_time(fields["published"], f"{where}.published"),
        notes=notes,
        min_version=None if minimum is None else _version(minimum, f"{where}.min_version"),
    )


def _document(data: bytes, *, key_id: str) -> Feed:
    fields = _object(_load_json(data.decode("utf-8"), "the signed document"), "the signed document", _DOCUMENT_KEYS)
    if fields["format"] != FORMAT or isinstance(fields["format"], bool):
        raise _refused(f"format {_q(fields['format'])}: this dropgate reads format {FORMAT}")
    product = _string(fields["product"], "product", _PRODUCT)
    published = parse_time(fields["published"], "published")
    expires = parse_time(fields["expires"], "expires")
    if expires <= published:
        raise _refused(f"it expires ({format_time(expires)}) before it was published ({format_time(published)})")
    entries = fields["entries"]
    if not isinstance(entries, list):
        raise _refused(f"entries: expected a list, found {_q(entries)}")
    if len(entries) > MAX_ENTRIES:
        raise _refused(f"entries: {len(entries)} entries, more than the limit of {MAX_ENTRIES}")
    parsed = tuple(_entry(value, f"entries[{index}]", product) for index, value in enumerate(entries))
    seen: dict[Version, int] = {}
    for index, entry in enumerate(parsed):
        version = Version.parse(entry.version)
        if version in seen:
            raise _refused(f"entries[{index}]: version {entry.version} is listed twice (also entries[{seen[version]}])")
        seen[version] = index
    return Feed(
        product=product,
        sequence=_integer(fields["sequence"], "sequence", 1, MAX_SEQUENCE),
        published=published,
        expires=expires,
        entries=parsed,
        key_id=key_id,
        digest=hashlib.sha256(data).hexdigest(),
    )


# -- authenticate, then parse -------------------------------------------------------


def _verified_key(signed: bytes, signatures: Sequence[Any], keys: TrustStore) -> str:
    """The trusted key id whose signature over `signed` verifies; FeedRejected otherwise."""
    if len(keys) == 0:
        raise _refused("no trusted keys are configured (trust.keys is empty)")
    claimed: list[str] = []
    for index, value in enumerate(signatures):
        fields = _object(value, f"signatures[{index}]", _SIGNATURE_KEYS)
        key_id = _string(fields["key_id"], f"signatures[{index}].key_id", KEY_ID)
        if fields["algorithm"] != "ed25519":
            raise _refused(f"signatures[{index}].algorithm: {_q(fields['algorithm'])}, expected 'ed25519'")
        encoded = _string(fields["signature"], f"signatures[{index}].signature", limit=128)
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise _refused(f"signatures[{index}].signature is not base64") from None
        if len(raw) != 64:
            raise _refused(f"signatures[{index}].signature: {len(raw)} bytes, an Ed25519 signature has 64")
        claimed.append(key_id)
        if key_id in keys.keys and keys.verify(key_id, signed, raw, context=FEED_SIGNATURE_CONTEXT):
            return key_id
    trusted = [key_id for key_id in claimed if key_id in keys.keys]
    if trusted:
        raise _refused(
            f"the signature does not verify with the trusted key {trusted[0]!r}: "
            "the feed was altered, or it is not a feed signature"
        )
    names = ", ".join(map(repr, claimed))
    raise _refused(f"signed with key {names}, which is not trusted here (trusted: {', '.join(keys)})")


def parse_feed(data: bytes, keys: TrustStore) -> Feed:
    """The feed in `data`, once a trusted key's signature over its document verified.

    Nothing of the document is parsed before the signature verifies; the
    envelope around it is parsed strictly and is small.
    """
    if len(data) > MAX_FEED_BYTES:
        raise _refused(f"{len(data)} bytes, more than the limit of {MAX_FEED_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _refused(f"not UTF-8 text (byte {error.start})") from None
    envelope = _object(_load_json(text, "the envelope"), "the envelope", _ENVELOPE_KEYS)
    if envelope["format"] != ENVELOPE_FORMAT:
        raise _refused(f"format {_q(envelope['format'])}: expected {ENVELOPE_FORMAT!r} (is this a dropgate feed?)")
    signed_text = _string(envelope["signed"], "signed", limit=MAX_FEED_BYTES)
    signatures = envelope["signatures"]
    if not isinstance(signatures, list) or not 1 <= len(signatures) <= MAX_SIGNATURES:
        raise _refused(f"signatures: expected a list of 1 to {MAX_SIGNATURES} signatures")
    try:
        signed = signed_text.encode("utf-8")
    except UnicodeEncodeError:
        raise _refused("signed: not encodable as UTF-8 (a lone surrogate)") from None
    key_id = _verified_key(signed, signatures, keys)
    return _document(signed, key_id=key_id)


def check_fresh(feed: Feed, *, now: float, seen: tuple[int, str] | None) -> None:
    """Refuse an expired feed (freeze) and one older than the newest seen here (replay, rollback).

    `seen` is the highest sequence accepted here with its document's digest.
    The same sequence is accepted again only with the very same document.
    """
    if now >= feed.expires:
        raise _refused(
            f"it expired at {format_time(feed.expires)} (now {format_time(now)}): a frozen or stale feed is "
            "not used; the vendor must publish a freshly signed one"
        )
    if seen is None:
        return
    sequence, digest = seen
    if feed.sequence < sequence:
        raise _refused(
            f"its sequence {feed.sequence} is older than sequence {sequence} already seen here "
            "(a replayed or rolled-back feed)"
        )
    if feed.sequence == sequence and feed.digest != digest:
        raise _refused(f"sequence {sequence} was already seen here with different contents")


# -- the vendor side -------------------------------------------------------------------


def sign_feed(feed: Feed, key: SigningKey) -> bytes:
    """The feed file: the envelope around the signed document."""
    signed = json.dumps(feed.to_fields(), ensure_ascii=False, separators=(",", ":"))
    signature = key.sign(signed.encode("utf-8"), context=FEED_SIGNATURE_CONTEXT)
    envelope = {
        "format": ENVELOPE_FORMAT,
        "signed": signed,
        "signatures": [
            {"key_id": key.key_id, "algorithm": "ed25519", "signature": base64.b64encode(signature).decode("ascii")}
        ],
    }
    return (json.dumps(envelope, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _archive_url(base_url: str, name: str) -> str:
    base = base_url if base_url.endswith("/") or not base_url else base_url + "/"
    return base + quote(name)


def build_feed(
    archives: Path,
    key_path: Path,
    base_url: str,
    *,
    sequence: int | None = None,
    expires_in: float = DEFAULT_EXPIRY_SECONDS,
    now: Callable[[], float] = time.time,
) -> bytes:
    """A signed feed listing every `*.tgz` in `archives`, each read from its signed head.

    Archives must authenticate with the public half of the signing key; their
    product, version, channel, minimum version and notes come from the signed
    manifest, never from the file name (a name that disagrees is an error).
    """
    from pipeline.archive import authenticate, parse_archive_name

    key = load_signing_key(key_path)
    trust = TrustStore({key.key_id: key.public})
    moment = now()
    entries: list[FeedEntry] = []
    if not archives.is_dir():
        raise FeedRejected(f"{archives} is not a folder of archives")
    for path in sorted(archives.iterdir()):
        if not path.name.endswith(".tgz") or not path.is_file():
            continue
        try:
            manifest = authenticate(path, trust)
            named = parse_archive_name(path.name)
        except StepFailed as error:
            raise FeedRejected(f"{path}: {error}") from None
        if named != (manifest.product, manifest.version):
            raise FeedRejected(
                f"{path}: the name says {named[0]} {named[1]}, "
                f"the signed manifest {manifest.product} {manifest.version}"
            )
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(2**20):
                digest.update(chunk)
        entries.append(
            FeedEntry(
                product=manifest.product,
                version=manifest.version,
                channel=manifest.channel,
                url=_archive_url(base_url, path.name),
                length=manifest.length,
                sha256=digest.hexdigest(),
                published=float(int(path.stat().st_mtime)),
                notes=manifest.notes,
                min_version=manifest.min_version,
            )
        )
    products = sorted({entry.product for entry in entries})
    if not entries:
        raise FeedRejected(f"{archives} holds no .tgz archive")
    if len(products) > 1:
        raise FeedRejected(f"{archives} mixes products {', '.join(products)}: a feed lists one product")
    entries.sort(key=lambda entry: Version.parse(entry.version))
    feed = Feed(
        product=products[0],
        sequence=sequence if sequence is not None else int(moment),
        published=float(int(moment)),
        expires=float(int(moment + expires_in)),
        entries=tuple(entries),
    )
    data = sign_feed(feed, key)
    parse_feed(data, trust)  # what is written is what a site reads back, or nothing is written
    return data


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_feed_build(args: argparse.Namespace) -> int:
    from pipeline.config import parse_duration

    try:
        expires_in = parse_duration(args.expires)
        data = build_feed(
            Path(args.dir), Path(args.key), args.base_url, sequence=args.sequence, expires_in=expires_in
        )
        _write_atomically(Path(args.out), data)
    except ValueError as error:
        print(f"dropgate feed build: --expires: {error}", file=sys.stderr)
        return 2
    except (FeedRejected, KeyFileError, ArchiveRejected, OSError) as error:
        print(f"dropgate feed build: {error}", file=sys.stderr)
        return 1
    feed = parse_feed(data, _self_trust(Path(args.key)))
    print(
        f"wrote {args.out}: {feed.product}, {len(feed.entries)} archives, sequence {feed.sequence}, "
        f"expires {format_time(feed.expires)}"
    )
    return 0


def _self_trust(key_path: Path) -> TrustStore:
    key = load_signing_key(key_path)
    return TrustStore({key.key_id: key.public})


def describe(feed: Feed) -> dict[str, Any]:
    """The feed as `--json` prints it."""
    return {**feed.to_fields(), "key_id": feed.key_id, "digest": feed.digest}


def cmd_feed_verify(args: argparse.Namespace) -> int:
    """Check a feed file the way a site will (signature, format, expiry); say what is wrong."""
    try:
        keys = load_trusted_keys([Path(key) for key in args.key])
    except ConfigError as error:
        print(f"dropgate feed verify: {'; '.join(p.split(': ', 1)[1] for p in error.problems)}", file=sys.stderr)
        return 2
    path = Path(args.feed)
    feed: Feed | None = None
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FEED_BYTES + 1)
        feed = parse_feed(data, keys)
        check_fresh(feed, now=time.time(), seen=None)
        problem = None
    except OSError as error:
        problem = f"cannot read {path}: {error.strerror}"
    except FeedRejected as error:
        problem = str(error)
    if args.json:
        print(json.dumps({"feed": str(path), "ok": problem is None, "error": problem,
                          "document": describe(feed) if feed is not None else None}, indent=2))
    elif problem is not None:
        print(f"{path.name}: REJECTED: {problem}")
    else:
        assert feed is not None
        print(
            f"{path.name}: OK: {feed.product}, sequence {feed.sequence}, signed with key {feed.key_id}, "
            f"published {format_time(feed.published)}, expires {format_time(feed.expires)}"
        )
        for entry in feed.entries:
            minimum = f", needs {entry.min_version}" if entry.min_version else ""
            print(f"  {entry.version:16} {entry.channel:8} {entry.length:>12} bytes  {entry.url}{minimum}")
    return 0 if problem is None else 1
