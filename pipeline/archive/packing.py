"""The vendor side: `pack` builds and signs an archive from a release tree."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from pipeline.archive.entries import FileEntry
from pipeline.archive.format import BLOCK, CHUNK, FORMAT, MANIFEST_NAME, PAYLOAD, SIGNATURE_NAME
from pipeline.archive.manifest import encode_manifest, manifest_from_fields
from pipeline.archive.names import path_problem, quote
from pipeline.errors import ArchiveRejected
from pipeline.signing import SigningKey, load_signing_key

SOURCE_FOLDER = "release"  # pack's default payload folder next to manifest.yaml

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
        parts += [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), data, bytes(-len(data) % BLOCK)]
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
                raise _pack_refusal(f"{quote(shown)}: {problem}")
            info = child.stat(follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                raise _pack_refusal(f"{quote(shown)} is a symbolic link; archives carry only regular files and folders")
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                kind = {
                    stat.S_IFCHR: "a character device",
                    stat.S_IFBLK: "a block device",
                    stat.S_IFIFO: "a FIFO",
                    stat.S_IFSOCK: "a socket",
                }.get(stat.S_IFMT(info.st_mode), "not a regular file")
                raise _pack_refusal(f"{quote(shown)} is {kind}; archives carry only regular files and folders")
            if info.st_mode & 0o7000:
                raise _pack_refusal(
                    f"{quote(shown)} has a setuid, setgid or sticky bit (mode {info.st_mode & 0o7777:04o})"
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
    optional = ("min_version", "downtime", "requirements", "notes", "migrations", "hooks")
    draft = {
        "length": 1,
        "format": FORMAT,
        "product": spec["product"],
        "version": spec["version"],
        "channel": spec["channel"],
        **{name: spec[name] for name in optional if spec.get(name) is not None},
        "dirs": [entry.rel for entry in entries if entry.is_dir],
        "files": {
            e.rel: {"size": e.size, "sha256": "0" * 64, "mode": f"{e.mode:04o}"} for e in entries if not e.is_dir
        },
    }
    try:
        manifest = manifest_from_fields(draft, key_id=key.key_id, digest="")
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
            shutil.copyfileobj(payload, archive, CHUNK)
            archive.flush()
            os.fchmod(archive.fileno(), 0o644)
            os.fsync(archive.fileno())
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
