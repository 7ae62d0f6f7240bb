"""The signed manifest: its model, its exact schema, and its encoding."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.archive.format import ANNOUNCED, FORMAT
from pipeline.archive.names import PRODUCT, path_problem, quote
from pipeline.errors import ArchiveRejected
from pipeline.versions import Version

CHANNELS = ("stable", "unstable")
HOOKS = ("pre_apply", "post_apply")
REQUIREMENTS = ("min_cpus", "min_memory_gib", "min_free_percent", "free_bytes")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODE = re.compile(r"^0?[0-7]{3}$")


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
        return manifest_from_fields(fields, key_id=key_id, digest=digest)


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
        raise _invalid(f"{where} {quote(path)}: {problem}")
    return path


def _checked_version(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{where}: expected a version string, found {value!r}")
    try:
        Version.parse(value)
    except ValueError as error:
        raise _invalid(f"{where}: {error}") from None
    return value


def manifest_from_fields(fields: Mapping[str, Any], *, key_id: str, digest: str) -> Manifest:
    """Validate every field of a manifest object; raise ArchiveRejected naming the first problem."""
    expected = set(Manifest(**EMPTY_FIELDS).to_fields())
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
            raise _invalid(f"files[{quote(path)}]: expected exactly size, sha256 and mode")
        size, digest_hex, mode = entry["size"], entry["sha256"], entry["mode"]
        if not _is_int(size) or size < 0:
            raise _invalid(f"files[{quote(path)}].size: expected a number of bytes, found {size!r}")
        if not isinstance(digest_hex, str) or not _SHA256.match(digest_hex):
            raise _invalid(f"files[{quote(path)}].sha256: expected 64 lowercase hex digits, found {digest_hex!r}")
        if not isinstance(mode, str) or not _MODE.match(mode):
            raise _invalid(
                f"files[{quote(path)}].mode: expected permission bits like 0644 "
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
            raise _invalid(f"migration {quote(path)} is not a file of the payload")
    hooks = fields.get("hooks") or {}
    if not isinstance(hooks, dict):
        raise _invalid("hooks: expected a mapping of pre_apply/post_apply → path")
    for name, path in hooks.items():
        if name not in HOOKS:
            raise _invalid(f"hooks: unknown hook {name!r} (known: {', '.join(HOOKS)})")
        if _checked_path(f"hooks.{name}:", path) not in files:
            raise _invalid(f"hooks.{name} {quote(path)} is not a file of the payload")
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

EMPTY_FIELDS: dict[str, Any] = {
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
        raise _invalid(f"folder {quote(duplicate)} is listed twice")
    for path in dirs:
        if path in files:
            raise _invalid(f"{quote(path)} is listed both as a file and as a folder")
    for path in [*files, *dirs]:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in files:
                raise _invalid(f"{quote(path)} is inside {quote(parent)}, which is listed as a file")
            parent = parent.rpartition("/")[0]


def parse_manifest(data: bytes, *, key_id: str) -> Manifest:
    if not ANNOUNCED.match(data):
        raise _invalid('manifest.json must begin with {"length": <bytes>, ...}')
    try:
        fields = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as error:
        if isinstance(error, ArchiveRejected):
            raise
        raise _invalid(f"not UTF-8 JSON ({error})") from None
    if not isinstance(fields, dict):
        raise _invalid("expected a JSON object")
    return manifest_from_fields(fields, key_id=key_id, digest=hashlib.sha256(data).hexdigest())
