"""The update archive: format, pack, authenticate, stage (docs/archive-format.md).

    <product>.<version>.tgz = gzip member 1: tar entries manifest.json, manifest.sig
                            + gzip member 2: tar entries payload/..., end-of-archive

The receiver reads the head (the signed manifest and its signature), verifies
the signature, and only then streams the payload: each member is checked
against an allowlist (regular files and folders), the path rules, the limits
and the manifest, and written under the staging folder while it is hashed. The
tar stream is parsed here rather than by `tarfile`, so that every header field
that matters is checked explicitly and no header (pax, GNU long name) is ever
read into memory beyond a small bound.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from pipeline.config import Limits
from pipeline.errors import ArchiveRejected, StepFailed
from pipeline.signing import SigningKey, TrustStore, generate_keypair, load_signing_key, load_trusted_keys
from pipeline.versions import Version

__all__ = [
    "FileEntry",
    "Manifest",
    "authenticate",
    "generate_keypair",
    "load_trusted_keys",
    "pack",
    "parse_archive_name",
    "path_problem",
    "read_announced_length",
    "seal_head",
    "stage_payload",
    "verify_archive",
]

FORMAT = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
PAYLOAD = "payload"  # the payload's folder inside the archive
SOURCE_FOLDER = "release"  # pack's default payload folder next to manifest.yaml
CHANNELS = ("stable", "unstable")
HOOKS = ("pre_apply", "post_apply")
REQUIREMENTS = ("min_cpus", "min_memory_gib", "min_free_percent", "free_bytes")
PRODUCT = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

MAX_MANIFEST_BYTES = 64 * 2**20
MAX_SIGNATURE_BYTES = 4096
MAX_EXTENDED_HEADER_BYTES = 64 * 2**10
MAX_NAME_BYTES = 255  # one path component (NAME_MAX)
MAX_PATH_BYTES = 1024  # a whole path inside the release
ANNOUNCE_READ_BYTES = 64 * 2**10
RATIO_GRACE_BYTES = 2**20  # the expansion ratio is judged once this much has been produced
NAME_PUNCTUATION = "._-+@=,~% "

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_CHUNK = 2**20
_GZIP_MAGIC = b"\x1f\x8b"
_ANNOUNCED = re.compile(rb'^\{\s*"length"\s*:\s*(\d{1,20})\s*[,}]')
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODE = re.compile(r"^0?[0-7]{3}$")
_OCTAL = re.compile(rb"^[0-7]*$")
_LATEST_MTIME = 2**33  # year 2242: later (or negative) times in a header are clamped
_REGULAR = (b"0", b"\0")
_KINDS = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"K": "a link (GNU long link name)",
    b"S": "a sparse file",
    b"M": "a multi-volume continuation",
    b"V": "a volume label",
}

Checkpoint = Callable[[], None]
Progress = Callable[[float], None]


def _nothing() -> None:
    return None


def _ignore_progress(_ratio: float) -> None:
    return None


def _q(name: str | bytes) -> str:
    """A name as it reads in a one-line message: quoted, escaped, shortened."""
    if len(name) > 120:
        return f"{name[:100]!r}… ({len(name)} characters)"
    return repr(name)


# -- names and paths -------------------------------------------------------


def path_problem(path: str) -> str | None:
    """What is wrong with `path` as a name inside a release, or None when it is acceptable.

    Relative, `/`-separated, no empty, `.` or `..` component, components of at
    most 255 bytes and paths of at most 1024 bytes (UTF-8), made of letters,
    digits, space and `._-+@=,~%` only, so that no name can reach outside the
    release nor mean anything to a shell.
    """
    if not path:
        return "empty name"
    if path.startswith("/"):
        return "absolute path (only paths relative to the release are allowed)"
    encoded = len(path.encode("utf-8", "surrogatepass"))
    if encoded > MAX_PATH_BYTES:
        return f"name of {encoded} bytes, longer than the {MAX_PATH_BYTES}-byte limit"
    for part in path.split("/"):
        if part == "..":
            return "'..' path component (it would escape the release folder)"
        if part in ("", "."):
            return "empty or '.' path component"
        size = len(part.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            return f"path component of {size} bytes, longer than the {MAX_NAME_BYTES}-byte limit"
        for char in part:
            if not (char.isalnum() or char in NAME_PUNCTUATION):
                allowed = NAME_PUNCTUATION.strip()
                return f"character {char!r} is not allowed in names (letters, digits, space and {allowed})"
    return None


def parse_archive_name(name: str) -> tuple[str, str]:
    """The product and version that an archive's file name `<product>.<version>.tgz` claims."""
    example = "expected <product>.<version>.tgz, e.g. gts.3.19.274.tgz"
    if not name.endswith(".tgz"):
        raise ArchiveRejected(f"archive name {_q(name)} does not end in .tgz ({example})")
    product, dot, version = name[: -len(".tgz")].partition(".")
    if not dot:
        raise ArchiveRejected(f"archive name {_q(name)} has no version ({example})")
    if not PRODUCT.match(product):
        raise ArchiveRejected(f"archive name {_q(name)} does not start with a product name ({example})")
    try:
        Version.parse(version)
    except ValueError:
        raise ArchiveRejected(f"archive name {_q(name)}: {version!r} is not a version ({example})") from None
    return product, version


