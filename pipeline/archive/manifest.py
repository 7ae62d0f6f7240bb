"""The signed manifest: its model, its exact schema (read as a stream), and its encoding.

The schema is exact: each key has one JSON type (a bool is not an integer,
an empty list is not an empty object), numbers are ASCII digits and finite,
versions and products are ASCII and matched whole, every path obeys the name
rules. The manifest is read entry by entry against the site's limits, so an
archive listing more entries than `limits.max_members` is refused at the
first one too many, before the rest is read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.archive.entries import FILE, FOLDER, Entries, FileEntry
from pipeline.archive.format import ANNOUNCED, FORMAT
from pipeline.archive.jsonstream import JsonStream
from pipeline.archive.names import PRODUCT, path_problem, quote
from pipeline.config import Limits
from pipeline.errors import ArchiveRejected
from pipeline.versions import Version

__all__ = ["CHANNELS", "HOOKS", "REQUIREMENTS", "FileEntry", "Manifest", "encode_manifest", "read_manifest"]

CHANNELS = ("stable", "unstable")
HOOKS = ("pre_apply", "post_apply")
# name → (whole numbers only, largest value, what it is)
_REQUIREMENT_RULES: dict[str, tuple[bool, int, str]] = {
    "min_cpus": (True, 1_000_000, "a whole number of CPU cores"),
    "min_memory_gib": (False, 2**20, "a number of GiB"),
    "min_free_percent": (False, 100, "a percentage"),
    "free_bytes": (True, 2**62, "a whole number of bytes"),
}
REQUIREMENTS = tuple(_REQUIREMENT_RULES)
MAX_LENGTH = 2**62  # the largest archive or file size a manifest may state
ANNOUNCE_WITHIN = 64  # `{"length": N,` must fit in manifest.json's first 64 bytes (what the inbox reads)
_REQUIRED = ("length", "format", "product", "version", "channel", "files")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODE = re.compile(r"0?[0-7]{3}")
_WS = rb"[ \t\n\r]*"
# One files entry as `pack` and most writers lay it out: a plain path (no escapes), then size, sha256, mode.
_PLAIN_FILE_ENTRY = re.compile(
    _WS + rb'"([^"\\\x00-\x1f]*)"' + _WS + rb":" + _WS + rb"\{" + _WS
    + rb'"size"' + _WS + rb":" + _WS + rb"(0|[1-9][0-9]{0,18})" + _WS + rb"," + _WS
    + rb'"sha256"' + _WS + rb":" + _WS + rb'"([0-9a-f]{64})"' + _WS + rb"," + _WS
    + rb'"mode"' + _WS + rb":" + _WS + rb'"(0?[0-7]{3})"' + _WS + rb"\}"
)  # fmt: skip
_FAST_LOOKAHEAD = 4096  # bytes buffered before trying it: more than a path and its fields
_WRITABLE_BY_OTHERS = 0o022
_SMALLEST_ENTRY = 4  # bytes of manifest.json per entry at the least (a folder: "a",)
_TYPICAL_ENTRY = 64  # without limits (pack), the table starts at this and grows if needed
_CHECK_EVERY = 1024  # entries between two checkpoints

Checkpoint = Callable[[], None]


def _nothing() -> None:
    return None


def _invalid(problem: str) -> ArchiveRejected:
    return ArchiveRejected(f"the signed manifest is invalid: {problem}")


class _Files(Mapping[str, FileEntry]):
    """The manifest's files as a read-only mapping: path → FileEntry."""

    def __init__(self, entries: Entries) -> None:
        self._entries = entries

    def __getitem__(self, path: str) -> FileEntry:
        index = self._entries.find(path)
        if index < 0 or self._entries.kind(index) != FILE:
            raise KeyError(path)
        return self._entries.file(index)

    def __iter__(self) -> Iterator[str]:
        return (self._entries.name(index) for index in self._entries.indexes(FILE))

    def __len__(self) -> int:
        return self._entries.files


