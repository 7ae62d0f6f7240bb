"""Property: any tree of ordinary files survives `pack` → authenticate → stage unchanged."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.archive import NAME_PUNCTUATION, authenticate, pack, path_problem, read_announced_length, stage_payload
from pipeline.config import Limits
from pipeline.signing import TrustStore, generate_keypair, load_trusted_keys

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