# -- the manifest ----------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One payload file as the manifest describes it."""

    size: int
    sha256: str
    mode: int  # permission bits only, e.g. 0o644


@dataclass(frozen=True)
class Manifest:
    """The signed description of an archive (docs/archive-format.md, "manifest.json")."""

    product: str
    version: str
    channel: str
    min_version: str | None
    downtime: bool | None  # None: let the version change decide (release.plan_downtime)
    requirements: dict[str, float]
    notes: str
    migrations: tuple[str, ...]
    hooks: dict[str, str]
    files: dict[str, FileEntry]
    dirs: tuple[str, ...]
    length: int
    key_id: str = ""  # the key that signed it (from manifest.sig)
    digest: str = ""  # SHA-256 of manifest.json as signed

    @property
    def unpacked_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def to_fields(self) -> dict[str, Any]:
        """The manifest.json object; `length` comes first (the inbox reads it from the start)."""
        return {
            "length": self.length,
            "format": FORMAT,
            "product": self.product,
            "version": self.version,
            "channel": self.channel,
            "min_version": self.min_version,
            "downtime": self.downtime,
            "requirements": dict(self.requirements),
            "notes": self.notes,
            "migrations": list(self.migrations),
            "hooks": dict(self.hooks),
            "dirs": list(self.dirs),
            "files": {
                path: {"size": entry.size, "sha256": entry.sha256, "mode": f"{entry.mode:04o}"}
                for path, entry in self.files.items()
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable, for the journal: the fields plus who signed it and its digest."""
        return {**self.to_fields(), "key_id": self.key_id, "digest": self.digest}

    def summary(self) -> dict[str, Any]:
        """`to_dict` without the per-file list: what a run keeps in the journal.

        The journal record is read on every status refresh; a 200,000-file list
        there would make each read parse megabytes. The full list stays in the
        signed archive, which the run keeps.
        """
        fields = self.to_dict()
        fields.pop("files", None)
        fields.pop("dirs", None)
        fields["file_count"] = len(self.files)
        fields["unpacked_bytes"] = self.unpacked_bytes
        return fields

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """The inverse of `to_dict` (validated like a manifest read from an archive)."""
        fields = dict(data)
        key_id = str(fields.pop("key_id", ""))
        digest = str(fields.pop("digest", ""))
        return _manifest_from_fields(fields, key_id=key_id, digest=digest)


def encode_manifest(fields: Mapping[str, Any]) -> bytes:
    """manifest.json as written by `pack`: compact UTF-8 JSON, `length` first."""
    if next(iter(fields), None) != "length":
        raise ValueError("the manifest's first key must be 'length'")
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _invalid(problem: str) -> ArchiveRejected:
    return ArchiveRejected(f"the signed manifest is invalid: {problem}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _invalid(f"key {key!r} appears twice")
        result[key] = value
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_path(where: str, path: Any) -> str:
    if not isinstance(path, str):
        raise _invalid(f"{where}: expected a path, found {path!r}")
    problem = path_problem(path)
    if problem:
        raise _invalid(f"{where} {_q(path)}: {problem}")
    return path


def _checked_version(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{where}: expected a version string, found {value!r}")
    try:
        Version.parse(value)
    except ValueError as error:
        raise _invalid(f"{where}: {error}") from None
    return value


def _manifest_from_fields(fields: Mapping[str, Any], *, key_id: str, digest: str) -> Manifest:
    """Validate every field of a manifest object; raise ArchiveRejected naming the first problem."""
    expected = set(Manifest(**_EMPTY).to_fields())
    unknown = sorted(set(fields) - expected)
    if unknown:
        raise _invalid(f"unknown key {unknown[0]!r} (format {FORMAT} knows {', '.join(sorted(expected))})")
    missing = sorted(expected - set(fields) - _OPTIONAL)
    if missing:
        raise _invalid(f"required key {missing[0]!r} is missing")
    if fields["format"] != FORMAT:
        raise _invalid(f"format {fields['format']!r}, this dropgate reads format {FORMAT}")
    length = fields["length"]
    if not _is_int(length) or length <= 0:
        raise _invalid(f"length: expected a positive number of bytes, found {length!r}")
    product = fields["product"]
    if not isinstance(product, str) or not PRODUCT.match(product):
        raise _invalid(f"product: expected a name like gts, found {product!r}")
    version = _checked_version("version", fields["version"])
    channel = fields["channel"]
    if channel not in CHANNELS:
        raise _invalid(f"channel: expected stable or unstable, found {channel!r}")
    min_version = fields.get("min_version")
    if min_version is not None:
        min_version = _checked_version("min_version", min_version)
    downtime = fields.get("downtime")
    if downtime is not None and not isinstance(downtime, bool):
        raise _invalid(f"downtime: expected true, false or null, found {downtime!r}")
    requirements = fields.get("requirements") or {}
    if not isinstance(requirements, dict):
        raise _invalid(f"requirements: expected a mapping, found {requirements!r}")
    for name, value in requirements.items():
        if name not in REQUIREMENTS:
            raise _invalid(f"requirements: unknown key {name!r} (known: {', '.join(REQUIREMENTS)})")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise _invalid(f"requirements.{name}: expected a number ≥ 0, found {value!r}")
    notes = fields.get("notes") or ""
    if not isinstance(notes, str):
        raise _invalid(f"notes: expected text, found {type(notes).__name__}")
    raw_files = fields["files"]
    if not isinstance(raw_files, dict):
        raise _invalid("files: expected a mapping of path → {size, sha256, mode}")
    files: dict[str, FileEntry] = {}
    for path, entry in raw_files.items():
        _checked_path("files:", path)
        if not isinstance(entry, dict) or set(entry) != {"size", "sha256", "mode"}:
            raise _invalid(f"files[{_q(path)}]: expected exactly size, sha256 and mode")
        size, digest_hex, mode = entry["size"], entry["sha256"], entry["mode"]
        if not _is_int(size) or size < 0:
            raise _invalid(f"files[{_q(path)}].size: expected a number of bytes, found {size!r}")
        if not isinstance(digest_hex, str) or not _SHA256.match(digest_hex):
            raise _invalid(f"files[{_q(path)}].sha256: expected 64 lowercase hex digits, found {digest_hex!r}")
        if not isinstance(mode, str) or not _MODE.match(mode):
            raise _invalid(
                f"files[{_q(path)}].mode: expected permission bits like 0644 "
                f"(no setuid, setgid or sticky bit), found {mode!r}"
            )
        files[path] = FileEntry(size, digest_hex, int(mode, 8))
    raw_dirs = fields.get("dirs") or []
    if not isinstance(raw_dirs, list):
        raise _invalid("dirs: expected a list of folder paths")
    dirs = tuple(_checked_path("dirs:", path) for path in raw_dirs)
    _check_tree(files, dirs)
    migrations = fields.get("migrations") or []
    if not isinstance(migrations, list):
        raise _invalid("migrations: expected a list of paths")
    for path in migrations:
        if _checked_path("migrations:", path) not in files:
            raise _invalid(f"migration {_q(path)} is not a file of the payload")
    hooks = fields.get("hooks") or {}
    if not isinstance(hooks, dict):
        raise _invalid("hooks: expected a mapping of pre_apply/post_apply → path")
    for name, path in hooks.items():
        if name not in HOOKS:
            raise _invalid(f"hooks: unknown hook {name!r} (known: {', '.join(HOOKS)})")
        if _checked_path(f"hooks.{name}:", path) not in files:
            raise _invalid(f"hooks.{name} {_q(path)} is not a file of the payload")
    return Manifest(
        product=product,
        version=version,
        channel=channel,
        min_version=min_version,
        downtime=downtime,
        requirements=dict(requirements),
        notes=notes,
        migrations=tuple(migrations),
        hooks=dict(hooks),
        files=files,
        dirs=dirs,
        length=length,
        key_id=key_id,
        digest=digest,
    )


_OPTIONAL = frozenset({"min_version", "downtime", "requirements", "notes", "migrations", "hooks", "dirs"})

_EMPTY: dict[str, Any] = {
    "product": "",
    "version": "",
    "channel": "",
    "min_version": None,
    "downtime": None,
    "requirements": {},
    "notes": "",
    "migrations": (),
    "hooks": {},
    "files": {},
    "dirs": (),
    "length": 0,
}


def _check_tree(files: Mapping[str, FileEntry], dirs: Sequence[str]) -> None:
    """No path listed twice, and no file where another entry needs a folder."""
    if len(set(dirs)) != len(dirs):
        duplicate = next(path for path in dirs if dirs.count(path) > 1)
        raise _invalid(f"folder {_q(duplicate)} is listed twice")
    for path in dirs:
        if path in files:
            raise _invalid(f"{_q(path)} is listed both as a file and as a folder")
    for path in [*files, *dirs]:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in files:
                raise _invalid(f"{_q(path)} is inside {_q(parent)}, which is listed as a file")
            parent = parent.rpartition("/")[0]


def _parse_manifest(data: bytes, *, key_id: str) -> Manifest:
    if not _ANNOUNCED.match(data):
        raise _invalid('manifest.json must begin with {"length": <bytes>, ...}')
    try:
        fields = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as error:
        if isinstance(error, ArchiveRejected):
            raise
        raise _invalid(f"not UTF-8 JSON ({error})") from None
    if not isinstance(fields, dict):
        raise _invalid("expected a JSON object")
    return _manifest_from_fields(fields, key_id=key_id, digest=hashlib.sha256(data).hexdigest())


# -- reading: the gzip stream and the tar headers --------------------------


class _Inflater:
    """The decompressed bytes of an archive's concatenated gzip members, counting bytes in and out.

    Reads the file in bounded chunks and inflates at most `chunk` bytes at a
    time, so memory stays constant whatever the archive's size; with
    `max_ratio`, stops as soon as the output outgrows the input by that factor.
    """

    def __init__(self, handle: IO[bytes], *, limit: int, chunk: int = _CHUNK, max_ratio: float | None = None) -> None:
        self._handle = handle
        self._limit = limit
        self._chunk = chunk
        self._max_ratio = max_ratio
        self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._out = b""
        self._offset = 0
        self._finished = False
        self.consumed = 0  # compressed bytes read from the file
        self.produced = 0  # bytes inflated

    def _read_file(self) -> bytes:
        data = self._handle.read(min(self._chunk, self._limit - self.consumed))
        self.consumed += len(data)
        return data

    def _inflate_more(self) -> None:
        decompressor = self._decompressor
        if decompressor.unconsumed_tail:
            data = decompressor.unconsumed_tail
        elif decompressor.eof:
            data = decompressor.unused_data or self._read_file()
            if not data:
                self._finished = True
                return
            self._decompressor = decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        else:
            data = self._read_file()
            if not data:
                raise ArchiveRejected(
                    f"the gzip stream ends without its end marker after {self.consumed} bytes (truncated or corrupt)"
                )
        try:
            out = decompressor.decompress(data, self._chunk)
        except zlib.error as error:
            raise ArchiveRejected(f"corrupt gzip stream near byte {self.consumed} of the archive ({error})") from None
        self.produced += len(out)
        self._out, self._offset = out, 0
        ratio = self._max_ratio
        if ratio is not None and self.produced > RATIO_GRACE_BYTES and self.produced > ratio * self.consumed:
            raise ArchiveRejected(
                f"expansion ratio above {ratio:g}:1 ({self.produced} bytes out of {self.consumed} compressed; "
                "limits.max_ratio): a decompression bomb?"
            )

    def read(self, size: int) -> bytes:
        """Up to `size` bytes; b"" only at the clean end of the last gzip member."""
        while self._offset >= len(self._out):
            if self._finished:
                return b""
            self._inflate_more()
        start = self._offset
        self._offset = min(len(self._out), start + size)
        return self._out[start : self._offset]

    def read_up_to(self, size: int) -> bytes:
        """`size` bytes, or fewer only at the clean end of the stream."""
        parts = []
        wanted = size
        while wanted:
            data = self.read(wanted)
            if not data:
                break
            parts.append(data)
            wanted -= len(data)
        return b"".join(parts)

    def read_exact(self, size: int, what: str) -> bytes:
        data = self.read_up_to(size)
        if len(data) < size:
            raise ArchiveRejected(f"the archive ends inside {what} (truncated)")
        return data


@dataclass
class _Header:
    name: bytes
    mode: int
    size: int
    mtime: int
    kind: bytes
    link: bytes


def _number(field_bytes: bytes, what: str) -> int:
    if field_bytes[:1] in (b"\x80", b"\xff"):  # GNU base-256
        if field_bytes[0] == 0xFF:
            raise ArchiveRejected(f"corrupt tar header: negative {what}")
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip(b" \0")
    if not _OCTAL.match(text):
        raise ArchiveRejected(f"corrupt tar header: {what} field {field_bytes!r} is not an octal number")
    return int(text, 8) if text else 0


def _cut(field_bytes: bytes) -> bytes:
    return field_bytes.split(b"\0", 1)[0]


def _parse_header(block: bytes) -> _Header:
    """One 512-byte ustar/GNU header, checksum verified."""
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored != unsigned and stored != unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127):
        raise ArchiveRejected("corrupt tar header: checksum mismatch (not a tar stream, or damaged)")
    name = _cut(block[0:100])
    if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix field extends the name
        prefix = _cut(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    return _Header(
        name=name,
        mode=_number(block[100:108], "mode"),
        size=_number(block[124:136], "size"),
        mtime=_number(block[136:148], "mtime"),
        kind=block[156:157],
        link=_cut(block[157:257]),
    )


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ArchiveRejected("corrupt tar stream: a malformed pax extended header") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or space < 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveRejected("corrupt tar stream: a malformed pax extended header")
        key, _, value = record[:-1].partition(b"=")
        records[key] = value
        pos += length
    return records


def _skip_padding(inflater: _Inflater, size: int, what: str) -> None:
    padding = -size % _BLOCK
    if padding:
        inflater.read_exact(padding, what)


class _TarStream:
    """Tar members from an inflated stream, one header at a time (pax and GNU long names folded in)."""

    def __init__(self, inflater: _Inflater) -> None:
        self._inflater = inflater
        self.index = 0

    def _extended(self, header: _Header, what: str) -> bytes:
        if header.size > MAX_EXTENDED_HEADER_BYTES:
            raise ArchiveRejected(
                f"member {self.index + 1}: {what} of {header.size} bytes, "
                f"above the {MAX_EXTENDED_HEADER_BYTES}-byte limit"
            )
        data = self._inflater.read_exact(header.size, what)
        _skip_padding(self._inflater, header.size, what)
        return data

    def next(self) -> _Header | None:
        """The next member, or None at the end-of-archive marker."""
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        for _ in range(4):  # at most a few extended headers before a member
            block = self._inflater.read_exact(_BLOCK, "a tar header (the end-of-archive marker is missing)")
            if block == _ZERO_BLOCK:
                second = self._inflater.read(_BLOCK)
                if second and second != _ZERO_BLOCK[: len(second)]:
                    raise ArchiveRejected("corrupt tar stream: an empty header block in the middle of the archive")
                return None
            header = _parse_header(block)
            if header.kind == b"x":
                pax.update(_parse_pax(self._extended(header, "a pax extended header")))
                continue
            if header.kind == b"g":
                self._extended(header, "a pax global header")
                continue
            if header.kind == b"L":
                long_name = _cut(self._extended(header, "a GNU long name"))
                continue
            self.index += 1
            if long_name is not None:
                header.name = long_name
            if b"path" in pax:
                header.name = pax[b"path"]
            if b"size" in pax:
                try:
                    header.size = int(pax[b"size"])
                except ValueError:
                    raise ArchiveRejected("corrupt tar stream: a pax size that is not a number") from None
            if b"linkpath" in pax:
                header.link = pax[b"linkpath"]
                if header.kind in _REGULAR:
                    header.kind = b"2"
            if any(key.startswith(b"GNU.sparse.") for key in pax):
                header.kind = b"S"
            return header
        raise ArchiveRejected("corrupt tar stream: a chain of extended headers without a member")


def _open_archive(path: Path) -> IO[bytes]:
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
    if not start.startswith(_GZIP_MAGIC):
        raise ArchiveRejected(
            f"not a dropgate archive: it starts with bytes {start.hex(' ')}, expected the gzip signature 1f 8b"
        )


def _read_head(inflater: _Inflater) -> tuple[bytes, bytes]:
    """manifest.json and manifest.sig, the archive's first two members, as bytes."""
    found: list[bytes] = []
    for name, limit in ((MANIFEST_NAME, MAX_MANIFEST_BYTES), (SIGNATURE_NAME, MAX_SIGNATURE_BYTES)):
        block = inflater.read_up_to(_BLOCK)
        if len(block) < _BLOCK:
            raise ArchiveRejected(
                f"not a dropgate archive: the gzip stream ends where the tar header of {name} should be"
            )
        try:
            header = _parse_header(block)
        except ArchiveRejected:
            raise ArchiveRejected(f"not a dropgate archive: no valid tar header where {name} should be") from None
        if header.name != name.encode() or header.kind not in _REGULAR:
            position = "first" if name == MANIFEST_NAME else "second"
            raise ArchiveRejected(
                f"not a dropgate archive: the {position} member is {_q(header.name)}, expected the file {name}"
            )
        if header.size > limit:
            raise ArchiveRejected(f"{name} is {header.size} bytes, above the {limit}-byte limit")
        found.append(inflater.read_exact(header.size, name))
        _skip_padding(inflater, header.size, name)
    return found[0], found[1]


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
            f"the manifest is signed with key {_q(key_id)}, which is not trusted here (trusted: {', '.join(keys)})"
        )
    if not keys.verify(key_id, manifest_bytes, raw):
        raise ArchiveRejected(
            f"the signature does not verify with the trusted key {_q(key_id)}: "
            "the manifest was altered or signed with another key"
        )
    return key_id


# -- the receiver ----------------------------------------------------------


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
    if not raw.startswith(_GZIP_MAGIC):
        return None
    try:
        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw, _BLOCK + 64)
        header = _parse_header(out[:_BLOCK]) if len(out) >= _BLOCK else None
    except (zlib.error, ArchiveRejected):
        return None
    if header is None or header.name != MANIFEST_NAME.encode() or header.kind not in _REGULAR:
        return None
    match = _ANNOUNCED.match(out[_BLOCK:])
    return int(match.group(1)) if match else None


