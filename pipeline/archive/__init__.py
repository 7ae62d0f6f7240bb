"""The update archive: format, pack, authenticate, stage (docs/archive-format.md).

    <product>.<version>.tgz = gzip member 1: tar entries manifest.json, manifest.sig
                            + gzip member 2: tar entries payload/..., end-of-archive

The receiver reads the head (the signed manifest and its signature), verifies
the signature, and only then streams the payload: each member is checked
against an allowlist (regular files and folders), the path rules, the limits
and the manifest, and written under the staging folder while it is hashed.

- `format`          the fixed names, sizes and markers;
- `names`           the path rules inside a release, the archive's file name;
- `manifest`        the signed manifest: model, exact schema, encoding;
- `jsonstream`      the strict, streaming JSON reader the manifest and signature are read with;
- `entries`         the manifest's files and folders in a compact table;
- `reader`          the bounded gzip/tar reader (`tarfile` only writes);
- `authentication`  the head, the signature, then the manifest;
- `staging`         the payload, checked and streamed into staging (or only hashed: `verify`);
- `packing`         the vendor side: `pack`.
"""

from __future__ import annotations

from pipeline.archive.authentication import authenticate, read_announced_length
from pipeline.archive.entries import FileEntry
from pipeline.archive.format import (
    ANNOUNCE_READ_BYTES,
    FORMAT,
    MANIFEST_NAME,
    MAX_EXTENDED_HEADER_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    PAYLOAD,
    RATIO_GRACE_BYTES,
    SIGNATURE_NAME,
)
from pipeline.archive.manifest import CHANNELS, HOOKS, REQUIREMENTS, Manifest, encode_manifest
from pipeline.archive.names import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    NAME_PUNCTUATION,
    PRODUCT,
    parse_archive_name,
    path_problem,
)
from pipeline.archive.packing import SOURCE_FOLDER, pack, seal_head, write_build_dir
from pipeline.archive.staging import Checkpoint, Progress, stage_payload, verify_archive
from pipeline.signing import generate_keypair, load_trusted_keys

__all__ = [
    "ANNOUNCE_READ_BYTES",
    "CHANNELS",
    "FORMAT",
    "HOOKS",
    "MANIFEST_NAME",
    "MAX_EXTENDED_HEADER_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "MAX_SIGNATURE_BYTES",
    "NAME_PUNCTUATION",
    "PAYLOAD",
    "PRODUCT",
    "RATIO_GRACE_BYTES",
    "REQUIREMENTS",
    "SIGNATURE_NAME",
    "SOURCE_FOLDER",
    "Checkpoint",
    "FileEntry",
    "Manifest",
    "Progress",
    "authenticate",
    "encode_manifest",
    "generate_keypair",
    "load_trusted_keys",
    "pack",
    "parse_archive_name",
    "path_problem",
    "read_announced_length",
    "seal_head",
    "stage_payload",
    "verify_archive",
    "write_build_dir",
]