class _Folders(Collection[str]):
    """The manifest's folders, in the order listed."""

    def __init__(self, entries: Entries) -> None:
        self._entries = entries

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        index = self._entries.find(path)
        return index >= 0 and self._entries.kind(index) == FOLDER

    def __iter__(self) -> Iterator[str]:
        return (self._entries.name(index) for index in self._entries.indexes(FOLDER))

    def __len__(self) -> int:
        return len(self._entries) - self._entries.files


@dataclass(frozen=True)
class Manifest:
    """The signed description of an archive (docs/archive-format.md, "manifest.json")."""

    product: str
    version: str
    channel: str
    min_version: str | None
    downtime: bool | None  # None: let the version change decide (release.plan_downtime)
    requirements: dict[str, int | float]
    notes: str
    migrations: tuple[str, ...]
    hooks: dict[str, str]
    length: int
    entries: Entries = field(default_factory=Entries, repr=False)
    key_id: str = ""  # the key that signed it (from manifest.sig)
    digest: str = ""  # SHA-256 of manifest.json as signed

    @property
    def files(self) -> Mapping[str, FileEntry]:
        return _Files(self.entries)

    @property
    def dirs(self) -> Collection[str]:
        return _Folders(self.entries)

    @property
    def unpacked_bytes(self) -> int:
        return self.entries.total_size

    def to_fields(self) -> dict[str, Any]:
        """The manifest.json object; `length` comes first (the inbox reads it from the start)."""
        return self._scalars() | {
            "dirs": list(self.dirs),
            "files": {
                path: {"size": entry.size, "sha256": entry.sha256, "mode": f"{entry.mode:04o}"}
                for path, entry in self.files.items()
            },
        }

    def _scalars(self) -> dict[str, Any]:
        """Every field but the entries (which may be 200,000)."""
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
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the fields plus who signed it and its digest."""
        return {**self.to_fields(), "key_id": self.key_id, "digest": self.digest}

    def summary(self) -> dict[str, Any]:
        """`to_dict` without the per-entry lists: what a run keeps in the journal.

        The journal record is read on every status refresh; a 200,000-file list
        there would make each read parse megabytes. The full list stays in the
        signed archive, which the run keeps.
        """
        fields = self._scalars() | {"key_id": self.key_id, "digest": self.digest}
        fields["file_count"] = len(self.files)
        fields["unpacked_bytes"] = self.unpacked_bytes
        return fields

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """The inverse of `to_dict`, read by the same rules as a manifest in an archive."""
        fields = {key: value for key, value in data.items() if key not in ("key_id", "digest")}
        return manifest_from_fields(fields, key_id=str(data.get("key_id", "")), digest=str(data.get("digest", "")))


def encode_manifest(fields: Mapping[str, Any]) -> bytes:
    """manifest.json as written by `pack`: compact UTF-8 JSON, `length` first."""
    if next(iter(fields), None) != "length":
        raise ValueError("the manifest's first key must be 'length'")
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def manifest_from_fields(
    fields: Mapping[str, Any], *, key_id: str, digest: str, limits: Limits | None = None
) -> Manifest:
    """A manifest object given as Python values, read by exactly the rules of one in an archive."""
    try:
        encoded = encode_manifest(fields)
    except (TypeError, ValueError) as error:
        raise _invalid(str(error)) from None
    return read_manifest([encoded], key_id=key_id, digest=digest, limits=limits, size=len(encoded))


def read_manifest(
    chunks: Iterable[bytes],
    *,
    key_id: str,
    digest: str,
    limits: Limits | None = None,
    checkpoint: Checkpoint = _nothing,
    size: int = 0,
) -> Manifest:
    """Read manifest.json from its bytes, in chunks, against the exact schema and `limits`.

    Raises ArchiveRejected naming the first problem. With `limits`, counts and
    sizes are refused as soon as they pass them. `size`, the manifest's size in
    bytes, sizes the entries' table so that it never grows while it fills.
    """
    pieces = iter(chunks)
    first = b""
    while len(first) < ANNOUNCE_WITHIN and (piece := next(pieces, b"")):
        first += piece
    if not ANNOUNCED.match(first[:ANNOUNCE_WITHIN]):
        raise _invalid(
            f'manifest.json must begin with {{"length": <bytes>, ...}} within its first {ANNOUNCE_WITHIN} bytes'
        )
    stream = JsonStream(_chained(first, pieces), _invalid)
    if limits is not None:
        capacity = min(limits.max_members + 1, size // _SMALLEST_ENTRY + 1)
    else:
        capacity = size // _TYPICAL_ENTRY + 1
    entries = Entries(capacity, name_bytes=max(size, 1))
    return _ManifestReader(stream, limits, checkpoint, entries).read(key_id, digest)


def _chained(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


class _ManifestReader:
    """One pass over manifest.json, key by key, building the Manifest."""

    def __init__(self, stream: JsonStream, limits: Limits | None, checkpoint: Checkpoint, entries: Entries) -> None:
        self.stream = stream
        self.limits = limits
        self.checkpoint = checkpoint
        self.entries = entries
        self.values: dict[str, Any] = {}

    def read(self, key_id: str, digest: str) -> Manifest:
        readers: dict[str, Callable[[], Any]] = {
            "length": self._length,
            "format": self._format,
            "product": self._product,
            "version": lambda: self._version("version"),
            "channel": self._channel,
            "min_version": lambda: None if self.stream.is_null() else self._version("min_version"),
            "downtime": self._downtime,
            "requirements": self._requirements,
            "notes": lambda: self.stream.text("notes", "text (the release notes)"),
            "migrations": self._migrations,
            "hooks": self._hooks,
            "dirs": self._dirs,
            "files": self._files,
        }
        for key in self.stream.keys("manifest.json", "a JSON object"):
            read = readers.get(key)
            if read is None:
                known = ", ".join(sorted(readers))
                raise _invalid(f"unknown key {quote(key)} (format {FORMAT} knows {known})")
            if key in self.values:
                raise _invalid(f"key {quote(key)} appears twice")
            self.values[key] = read()
        self.stream.finish()
        for key in _REQUIRED:
            if key not in self.values:
                raise _invalid(f"required key {key!r} is missing")
        self._check_tree()
        self._check_scripts()
        self._check_totals()
        values = self.values
        return Manifest(
            product=values["product"],
            version=values["version"],
            channel=values["channel"],
            min_version=values.get("min_version"),
            downtime=values.get("downtime"),
            requirements=values.get("requirements", {}),
            notes=values.get("notes", ""),
            migrations=tuple(values.get("migrations", ())),
            hooks=values.get("hooks", {}),
            length=values["length"],
            entries=self.entries,
            key_id=key_id,
            digest=digest,
        )

    # -- scalar keys -------------------------------------------------------------
    def _length(self) -> int:
        length = self.stream.integer("length", "the archive's size in bytes", maximum=MAX_LENGTH)
        if length == 0:
            raise _invalid("length is 0, expected the archive's size in bytes")
        limits = self.limits
        if limits is not None and length > limits.max_archive_bytes:
            raise ArchiveRejected(
                f"the archive is {length} bytes, above limits.max_archive_bytes ({limits.max_archive_bytes})"
            )
        return length

    def _format(self) -> int:
        found = self.stream.integer("format", str(FORMAT), maximum=2**31)
        if found != FORMAT:
            raise _invalid(f"format {found}, this dropgate reads format {FORMAT}")
        return found

    def _product(self) -> str:
        product = self.stream.text("product", "a product name like gts")
        if not PRODUCT.fullmatch(product):
            raise _invalid(f"product: expected a name like gts (a-z, 0-9, _ and -), found {quote(product)}")
        return product

    def _version(self, where: str) -> str:
        value = self.stream.text(where, "a version like 3.19.274")
        try:
            Version.parse(value)
        except ValueError as error:
            raise _invalid(f"{where}: {error}") from None
        return value

    def _downtime(self) -> bool | None:
        return None if self.stream.is_null() else self.stream.boolean("downtime", "true, false or null")

    def _channel(self) -> str:
        channel = self.stream.text("channel", "stable or unstable")
        if channel not in CHANNELS:
            raise _invalid(f"channel: expected stable or unstable, found {quote(channel)}")
        return channel

    def _requirements(self) -> dict[str, int | float]:
        found: dict[str, int | float] = {}
        for name in self.stream.keys("requirements", "an object of thresholds"):
            rule = _REQUIREMENT_RULES.get(name)
            if rule is None:
                raise _invalid(f"requirements: unknown key {quote(name)} (known: {', '.join(REQUIREMENTS)})")
            if name in found:
                raise _invalid(f"requirements: key {quote(name)} appears twice")
            whole, maximum, what = rule
            where = f"requirements.{name}"
            if whole:
                found[name] = self.stream.integer(where, what, maximum=maximum)
            else:
                found[name] = self.stream.number(where, what, maximum=maximum)
        return found

    # -- paths -------------------------------------------------------------------
    def _path(self, where: str, expected: str = "a path in the release") -> str:
        path = self.stream.text(where, expected)
        problem = path_problem(path)
        if problem:
            raise _invalid(f"{where} {quote(path)}: {problem}")
        return path

    def _migrations(self) -> list[str]:
        migrations: list[str] = []
        for index in self.stream.items("migrations", "a list of paths"):
            path = self._path(f"migrations[{index}]")
            if path in migrations:
                raise _invalid(f"migration {quote(path)} is listed twice")
            migrations.append(path)
        return migrations

    def _hooks(self) -> dict[str, str]:
        hooks: dict[str, str] = {}
        for name in self.stream.keys("hooks", "an object of pre_apply/post_apply → path"):
            if name not in HOOKS:
                raise _invalid(f"hooks: unknown hook {quote(name)} (known: {', '.join(HOOKS)})")
            if name in hooks:
                raise _invalid(f"hooks: {name} appears twice")
            hooks[name] = self._path(f"hooks.{name}")
        return hooks

    def _dirs(self) -> bool:  # the folders go to the entries; the value only marks the key as read
        for index in self.stream.items("dirs", "a list of folder paths"):
            self._make_room()
            self._add(self._path(f"dirs[{index}]"), FOLDER)
        return True

    def _files(self) -> bool:  # the files go to the entries; the value only marks the key as read
        stream = self.stream
        if not stream.begin_object("files", "an object of path → {size, sha256, mode}"):
            return True
        while True:
            self._make_room()
            found = stream.match(_PLAIN_FILE_ENTRY, _FAST_LOOKAHEAD)
            if found is not None:  # the usual layout, read in one step; anything else goes the long way
                path_bytes, size_text, sha256_text, mode_text = found.groups()
                try:
                    path = path_bytes.decode("utf-8")
                except UnicodeDecodeError:
                    raise _invalid("files: a path that is not valid UTF-8") from None
                self._check_file_path(path)
                size = int(size_text)
                if size > MAX_LENGTH:
                    raise _invalid(f"files[{quote(path)}].size is {size}, above the largest allowed ({MAX_LENGTH})")
                self._add_file(path, size, bytes.fromhex(sha256_text.decode("ascii")), int(mode_text, 8))
            else:
                path = stream.key("files")
                self._check_file_path(path)
                self._add_file(path, *self._file_fields(f"files[{quote(path)}]"))
            if not stream.more_keys("files"):
                return True

    def _check_file_path(self, path: str) -> None:
        problem = path_problem(path)
        if problem:
            raise _invalid(f"files: {quote(path)}: {problem}")

    def _file_fields(self, where: str) -> tuple[int, bytes, int]:
        """A file's {size, sha256, mode} in any key order, each key once."""
        stream = self.stream
        size: int | None = None
        sha256: str | None = None
        mode: str | None = None
        for key in stream.keys(where, "an object of size, sha256 and mode"):
            if key == "size" and size is None:
                size = stream.integer(f"{where}.size", "a number of bytes", maximum=MAX_LENGTH)
            elif key == "sha256" and sha256 is None:
                sha256 = stream.text(f"{where}.sha256", "64 lowercase hex digits")
                if not _SHA256.fullmatch(sha256):
                    raise _invalid(f"{where}.sha256: expected 64 lowercase hex digits, found {quote(sha256)}")
            elif key == "mode" and mode is None:
                mode = stream.text(f"{where}.mode", "permission bits like 0644")
                if not _MODE.fullmatch(mode):
                    raise _invalid(
                        f"{where}.mode: expected permission bits like 0644 "
                        f"(no setuid, setgid or sticky bit), found {quote(mode)}"
                    )
            else:
                raise _invalid(f"{where}: expected exactly size, sha256 and mode, found {quote(key)}")
        if size is None or sha256 is None or mode is None:
            raise _invalid(f"{where}: expected exactly size, sha256 and mode")
        return size, bytes.fromhex(sha256), int(mode, 8)

    def _add_file(self, path: str, size: int, sha256: bytes, mode: int) -> None:
        limits = self.limits
        if limits is not None and size > limits.max_file_bytes:
            raise ArchiveRejected(
                f"file {quote(path)} is {size} bytes, above limits.max_file_bytes ({limits.max_file_bytes})"
            )
        self._add(path, FILE, size, sha256, mode)

    def _make_room(self) -> None:
        """Another entry follows: refuse it before reading it when the table is at limits.max_members."""
        limits = self.limits
        if limits is not None and len(self.entries) >= limits.max_members:
            raise ArchiveRejected(f"the manifest lists more entries than limits.max_members ({limits.max_members})")

    def _add(self, path: str, kind: int, size: int = 0, sha256: bytes = bytes(32), mode: int = 0) -> None:
        entries = self.entries
        self._make_room()
        existing = entries.find(path)
        if existing >= 0:
            if entries.kind(existing) != kind:
                raise _invalid(f"{quote(path)} is listed both as a file and as a folder")
            raise _invalid(f"{'folder' if kind == FOLDER else 'file'} {quote(path)} is listed twice")
        clash = entries.find_folded(path)
        if clash >= 0:
            raise _invalid(
                f"{quote(path)} and {quote(entries.name(clash))} are one name on a case-insensitive or "
                "normalizing filesystem (equal after NFKC and case folding)"
            )
        entries.add(path, kind, size, sha256, mode)
        if len(entries) % _CHECK_EVERY == 0:
            self.checkpoint()

    # -- rules across keys ---------------------------------------------------------
    def _check_tree(self) -> None:
        """No path lies under a file; a listed folder ends the walk up (its own path is checked too)."""
        entries = self.entries
        for index in range(len(entries)):
            if index % _CHECK_EVERY == 0:
                self.checkpoint()
            path = entries.name(index)
            parent = path.rpartition("/")[0]
            while parent:
                found = entries.find(parent)
                if found >= 0:
                    if entries.kind(found) == FILE:
                        raise _invalid(f"{quote(path)} is inside {quote(parent)}, which is listed as a file")
                    break
                parent = parent.rpartition("/")[0]

    def _check_scripts(self) -> None:
        """Hooks and migrations are files of the payload that only their owner may change (they run as root)."""
        scripts = [(f"hooks.{name}", path) for name, path in self.values.get("hooks", {}).items()]
        scripts += [("migration", path) for path in self.values.get("migrations", [])]
        for what, path in scripts:
            index = self.entries.find(path)
            if index < 0 or self.entries.kind(index) != FILE:
                raise _invalid(f"{what} {quote(path)} is not a file of the payload")
            mode = self.entries.mode(index)
            if mode & _WRITABLE_BY_OTHERS:
                raise _invalid(
                    f"{what} {quote(path)} has mode {mode:04o}: group- or world-writable, "
                    "and hooks and migrations run as root"
                )

    def _check_totals(self) -> None:
        limits = self.limits
        total = self.entries.total_size
        if limits is not None and total > limits.max_unpacked_bytes:
            raise ArchiveRejected(
                f"the payload unpacks to {total} bytes, above limits.max_unpacked_bytes ({limits.max_unpacked_bytes})"
            )