def authenticate(path: Path, keys: TrustStore) -> Manifest:
    """The archive's manifest, once its signature verified with a trusted key.

    Reads the archive's head only (manifest.json, manifest.sig), verifies the
    signature before parsing the manifest, then checks the file's length
    against the length the manifest announces.
    """
    with _open_archive(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        _check_start(handle, size)
        inflater = _Inflater(handle, limit=size, chunk=16 * 2**10)
        manifest_bytes, signature_bytes = _read_head(inflater)
    key_id = _check_signature(manifest_bytes, signature_bytes, keys)
    manifest = _parse_manifest(manifest_bytes, key_id=key_id)
    if size < manifest.length:
        raise ArchiveRejected(
            f"incomplete archive: {size} of the {manifest.length} bytes its manifest announces "
            "(upload not finished, or truncated)"
        )
    if size > manifest.length:
        raise ArchiveRejected(
            f"the archive is {size} bytes, its manifest announces {manifest.length}: data was appended to it"
        )
    return manifest


def _check_limits(manifest: Manifest, limits: Limits) -> None:
    """What the signed manifest announces must fit the limits before a byte of payload is read."""
    entries = len(manifest.files) + len(manifest.dirs)
    if entries > limits.max_members:
        raise ArchiveRejected(f"the manifest lists {entries} entries, above limits.max_members ({limits.max_members})")
    if manifest.length > limits.max_archive_bytes:
        raise ArchiveRejected(
            f"the archive is {manifest.length} bytes, above limits.max_archive_bytes ({limits.max_archive_bytes})"
        )
    for path, entry in manifest.files.items():
        if entry.size > limits.max_file_bytes:
            raise ArchiveRejected(
                f"file {_q(path)} is {entry.size} bytes, above limits.max_file_bytes ({limits.max_file_bytes})"
            )
    total = manifest.unpacked_bytes
    if total > limits.max_unpacked_bytes:
        raise ArchiveRejected(
            f"the payload unpacks to {total} bytes, above limits.max_unpacked_bytes ({limits.max_unpacked_bytes})"
        )


@dataclass
class _Staging:
    """Where payload files go: a folder, or nowhere (verify only hashes)."""

    dest: Path | None
    dirs_made: set[str] = field(default_factory=set)

    def make_dir(self, rel: str) -> None:
        if self.dest is None or rel in self.dirs_made:
            return
        parent = rel.rpartition("/")[0]
        if parent:
            self.make_dir(parent)
        with contextlib.suppress(FileExistsError):
            (self.dest / rel).mkdir(mode=0o755)
        self.dirs_made.add(rel)

    @contextlib.contextmanager
    def open_file(self, rel: str, entry: FileEntry, mtime: int) -> Iterator[IO[bytes] | None]:
        if self.dest is None:
            yield None
            return
        parent = rel.rpartition("/")[0]
        if parent:
            self.make_dir(parent)
        target = self.dest / rel
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(target, flags, 0o600), "wb") as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), entry.mode)
            mtime = min(max(mtime, 0), _LATEST_MTIME)
            os.utime(handle.fileno(), (mtime, mtime))


