"""Real releases: trees of 10,000-50,000 files, signed with many keys, read to the end every time.

Where the head's gzip member ends depends on the signature's bytes; a release
that verified with one key could hang with another. Here one release of
12,000 small files (a manifest of about 1.3 MB, as in the field report) is
signed with eight keys, and each archive goes through `dropgate verify` (the
real CLI, with a deadline), through validate, and once through the daemon.
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pipeline.archive import authenticate, pack, seal_head
from pipeline.signing import generate_keypair, load_signing_key, load_trusted_keys
from states import validate
from tests.archive_helpers import ArchiveSite
from tests.conftest import ROOT, Site


def write_tree(root: Path, files: int) -> None:
    """`files` small files of varied sizes in 200 folders, as a web application's assets are."""
    for index in range(files):
        folder = root / f"static/module{index % 200:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"component-{index:06d}.js").write_bytes(b"export const value = %d;\n" % index * (index % 9 + 1))


def pack_tree(build: Path, key: Path, files: int, version: str) -> Path:
    source = build / f"src-{version}"
    write_tree(source / "release", files)
    (source / "release" / "VERSION").write_text(version + "\n")
    (source / "manifest.yaml").write_text(f'product: gts\nversion: "{version}"\n')
    return pack(source, key, build)


def resigned(archive: Path, private: Path, out: Path) -> Path:
    """The same release and payload bytes under a head signed with another key (what a vendor's rotation does)."""
    data = archive.read_bytes()
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    decompressor.decompress(data)
    payload = decompressor.unused_data
    manifest = authenticate(archive, load_trusted_keys([archive.parent / "keys" / "vendor-0.pub"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(seal_head(manifest.to_fields(), len(payload), load_signing_key(private)) + payload)
    return out


@pytest.fixture(scope="module")
def twelve_thousand(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """(archive, public key) for one 12,000-file release signed with eight keys."""
    build = tmp_path_factory.mktemp("release")
    (build / "keys").mkdir()
    pairs = [generate_keypair(build / "keys" / f"vendor-{index}") for index in range(8)]
    first = pack_tree(build, pairs[0][0], 12_000, "3.19.274")
    signed = [(first, pairs[0][1])]
    for index, (private, public) in enumerate(pairs[1:], start=1):
        signed.append((resigned(first, private, build / f"key{index}" / first.name), public))
    return signed


def test_every_signature_of_a_12000_file_release_verifies_with_dropgate_verify(
    twelve_thousand: list[tuple[Path, Path]],
) -> None:
    for archive, public in twelve_thousand:
        # When the vendor's verify runs on the archive signed with this key (a hang would hit the deadline)
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "verify", str(archive), "--key", str(public)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
            check=False,
        )

        # Then it is OK, naming the key and the 12,001 files
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"signed with key {public.stem}, 12001 files" in result.stdout
    assert len(twelve_thousand) == 8


def test_every_signature_of_a_12000_file_release_validates(
    twelve_thousand: list[tuple[Path, Path]], tmp_path: Path
) -> None:
    for index, (archive, public) in enumerate(twelve_thousand):
        site = ArchiveSite(tmp_path / f"site{index}", trust={"keys": [str(public)]})
        ctx = site.context(archive)

        validate.run(ctx)

        staged = site.platform / ".staging" / "1"
        assert (staged / "static/module007/component-000007.js").read_bytes() == b"export const value = 7;\n" * 8
        assert ctx.facts["manifest"]["file_count"] == 12_001


def test_a_release_of_50000_files_validates_and_is_staged_whole(tmp_path: Path) -> None:
    # Given a release of 50,000 files in 200 folders, packed and signed
    site = ArchiveSite(tmp_path)
    archive = pack_tree(site.build, site.private_key, 50_000, "3.19.274")

    # When it is validated
    ctx = site.context(archive)
    validate.run(ctx)

    # Then every file is staged
    staged = site.platform / ".staging" / "1"
    assert sum(1 for _ in (staged / "static").rglob("*.js")) == 50_000
    assert ctx.facts["manifest"]["file_count"] == 50_001


def test_the_daemon_installs_a_10000_file_release(site: Site, twelve_thousand: list[tuple[Path, Path]]) -> None:
    # Given a daemon trusting the eighth key, and a 10,000-file release signed with it
    private = twelve_thousand[7][1].with_suffix(".key")
    site.write_config(trust={"keys": [str(twelve_thousand[7][1])]}, policy={"timeouts": {"validate": "10m"}})
    archive = pack_tree(site.root / "build", private, 10_000, "2.0.0")
    site.start_daemon()

    # When it is dropped into the inbox
    site.drop(archive)

    # Then it is installed
    run = site.wait_outcome(1, timeout=600)
    assert run["outcome"] == "succeeded", run["error"]
    assert (site.platform / "current").resolve().name == "2.0.0"
    assert (site.platform / "releases/2.0.0/static/module001/component-000001.js").exists()
