"""Properties: any tree of ordinary files survives `pack` → authenticate → stage unchanged;
any damage to a payload is rejected cleanly (one line, nothing staged) or is harmless."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.archive import NAME_PUNCTUATION, authenticate, pack, path_problem, read_announced_length, stage_payload
from pipeline.config import Limits
from pipeline.errors import ArchiveRejected
from pipeline.signing import SigningKey, TrustStore, generate_keypair, load_signing_key, load_trusted_keys
from tests.archive_helpers import forge, manifest_fields, signer

NAME_CHARS = st.sampled_from("abcXYZ019" + NAME_PUNCTUATION + "éßÅ漢字ж")
NAMES = st.text(NAME_CHARS, min_size=1, max_size=12).filter(lambda name: path_problem(name) is None)
MODES = st.sampled_from([0o644, 0o600, 0o640, 0o755, 0o750, 0o700, 0o444, 0o400, 0o555])
PATHS = st.lists(NAMES, min_size=1, max_size=4).map("/".join)


@st.composite
def trees(draw: st.DrawFn) -> tuple[dict[str, tuple[bytes, int]], set[str]]:
    """Files (path → content, mode) and empty folders, with no path under a file."""
    files: dict[str, tuple[bytes, int]] = {}
    for path in draw(st.lists(PATHS, max_size=12, unique=True)):
        parts = path.split("/")
        ancestors = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if ancestors & set(files) or any(other.startswith(path + "/") for other in files):
            continue
        files[path] = (draw(st.binary(max_size=3000)), draw(MODES))
    folders: set[str] = set()
    for path in draw(st.lists(PATHS, max_size=3, unique=True)):
        parts = path.split("/")
        ancestors = {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if not ancestors & set(files):
            folders.add(path)
    return files, folders


def snapshot(root: Path) -> tuple[dict[str, tuple[bytes, int]], set[str]]:
    files: dict[str, tuple[bytes, int]] = {}
    folders: set[str] = set()
    for folder, dirs, names in os.walk(root):
        for name in dirs:
            folders.add(str((Path(folder) / name).relative_to(root)))
        for name in names:
            path = Path(folder) / name
            files[str(path.relative_to(root))] = (path.read_bytes(), stat.S_IMODE(path.lstat().st_mode))
    return files, folders


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrustStore]:
    private, public = generate_keypair(tmp_path_factory.mktemp("keys") / "vendor-2026")
    return private, load_trusted_keys([public])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees(), version=st.sampled_from(["3.19.274", "3.20.0-rc1", "10.0"]))
def test_pack_then_stage_round_trips_any_tree(
    vendor: tuple[Path, TrustStore], tree: tuple[dict[str, tuple[bytes, int]], set[str]], version: str
) -> None:
    private, keys = vendor
    files, folders = tree
    with tempfile.TemporaryDirectory() as scratch:
        # Given a release tree of ordinary files and folders
        source = Path(scratch) / "src"
        release = source / "release"
        release.mkdir(parents=True)
        for path in folders:
            (release / path).mkdir(parents=True, exist_ok=True)
        for path, (content, mode) in files.items():
            (release / path).parent.mkdir(parents=True, exist_ok=True)
            (release / path).write_bytes(content)
            (release / path).chmod(mode)
        (source / "manifest.yaml").write_text(yaml.safe_dump({"product": "gts", "version": version}))
        expected = snapshot(release)

        # When it is packed, authenticated and staged
        archive = pack(source, private, Path(scratch))
        manifest = authenticate(archive, keys)
        staged = Path(scratch) / "staged"
        stage_payload(archive, manifest, staged, Limits())

        # Then the staged tree is the same, byte for byte and mode for mode
        assert snapshot(staged) == expected
        assert read_announced_length(archive) == archive.stat().st_size == manifest.length
        assert set(manifest.files) == set(expected[0])


def _tar_stream(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"payload/{name}")
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


FUZZ_FILES = {"VERSION": b"3.19.274\n", "static/" + "é" * 60 + ".txt": b"x" * 700, "bin/app": b"#!/bin/sh\n" * 30}
FUZZ_TAR = _tar_stream(FUZZ_FILES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(FUZZ_TAR) - 1), st.binary(min_size=1, max_size=16)), min_size=1, max_size=4
    ),
    cut=st.one_of(st.none(), st.integers(0, len(FUZZ_TAR))),
)
def test_a_damaged_tar_stream_is_rejected_cleanly_or_changes_nothing(
    signing: tuple[SigningKey, TrustStore], edits: list[tuple[int, bytes]], cut: int | None
) -> None:
    # Given a correctly signed manifest and a payload whose tar stream was damaged anywhere
    key, keys = signing
    data = bytearray(FUZZ_TAR)
    for offset, replacement in edits:
        data[offset : offset + len(replacement)] = replacement
    damaged = bytes(data[:cut] if cut is not None else data)
    with tempfile.TemporaryDirectory() as scratch:
        archive = forge(
            Path(scratch) / "gts.3.19.274.tgz",
            manifest_fields(FUZZ_FILES, dirs=[]),
            gzip.compress(damaged),
            signer(key),
        )
        staged = Path(scratch) / "staged"

        # When it is staged, then it is either rejected with a reason, or staged exactly as signed
        try:
            stage_payload(archive, authenticate(archive, keys), staged, Limits())
        except ArchiveRejected as rejection:
            assert "\n" not in str(rejection)
            assert not staged.exists()
        else:
            assert snapshot(staged)[0] == {name: (content, 0o644) for name, content in FUZZ_FILES.items()}


@pytest.fixture(scope="module")
def signing(vendor: tuple[Path, TrustStore]) -> tuple[SigningKey, TrustStore]:
    private, keys = vendor
    return load_signing_key(private), keys


@settings(max_examples=300, deadline=None)
@given(junk=st.one_of(st.binary(max_size=2000), st.binary(max_size=2000).map(lambda b: b"\x1f\x8b" + b)))
def test_reading_the_announced_length_never_fails_on_junk(junk: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "gts.1.0.tgz"
        path.write_bytes(junk)
        assert read_announced_length(path) is None