def _member_path(header: _Header, manifest: Manifest, seen: set[str]) -> tuple[str, bool] | None:
    """The release-relative path of a payload member and whether it is a folder; None for `payload/` itself.

    Every rule of the allowlist is checked here, in the order an operator
    would want to hear about it.
    """
    try:
        name = header.name.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveRejected(f"member {_q(header.name)}: the name is not valid UTF-8") from None
    kind = header.kind
    if kind not in _REGULAR and kind != b"5":
        what = _KINDS.get(kind, f"an entry of unknown tar type {kind!r}")
        target = f" (→ {_q(header.link.decode('utf-8', 'replace'))})" if header.link else ""
        raise ArchiveRejected(f"member {_q(name)} is {what}{target}; only regular files and folders are allowed")
    is_dir = kind == b"5"
    if is_dir and name.endswith("/"):
        name = name[:-1]
    problem = path_problem(name)
    if problem:
        raise ArchiveRejected(f"member {_q(name)}: {problem}")
    if name == PAYLOAD and is_dir:
        return None
    if not name.startswith(PAYLOAD + "/"):
        raise ArchiveRejected(
            f"member {_q(name)} is outside {PAYLOAD}/ "
            f"(only {MANIFEST_NAME} and {SIGNATURE_NAME} may precede the payload)"
        )
    if header.mode & 0o7000:
        raise ArchiveRejected(
            f"member {_q(name)}: mode {header.mode & 0o7777:04o} has a setuid, setgid or sticky bit; not allowed"
        )
    rel = name[len(PAYLOAD) + 1 :]
    if rel in seen:
        raise ArchiveRejected(f"member {_q(name)} appears twice in the archive")
    seen.add(rel)
    if is_dir:
        if rel not in manifest.dirs:
            listed = "as a file" if rel in manifest.files else "at all"
            raise ArchiveRejected(f"member {_q(name)} is a folder that the signed manifest does not list {listed}")
        return rel, True
    entry = manifest.files.get(rel)
    if entry is None:
        listed = " (it lists a folder there)" if rel in manifest.dirs else ""
        raise ArchiveRejected(f"member {_q(name)} is not listed in the signed manifest{listed}")
    if header.size != entry.size:
        raise ArchiveRejected(f"member {_q(name)}: {header.size} bytes in the archive, the manifest says {entry.size}")
    if header.mode & 0o777 != entry.mode:
        raise ArchiveRejected(
            f"member {_q(name)}: mode {header.mode & 0o777:04o} in the archive, the manifest says {entry.mode:04o}"
        )
    return rel, False


