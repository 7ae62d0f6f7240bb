"""The vendor's commands: `dropgate keygen`, `dropgate pack`, `dropgate verify`.

They need no configuration file: a vendor's build machine is not a site.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.archive import Manifest, pack, parse_archive_name, verify_archive
from pipeline.errors import ArchiveRejected, ConfigError, KeyFileError, StepFailed
from pipeline.signing import generate_keypair, load_trusted_keys
from pipeline.terminal import printable

EXIT_OK, EXIT_NOT_OK, EXIT_USAGE = 0, 1, 2


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write PREFIX.key (0600) and PREFIX.pub; never replace a key without --force."""
    try:
        private_path, public_path = generate_keypair(Path(args.out), force=args.force)
    except (KeyFileError, OSError) as error:
        print(f"dropgate keygen: {error}", file=sys.stderr)
        return EXIT_NOT_OK
    key_id = Path(args.out).name
    print(f"key id {key_id}: private key {private_path} (keep it secret), public key {public_path}")
    print(f"sites trust it by listing {public_path.name} under trust.keys")
    return EXIT_OK


def cmd_pack(args: argparse.Namespace) -> int:
    """Build and sign <product>.<version>.tgz from DIR/manifest.yaml and DIR/release/ (the release tree)."""
    try:
        archive = pack(Path(args.dir), Path(args.key), Path(args.out))
    except (ArchiveRejected, KeyFileError) as error:
        print(f"dropgate pack: {error}", file=sys.stderr)
        return EXIT_NOT_OK
    size = archive.stat().st_size
    print(f"wrote {archive} ({size} bytes)")
    return EXIT_OK


def _summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "product": manifest.product,
        "version": manifest.version,
        "channel": manifest.channel,
        "min_version": manifest.min_version,
        "downtime": manifest.downtime,
        "key_id": manifest.key_id,
        "files": len(manifest.files),
        "unpacked_bytes": manifest.unpacked_bytes,
        "length": manifest.length,
        "migrations": list(manifest.migrations),
        "hooks": dict(manifest.hooks),
        "requirements": dict(manifest.requirements),
    }


def _requirements(manifest: Manifest) -> str:
    """What the manifest's requirements raise, as a site will read them (they were checked by the schema)."""
    if not manifest.requirements:
        return "no requirements beyond the site's"
    raised = ", ".join(f"{name} {value}" for name, value in sorted(manifest.requirements.items()))
    return f"requirements well-formed: {raised}"


def cmd_verify(args: argparse.Namespace) -> int:
    """Check an archive the way a site will, without writing anything; say exactly what is wrong."""
    path = Path(args.archive)
    try:
        keys = load_trusted_keys([Path(key) for key in args.key])
    except ConfigError as error:
        print(f"dropgate verify: {'; '.join(p.split(': ', 1)[1] for p in error.problems)}", file=sys.stderr)
        return EXIT_USAGE
    manifest: Manifest | None = None
    problem: str | None = None
    try:
        product, version = parse_archive_name(path.name)
        manifest = verify_archive(path, keys)
        if (product, version) != (manifest.product, manifest.version):
            problem = (
                f"the name {path.name} says {product} {version}, the signed manifest says "
                f"{manifest.product} {manifest.version}"
            )
    except StepFailed as error:  # ArchiveRejected, or a read error
        problem = str(error)
    if args.json:
        result = {"archive": str(path), "ok": problem is None, "error": problem}
        result["manifest"] = _summary(manifest) if manifest is not None else None
        print(json.dumps(result, indent=2))
    elif problem is not None:
        print(f"{printable(path.name)}: REJECTED: {printable(problem)}")
    else:
        assert manifest is not None
        print(
            f"{printable(path.name)}: OK: {manifest.product} {manifest.version} ({manifest.channel}), signed with key "
            f"{manifest.key_id}, {len(manifest.files)} files, {manifest.unpacked_bytes} bytes unpacked; "
            f"{_requirements(manifest)}"
        )
    return EXIT_OK if problem is None else EXIT_NOT_OK
