"""Building update archives in tests: well-formed ones with the real `pack`, hostile ones by hand.

The forger below writes the format from docs/archive-format.md on its own
(tar headers from `tarfile`, the head's length fixed point, the signature
context), so the tests also check that the document is enough to build an
archive dropgate accepts.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.archive import pack
from pipeline.config import Config, parse_config
from pipeline.context import StepContext
from pipeline.signing import SIGNATURE_CONTEXT, SigningKey, generate_keypair, load_signing_key
from tests.support import RecordingReporter

INSTALLED = "3.19.273"


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Everything under `root`: relative path → (kind, size), symlinks not followed."""
    found: dict[str, tuple[str, int]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            found[str(path.relative_to(root))] = (kind, 0 if kind == "dir" else info.st_size)
    return found


class ArchiveSite:
    """A platform with release 3.19.273 live, a trusted vendor key, and a spool for archives."""

    def __init__(self, root: Path, **config: Any) -> None:
        self.root = root
        self.platform = root / "platform"
        self.keys = root / "keys"
        self.spool = root / "state" / "spool" / "1"
        self.build = root / "build"
        for folder in (self.keys, self.spool, self.build, root / "inbox"):
            folder.mkdir(parents=True, exist_ok=True)
        release = self.platform / "releases" / INSTALLED
        release.mkdir(parents=True)
        (release / "VERSION").write_text(INSTALLED + "\n")
        os.symlink(f"releases/{INSTALLED}", self.platform / "current")
        self.private_key, self.public_key = generate_keypair(self.keys / "vendor-2026")
        self.key = load_signing_key(self.private_key)
        self.raw_config: dict[str, Any] = {
            "paths": {"inbox": "inbox", "state": "state", "backups": "backups"},
            "platform": {"product": "gts", "root": "platform"},
            "trust": {"keys": ["keys/vendor-2026.pub"]},
        }
        self.raw_config.update(config)
        self.reporter = RecordingReporter()

    @property
    def config(self) -> Config:
        return parse_config(json.loads(json.dumps(self.raw_config)), base=self.root)

    def context(self, archive: Path, *, run_id: int = 1, name: str | None = None) -> StepContext:
        """The validate step's context for `archive`, placed in the run's spool folder."""
        spooled = self.spool / (name or archive.name)
        if archive != spooled:
            spooled.write_bytes(archive.read_bytes())
        return StepContext(
            run_id=run_id,
            step="validate",
            archive=spooled,
            archive_name=spooled.name,
            sha256=hashlib.sha256(spooled.read_bytes()).hexdigest(),
            config=self.config,
            facts={},
            reporter=self.reporter,
        )

    def pack(
        self,
        version: str,
        files: dict[str, bytes] | None = None,
        *,
        modes: dict[str, int] | None = None,
        dirs: Iterable[str] = (),
        **manifest: Any,
    ) -> Path:
        """A well-formed archive built with the real `pack`."""
        source = self.build / f"src-{version}"
        payload = source / "release"
        payload.mkdir(parents=True)
        for name, content in (files if files is not None else {"VERSION": f"{version}\n".encode()}).items():
            path = payload / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod((modes or {}).get(name, 0o644))
        for name in dirs:
            (payload / name).mkdir(parents=True, exist_ok=True)
        body = {"product": "gts", "version": version, **manifest}
        (source / "manifest.yaml").write_text(yaml.safe_dump(body))
        return pack(source, self.private_key, self.build)


# -- the forger ----------------------------------------------------------------


@dataclass
class Member:
    """A tar member to forge: any type, mode, name (str, or bytes for non-UTF-8)."""

    name: str | bytes
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    mode: int = 0o644
    link: str = ""
    mtime: int = 1_700_000_000


def payload_member(members: Sequence[Member], *, fmt: int = tarfile.PAX_FORMAT, tail: bytes = b"") -> bytes:
    """The payload gzip member: these tar entries, the end-of-archive marker, then `tail` (inside the gzip)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for member in members:
            name = member.name.decode("utf-8", "surrogateescape") if isinstance(member.name, bytes) else member.name
            info = tarfile.TarInfo(name)
            info.type = member.kind
            info.mode = member.mode
            info.mtime = member.mtime
            info.linkname = member.link
            if member.kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
            else:
                tar.addfile(info)
    return gzip.compress(buffer.getvalue() + tail, compresslevel=6, mtime=0)


def manifest_fields(
    files: dict[str, bytes] | None = None,
    *,
    version: str = "3.19.274",
    modes: dict[str, int] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """manifest.json's object (without `length`) describing `files` truthfully."""
    files = files if files is not None else {"VERSION": b"3.19.274\n"}
    fields: dict[str, Any] = {
        "format": 1,
        "product": "gts",
        "version": version,
        "channel": "stable",
        "min_version": None,
        "downtime": None,
        "requirements": {},
        "notes": "",
        "migrations": [],
        "hooks": {},
        "dirs": [],
        "files": {
            path: {
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "mode": f"{(modes or {}).get(path, 0o644):04o}",
            }
            for path, data in files.items()
        },
    }
    fields.update(overrides)
    return fields


def members_for(files: dict[str, bytes], modes: dict[str, int] | None = None) -> list[Member]:
    return [Member(f"payload/{path}", data, mode=(modes or {}).get(path, 0o644)) for path, data in files.items()]


def _head(manifest: bytes, signature: bytes, level: int = 0) -> bytes:
    return gzip.compress(head_blocks(manifest, signature), compresslevel=level, mtime=0)


Signer = Callable[[bytes], tuple[str, bytes]]


def signer(key: SigningKey) -> Signer:
    """Sign as the format says: Ed25519 over the context prefix and manifest.json."""
    return lambda manifest: (key.key_id, key.key.sign(SIGNATURE_CONTEXT + manifest))


ManifestText = Callable[[int], bytes]


def forge(
    out: Path,
    fields: dict[str, Any] | ManifestText,
    payload: bytes,
    sign: Signer,
    *,
    signature_json: Callable[[str, bytes], bytes] | None = None,
    extra: bytes = b"",
    head_level: int = 0,
    head: Callable[[bytes, bytes], bytes] | None = None,
) -> Path:
    """Write an archive from manifest `fields`, a payload member and a signer; `length` is found as a fixed point.

    `fields` is the manifest object without `length`, or a function of the length
    returning manifest.json's exact bytes (for text no JSON encoder would write).
    The head is compressed at `head_level`, or built by `head(manifest, signature)`;
    at levels above 0 the length may not settle (its digits change the compressed
    size): then the last try is written and `authenticate` rejects it for its length.
    """
    length = len(payload)
    for _ in range(10):
        total = length + len(extra)
        if callable(fields):
            manifest = fields(total)
        else:
            manifest = json.dumps({"length": total, **fields}, separators=(",", ":")).encode()
        key_id, raw = sign(manifest)
        if signature_json is None:
            signature = json.dumps(
                {"algorithm": "ed25519", "key_id": key_id, "signature": base64.b64encode(raw).decode()}
            ).encode()
        else:
            signature = signature_json(key_id, raw)
        built = head(manifest, signature) if head is not None else _head(manifest, signature, head_level)
        if len(built) + len(payload) == length:
            break
        length = len(built) + len(payload)
    out.write_bytes(built + payload + extra)
    return out


def head_blocks(manifest: bytes, signature: bytes) -> bytes:
    """The head's tar entries (manifest.json, manifest.sig), uncompressed."""
    blocks = b""
    for name, data in (("manifest.json", manifest), ("manifest.sig", signature)):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        blocks += info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + data + bytes(-len(data) % 512)
    return blocks