def _stream_payload(
    inflater: _Inflater,
    manifest: Manifest,
    staging: _Staging,
    *,
    checkpoint: Checkpoint,
    progress: Progress,
) -> None:
    tar = _TarStream(inflater)
    seen: set[str] = set()
    total = max(1, manifest.length)
    reported = 0.0
    chunks = 0
    while (header := tar.next()) is not None:
        checkpoint()
        if tar.index > len(manifest.files) + len(manifest.dirs) + 1:
            raise ArchiveRejected(
                f"more members than the {len(manifest.files) + len(manifest.dirs)} the manifest lists"
            )
        found = _member_path(header, manifest, seen)
        if found is None or found[1]:
            if header.size:
                raise ArchiveRejected(
                    f"member {_q(header.name)}: a folder entry that carries {header.size} bytes of data"
                )
            if found is not None:
                staging.make_dir(found[0])
            continue
        rel = found[0]
        entry = manifest.files[rel]
        hasher = hashlib.sha256()
        remaining = entry.size
        with staging.open_file(rel, entry, header.mtime) as out:
            while remaining:
                data = inflater.read(min(remaining, _CHUNK))
                if not data:
                    raise ArchiveRejected(f"member {_q(PAYLOAD + '/' + rel)} is cut short: the archive ends inside it")
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
            digest = hasher.hexdigest()
            if digest != entry.sha256:
                raise ArchiveRejected(
                    f"member {_q(PAYLOAD + '/' + rel)}: SHA-256 {digest} does not match the manifest's {entry.sha256}"
                )
        _skip_padding(inflater, entry.size, f"member {_q(rel)}")
        done = inflater.consumed / total
        if done - reported >= 0.01:
            progress(done)
            reported = done
    while trailing := inflater.read(_CHUNK):
        if trailing.count(0) != len(trailing):
            raise ArchiveRejected("data after the tar end-of-archive marker (only zero padding may follow it)")
    for path in manifest.files:
        if path not in seen:
            raise ArchiveRejected(f"file {_q(path)} is listed in the signed manifest but missing from the payload")
    for path in manifest.dirs:
        if path not in seen:
            raise ArchiveRejected(f"folder {_q(path)} is listed in the signed manifest but missing from the payload")
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
    _check_limits(manifest, limits)
    with _open_archive(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != manifest.length:
            raise ArchiveRejected(f"the archive is {size} bytes, its manifest announces {manifest.length}")
        inflater = _Inflater(handle, limit=size, max_ratio=limits.max_ratio)
        manifest_bytes, _ = _read_head(inflater)
        if hashlib.sha256(manifest_bytes).hexdigest() != manifest.digest:
            raise ArchiveRejected("the archive changed after its signature was checked (its manifest differs)")
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
    manifest = authenticate(path, keys)
    _check_payload(path, manifest, limits or Limits(), _Staging(None), checkpoint=checkpoint, progress=progress)
    return manifest


# -- the vendor side: pack ---------------------------------------------------

_PACK_KEYS = {
    "product", "version", "channel", "min_version", "downtime", "requirements",
    "notes", "notes_file", "migrations", "hooks", "payload",
}  # fmt: skip


def _head_tar(manifest_bytes: bytes, signature_bytes: bytes) -> bytes:
    parts = []
    for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature_bytes)):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        parts += [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), data, bytes(-len(data) % _BLOCK)]
    return b"".join(parts)


