"""Fuzzing the public entry points: whatever manifest or signature arrives, the answer is one line.

manifest.sig is read before any signature check (anyone can send one), and a
vendor-key holder can sign any manifest.json. Hypothesis mutates both, by
structure (any JSON value at any key, nesting, huge and non-finite numbers,
wrong types) and by bytes (flips, inserts, cuts), and the only outcomes
allowed are an accepted manifest or an ArchiveRejected whose message is one
line without a Python bytes repr; never another exception.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.archive import authenticate, verify_archive
from pipeline.errors import ArchiveRejected
from pipeline.signing import SigningKey, TrustStore, generate_keypair, load_signing_key, load_trusted_keys
from tests.archive_helpers import Member, forge, manifest_fields, members_for, payload_member, signer

FILES = {"VERSION": b"3.19.274\n", "bin/app": b"#!/bin/sh\necho hi\n"}
MODES = {"bin/app": 0o755}
PAYLOAD = payload_member([Member("payload/bin", kind=b"5", mode=0o755), *members_for(FILES, MODES)])
BASE = manifest_fields(FILES, modes=MODES, dirs=["bin"], requirements={"min_cpus": 2}, hooks={}, migrations=[])

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["3.19.274", "3.19.274\n", "0644", "0644\n", "４", "payload", "../x", "a" * 300, "stable"]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)
KEY_PATHS = st.sampled_from(
    [
        ("length",),
        ("format",),
        ("product",),
        ("version",),
        ("channel",),
        ("min_version",),
        ("downtime",),
        ("requirements",),
        ("requirements", "min_cpus"),
        ("requirements", "free_bytes"),
        ("notes",),
        ("migrations",),
        ("hooks",),
        ("hooks", "pre_apply"),
        ("dirs",),
        ("files",),
        ("files", "VERSION"),
        ("files", "VERSION", "size"),
        ("files", "VERSION", "sha256"),
        ("files", "bin/app", "mode"),
        ("unknown",),
    ]
)

BYTES_REPR = re.compile(r"(?:^|[\s(\[{=:,])b['\"]")  # a Python bytes repr: b'...' or b"..."


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, TrustStore]:
    private, public = generate_keypair(tmp_path_factory.mktemp("keys") / "vendor-2026")
    return load_signing_key(private), load_trusted_keys([public])


def assert_one_line_or_accepted(archive: Path, keys: TrustStore) -> None:
    for entry_point in (authenticate, verify_archive):
        try:
            entry_point(archive, keys)
        except ArchiveRejected as rejection:
            message = str(rejection)
            assert message
            assert "\n" not in message and "\r" not in message
            assert not BYTES_REPR.search(message)
            return


def set_path(fields: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    changed = json.loads(json.dumps(fields))
    target = changed
    for key in path[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[path[-1]] = value
    return changed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=KEY_PATHS, value=JSON_VALUES, depth=st.one_of(st.none(), st.integers(1, 50_000)))
def test_any_value_at_any_key_of_a_signed_manifest(
    vendor: tuple[SigningKey, TrustStore], path: tuple[str, ...], value: Any, depth: int | None
) -> None:
    key, keys = vendor
    fields = set_path(BASE, path, "@value@")
    raw = nested(depth) if depth is not None else json.dumps(value)  # json.dumps writes NaN and Infinity as such

    def text(length: int) -> bytes:
        encoded = json.dumps({"length": length, **fields}, separators=(",", ":"))
        return encoded.replace('"@value@"', raw).encode()

    with tempfile.TemporaryDirectory() as scratch:
        archive = forge(Path(scratch) / "gts.3.19.274.tgz", text, PAYLOAD, signer(key))
        assert_one_line_or_accepted(archive, keys)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=0, max_size=8)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_damaged_bytes_of_a_signed_manifest(
    vendor: tuple[SigningKey, TrustStore], edits: list[tuple[int, bytes]], cut: int | None
) -> None:
    key, keys = vendor

    def text(length: int) -> bytes:
        data = bytearray(json.dumps({"length": length, **BASE}, separators=(",", ":")).encode())
        for offset, replacement in edits:
            at = offset % (len(data) + 1)
            data[at : at + len(replacement) // 2] = replacement
        return bytes(data[:cut] if cut is not None else data)

    with tempfile.TemporaryDirectory() as scratch:
        archive = forge(Path(scratch) / "gts.3.19.274.tgz", text, PAYLOAD, signer(key))
        assert_one_line_or_accepted(archive, keys)


SIGNATURES = st.one_of(
    st.binary(max_size=4096),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()[:4096]),
    st.integers(1, 4000).map(lambda depth: nested(depth).encode()[:4096]),
    st.dictionaries(st.sampled_from(["algorithm", "key_id", "signature", "x"]), JSON_VALUES, max_size=4).map(
        lambda value: json.dumps(value).encode()[:4096]
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(signature=SIGNATURES)
def test_any_manifest_sig_from_anyone(vendor: tuple[SigningKey, TrustStore], signature: bytes) -> None:
    key, keys = vendor
    with tempfile.TemporaryDirectory() as scratch:
        archive = forge(
            Path(scratch) / "gts.3.19.274.tgz", BASE, PAYLOAD, signer(key), signature_json=lambda _k, _r: signature
        )
        with pytest.raises(ArchiveRejected) as rejection:
            authenticate(archive, keys)
        assert "\n" not in str(rejection.value)
        assert not BYTES_REPR.search(str(rejection.value))