def seal_head(fields: Mapping[str, Any], payload_length: int, key: SigningKey) -> bytes:
    """The archive's first gzip member: manifest.json (with its final `length`) and its signature.

    The length counts this head too, so it is found as a fixed point: build the
    head for a guessed length, measure, repeat. Compressing the head at level 0
    makes its size depend only on the number of digits, which always settles.
    """
    rest = {key_name: value for key_name, value in fields.items() if key_name != "length"}
    length = payload_length
    for attempt in range(24):
        manifest_bytes = encode_manifest({"length": length, **rest})
        signature = {
            "algorithm": "ed25519",
            "key_id": key.key_id,
            "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
        }
        signature_bytes = json.dumps(signature, separators=(",", ":")).encode("ascii")
        level = 9 if attempt < 12 else 0
        head = gzip.compress(_head_tar(manifest_bytes, signature_bytes), compresslevel=level, mtime=0)
        if len(head) + payload_length == length:
            return head
        length = len(head) + payload_length
    raise RuntimeError("the archive's length did not settle")  # pragma: no cover - level 0 always settles


def _pack_refusal(problem: str) -> ArchiveRejected:
    return ArchiveRejected(f"cannot pack: {problem}")


def _read_pack_manifest(src: Path) -> dict[str, Any]:
    path = src / "manifest.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise _pack_refusal(f"cannot read {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise _pack_refusal(f"{path} is not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise _pack_refusal(f"{path}: expected a mapping of manifest keys")
    unknown = sorted(set(raw) - _PACK_KEYS)
    if unknown:
        raise _pack_refusal(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_PACK_KEYS))})")
    spec = dict(raw)
    if "notes_file" in spec:
        if "notes" in spec:
            raise _pack_refusal(f"{path}: give notes or notes_file, not both")
        try:
            spec["notes"] = (src / str(spec.pop("notes_file"))).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise _pack_refusal(f"cannot read the notes file: {error}") from error
    for key in ("version", "min_version"):
        if isinstance(spec.get(key), int | float) and not isinstance(spec.get(key), bool):
            spec[key] = str(spec[key])  # YAML reads 3.19 as a number; quote versions to be safe
    for key in ("product", "version"):
        if key not in spec:
            raise _pack_refusal(f"{path}: required key {key!r} is missing")
    spec.setdefault("channel", "stable")
    return spec


@dataclass(frozen=True)
class _Entry:
    rel: str
    path: Path
    is_dir: bool
    mode: int
    size: int
    mtime: int


def _collect_payload(root: Path) -> list[_Entry]:
    """Every entry under `root`, in order, refusing what a receiver would refuse."""
    if not root.is_dir():
        raise _pack_refusal(f"the payload folder {root} does not exist")
    entries: list[_Entry] = []

    def walk(folder: Path, prefix: str) -> None:
        with os.scandir(folder) as listing:
            children = sorted(listing, key=lambda child: child.name)
        for child in children:
            rel = prefix + child.name
            shown = f"{root.name}/{rel}"
            problem = path_problem(rel)
            if problem:
                raise _pack_refusal(f"{_q(shown)}: {problem}")
            info = child.stat(follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                raise _pack_refusal(f"{_q(shown)} is a symbolic link; archives carry only regular files and folders")
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                kind = {
                    stat.S_IFCHR: "a character device",
                    stat.S_IFBLK: "a block device",
                    stat.S_IFIFO: "a FIFO",
                    stat.S_IFSOCK: "a socket",
                }.get(stat.S_IFMT(info.st_mode), "not a regular file")
                raise _pack_refusal(f"{_q(shown)} is {kind}; archives carry only regular files and folders")
            if info.st_mode & 0o7000:
                raise _pack_refusal(
                    f"{_q(shown)} has a setuid, setgid or sticky bit (mode {info.st_mode & 0o7777:04o})"
                )
            is_dir = stat.S_ISDIR(info.st_mode)
            entries.append(
                _Entry(
                    rel,
                    Path(child.path),
                    is_dir,
                    info.st_mode & 0o777,
                    0 if is_dir else info.st_size,
                    int(info.st_mtime),
                )
            )
            if is_dir:
                walk(Path(child.path), rel + "/")

    walk(root, "")
    return entries


class _HashingReader(io.RawIOBase):
    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.hasher = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.hasher.update(data)
        return data


def _write_payload(entries: Sequence[_Entry], out: IO[bytes], level: int) -> dict[str, FileEntry]:
    """The payload gzip member; returns each file's size, hash and mode as actually packed."""
    files: dict[str, FileEntry] = {}
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=level, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for entry in entries:
            info = tarfile.TarInfo(f"{PAYLOAD}/{entry.rel}")
            info.mtime = entry.mtime
            info.mode = entry.mode
            info.uname = info.gname = ""
            if entry.is_dir:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = entry.size
            try:
                with open(entry.path, "rb") as source:
                    reader = _HashingReader(source)
                    tar.addfile(info, reader)
            except OSError as error:
                raise _pack_refusal(f"cannot read {entry.path}: {error.strerror or error}") from error
            files[entry.rel] = FileEntry(entry.size, reader.hasher.hexdigest(), entry.mode)
    return files


def write_build_dir(source: Path, manifest: Mapping[str, Any], files: Mapping[str, str | bytes]) -> Path:
    """Lay out the folder `pack` reads: `manifest.yaml` and the release tree under `release/`.

    Whatever was in `source` before is removed; hooks and migrations are made executable.
    """
    shutil.rmtree(source, ignore_errors=True)
    for name, content in files.items():
        path = source / "release" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        if name.startswith(("migrations/", "hooks/")):
            path.chmod(0o755)
    source.mkdir(parents=True, exist_ok=True)
    (source / "manifest.yaml").write_text(yaml.safe_dump(dict(manifest), sort_keys=False), encoding="utf-8")
    return source


def pack(src: Path, private_key_path: Path, out: Path, *, compresslevel: int = 6) -> Path:
    """Build and sign `<product>.<version>.tgz` from `src/manifest.yaml` and its payload folder.

    `out` is the archive's path, or a folder to write it into. The archive is
    written next to its final name and renamed into place when complete.
    """
    key = load_signing_key(private_key_path)
    spec = _read_pack_manifest(src)
    payload_root = src / str(spec.pop("payload", SOURCE_FOLDER))
    entries = _collect_payload(payload_root)
    draft = {
        "length": 1,
        "format": FORMAT,
        **{name: spec.get(name, _EMPTY[name]) for name in _EMPTY if name not in ("files", "dirs", "length")},
        "dirs": [entry.rel for entry in entries if entry.is_dir],
        "files": {
            e.rel: {"size": e.size, "sha256": "0" * 64, "mode": f"{e.mode:04o}"} for e in entries if not e.is_dir
        },
    }
    draft["migrations"] = list(draft["migrations"] or [])
    draft["hooks"] = dict(draft["hooks"] or {})
    try:
        manifest = _manifest_from_fields(draft, key_id=key.key_id, digest="")
    except ArchiveRejected as error:
        raise _pack_refusal(str(error).replace("the signed manifest is invalid: ", "manifest.yaml: ")) from None
    name = f"{manifest.product}.{manifest.version}.tgz"
    target = out / name if out.is_dir() else out
    if target.name != name:
        raise _pack_refusal(f"the archive must be named {name} (receivers check the name), not {target.name}")
    if not target.parent.is_dir():
        raise _pack_refusal(f"the output folder {target.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as archive, tempfile.TemporaryFile(dir=target.parent) as payload:
            files = _write_payload(entries, payload, compresslevel)
            payload_length = payload.tell()
            fields = manifest.to_fields() | {
                "files": {p: {"size": f.size, "sha256": f.sha256, "mode": f"{f.mode:04o}"} for p, f in files.items()}
            }
            archive.write(seal_head(fields, payload_length, key))
            payload.seek(0)
            shutil.copyfileobj(payload, archive, _CHUNK)
            archive.flush()
            os.fchmod(archive.fileno(), 0o644)
            os.fsync(archive.fileno())
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
