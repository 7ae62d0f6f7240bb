"""The feed format (docs/feed-format.md): signed, strict, fresh; built from archives' signed heads.

Hostile feeds are written by hand here (the envelope, the document, the
signature with the context the document names), so the tests also check that
the document is enough to write a feed a site accepts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.archive import authenticate
from pipeline.errors import ArchiveRejected, FeedRejected
from pipeline.feed import (
    FEED_SIGNATURE_CONTEXT,
    MAX_ENTRIES,
    MAX_FEED_BYTES,
    Feed,
    FeedEntry,
    build_feed,
    check_fresh,
    parse_feed,
    sign_feed,
)
from pipeline.signing import SIGNATURE_CONTEXT, SigningKey, TrustStore, generate_keypair, load_signing_key
from tests.archive_helpers import ArchiveSite, forge, manifest_fields, members_for, payload_member
from tests.conftest import ROOT

SHA = "ab" * 32


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    private, _ = generate_keypair(tmp_path_factory.mktemp("keys") / "vendor-2026")
    return load_signing_key(private)


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    private, _ = generate_keypair(tmp_path_factory.mktemp("keys") / "intruder")
    return load_signing_key(private)


def trust(*keys: SigningKey) -> TrustStore:
    return TrustStore({k.key_id: k.public for k in keys})


def entry(**overrides: Any) -> dict[str, Any]:
    fields = {
        "product": "gts", "version": "3.19.274", "channel": "stable", "url": "gts.3.19.274.tgz", "length": 1234,
        "sha256": SHA, "published": "2026-11-20T10:00:00Z", "notes": "Fixes the export.", "min_version": "3.19.0",
    }
    fields.update(overrides)
    return fields


def document(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "format": 1, "product": "gts", "sequence": 5, "published": "2026-11-29T00:00:00Z",
        "expires": "2026-12-06T00:00:00Z", "entries": [entry()],
    }
    fields.update(overrides)
    return fields


def signed(
    doc: dict[str, Any] | str, key: SigningKey, *, context: bytes = FEED_SIGNATURE_CONTEXT, **envelope: Any
) -> bytes:
    """A feed file around `doc` (a dict, or the exact document text), signed as the format says."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    signature = key.key.sign(context + text.encode("utf-8", "surrogatepass"))
    fields: dict[str, Any] = {
        "format": "dropgate-feed/1",
        "signed": text,
        "signatures": [{"key_id": key.key_id, "algorithm": "ed25519",
                        "signature": base64.b64encode(signature).decode()}],
    }
    fields.update(envelope)
    return json.dumps(fields).encode()


# -- a good feed ----------------------------------------------------------------------


def test_a_feed_signed_by_a_trusted_key_is_read_with_every_field(key: SigningKey) -> None:
    feed = parse_feed(signed(document(), key), trust(key))
    assert (feed.product, feed.sequence, feed.key_id) == ("gts", 5, "vendor-2026")
    assert feed.expires - feed.published == 7 * 86400
    (only,) = feed.entries
    assert only == FeedEntry("gts", "3.19.274", "stable", "gts.3.19.274.tgz", 1234, SHA,
                             1795168800.0, "Fixes the export.", "3.19.0")
    assert only.archive_name == "gts.3.19.274.tgz"
    assert feed.digest == hashlib.sha256(json.dumps(document()).encode()).hexdigest()


def test_notes_and_min_version_are_optional(key: SigningKey) -> None:
    bare = entry()
    del bare["notes"], bare["min_version"]
    (only,) = parse_feed(signed(document(entries=[bare]), key), trust(key)).entries
    assert (only.notes, only.min_version) == ("", None)


def test_a_feed_of_exactly_the_size_limit_is_read_and_one_byte_more_is_refused(key: SigningKey) -> None:
    data = signed(document(), key)
    padded = data + b" " * (MAX_FEED_BYTES - len(data))  # JSON allows trailing white space
    assert parse_feed(padded, trust(key)).sequence == 5
    with pytest.raises(FeedRejected, match=rf"{MAX_FEED_BYTES + 1} bytes, more than the limit of {MAX_FEED_BYTES}"):
        parse_feed(padded + b" ", trust(key))


@settings(max_examples=40, deadline=None)
@given(
    versions=st.lists(st.tuples(st.integers(0, 99), st.integers(0, 999)), min_size=0, max_size=8, unique=True),
    notes=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=200),
    length=st.integers(1, 2**44),
    sequence=st.integers(1, 2**53 - 1),
)
def test_what_sign_feed_writes_parse_feed_reads_back(
    key: SigningKey, versions: list[tuple[int, int]], notes: str, length: int, sequence: int
) -> None:
    entries = tuple(
        FeedEntry("gts", f"3.{a}.{b}", "stable" if b % 2 else "unstable", f"a/gts.3.{a}.{b}.tgz", length,
                  hashlib.sha256(bytes([a, b % 256])).hexdigest(), 1_700_000_000.0, notes, None)
        for a, b in versions
    )
    feed = Feed("gts", sequence, 1_700_000_000.0, 1_800_000_000.0, entries)
    read = parse_feed(sign_feed(feed, key), trust(key))
    assert read.entries == entries and read.sequence == sequence


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, 10**6), value=st.integers(0, 255))
def test_any_changed_byte_is_refused_in_one_line_or_changes_nothing_signed(
    key: SigningKey, position: int, value: int
) -> None:
    original = signed(document(), key)
    data = bytearray(original)
    data[position % len(data)] = value
    try:
        feed = parse_feed(bytes(data), trust(key))
    except FeedRejected as error:
        assert "\n" not in str(error)
        return
    assert feed == parse_feed(original, trust(key))  # only the envelope's white space or escapes changed


# -- signatures ----------------------------------------------------------------------------


def test_a_feed_signed_by_an_unknown_key_is_refused_naming_it(key: SigningKey, other_key: SigningKey) -> None:
    with pytest.raises(FeedRejected, match=r"signed with key 'intruder', which is not trusted here "
                                            r"\(trusted: vendor-2026\)"):
        parse_feed(signed(document(), other_key), trust(key))


def test_a_feed_changed_after_signing_is_refused(key: SigningKey) -> None:
    data = json.loads(signed(document(), key))
    data["signed"] = data["signed"].replace("1234", "9999")
    with pytest.raises(FeedRejected, match="does not verify with the trusted key 'vendor-2026'"):
        parse_feed(json.dumps(data).encode(), trust(key))


def test_a_feed_signed_with_the_archive_context_is_refused(key: SigningKey) -> None:
    # Given a document signed by the trusted key, but as an archive manifest is signed
    data = signed(document(), key, context=SIGNATURE_CONTEXT)
    # Then it is not a feed signature
    with pytest.raises(FeedRejected, match=r"does not verify .*not a feed signature"):
        parse_feed(data, trust(key))


def test_an_archive_manifest_and_its_signature_do_not_pass_for_a_feed(tmp_path: Path) -> None:
    # Given a real archive's signed manifest and the vendor's signature over it
    site = ArchiveSite(tmp_path)
    archive = site.pack("3.19.274")
    manifest = authenticate(archive, trust(site.key))
    manifest_json = json.dumps({"length": manifest.length, **{k: v for k, v in manifest.to_fields().items()
                                                               if k != "length"}}, separators=(",", ":"))
    raw = site.key.sign(manifest_json.encode())
    # When they are put in a feed envelope
    data = json.dumps({"format": "dropgate-feed/1", "signed": manifest_json, "signatures": [
        {"key_id": site.key.key_id, "algorithm": "ed25519", "signature": base64.b64encode(raw).decode()}]})
    # Then the signature does not verify as a feed's
    with pytest.raises(FeedRejected, match="does not verify with the trusted key"):
        parse_feed(data.encode(), trust(site.key))


def test_a_feed_signature_does_not_pass_for_an_archive_manifest(tmp_path: Path) -> None:
    # Given an archive whose manifest is signed with the vendor's key, but as a feed is signed
    site = ArchiveSite(tmp_path)
    files = {"VERSION": b"3.19.274\n"}
    out = forge(tmp_path / "gts.3.19.274.tgz", manifest_fields(files), payload_member(members_for(files)),
                lambda manifest: (site.key.key_id, site.key.key.sign(FEED_SIGNATURE_CONTEXT + manifest)))
    # Then the archive is not authenticated
    with pytest.raises(ArchiveRejected, match="the signature does not verify with the trusted key"):
        authenticate(out, trust(site.key))


def test_a_second_signature_by_a_trusted_key_is_enough_during_a_key_rotation(
    key: SigningKey, other_key: SigningKey
) -> None:
    text = json.dumps(document())
    first = json.loads(signed(text, other_key))["signatures"][0]
    second = json.loads(signed(text, key))["signatures"][0]
    data = signed(text, key, signatures=[first, second])
    assert parse_feed(data, trust(key)).key_id == "vendor-2026"


# -- hostile documents (each signed, so that the schema is what refuses them) ----------------------


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"entries": [entry(length=12.5)]}, "has a fraction or an exponent; only integers are allowed"),
        ({"entries": [entry(length=1e3)]}, "has a fraction or an exponent"),
        ({"entries": [entry(length=True)]}, "entries[0].length: expected an integer, found True"),
        ({"entries": [entry(length="1234")]}, "entries[0].length: expected an integer, found '1234'"),
        ({"entries": [entry(length=0)]}, "entries[0].length: 0 is outside 1.."),
        ({"entries": [entry(length=2**44 + 1)]}, "entries[0].length: 17592186044417 is outside"),
        ({"entries": [entry(length=10**25)]}, "an integer of more than 20 digits"),
        ({"sequence": 0}, "sequence: 0 is outside 1.."),
        ({"sequence": -1}, "sequence: -1 is outside"),
        ({"entries": [entry(sha256="AB" * 32)]}, "entries[0].sha256: 'ABAB"),
        ({"entries": [entry(sha256="ab" * 31)]}, "entries[0].sha256:"),
        ({"entries": [entry(version="3.19\n")]}, "entries[0].version: '3.19\\n' is not valid"),
        ({"entries": [entry(version="../../etc")]}, "entries[0].version: '../../etc' is not valid"),
        ({"entries": [entry(version="")]}, "entries[0].version: '' is not valid"),
        ({"entries": [entry(min_version="latest")]}, "entries[0].min_version: 'latest' is not valid"),
        ({"entries": [entry(url="http://vendor.example/a.tgz")]}, "only https:// URLs or paths relative"),
        ({"entries": [entry(url="file:///etc/shadow")]}, "only https:// URLs or paths relative"),
        ({"entries": [entry(url="javascript:alert(1)")]}, "only https:// URLs or paths relative"),
        ({"entries": [entry(url="//evil.example/a.tgz")]}, "a relative URL must be a path"),
        ({"entries": [entry(url="https:///a.tgz")]}, "only https:// URLs or paths relative"),
        ({"entries": [entry(url="a b.tgz")]}, "is not a URL (ASCII, no spaces or control characters)"),
        ({"entries": [entry(url="gts.3.19.274.tgz\r\nHost: x")]}, "is not a URL"),
        ({"entries": [entry(url="ärchiv.tgz")]}, "is not a URL"),
        ({"entries": [entry(url="a/" * 1025)]}, "entries[0].url: longer than 2048 characters"),
        ({"entries": [entry(product="other")]}, "entries[0] claims product 'other' in a feed for 'gts'"),
        ({"product": "GTS", "entries": []}, "product: 'GTS' is not valid"),
        ({"entries": [entry(channel="beta")]}, "entries[0].channel: 'beta' is not one of stable, unstable"),
        ({"entries": [entry(notes="ok\x1b[2J")]}, "entries[0].notes: the control character '\\x1b' is not allowed"),
        ({"entries": [entry(notes="x" * 65537)]}, "entries[0].notes: longer than 65536 characters"),
        ({"entries": [entry(notes=[[["deep"]]])]}, "nested deeper than 4 levels"),
        ({"entries": [entry(published="2026-13-01T00:00:00Z")]}, "month must be in 1..12"),
        ({"entries": [entry(published="2026-11-29 12:00:00")]}, "is not a time like 2026-11-29T12:00:00Z"),
        ({"entries": [entry(published="2026-11-29T12:00:00z")]}, "is not a time like"),
        ({"entries": [entry(published="2026-11-29T12:00:00+01:00")]}, "published: longer than 20 characters"),
        ({"expires": "2026-11-28T00:00:00Z"}, "it expires (2026-11-28T00:00:00Z) before it was published"),
        ({"expires": "2026-11-29T00:00:00Z"}, "before it was published"),
        ({"format": 2}, "format 2: this dropgate reads format 1"),
        ({"format": True}, "format True: this dropgate reads format 1"),
        ({"entries": {"a": 1}}, "entries: expected a list"),
        ({"entries": [entry(), entry(url="again.tgz")]}, "entries[1]: version 3.19.274 is listed twice"),
        ({"entries": [entry(), entry(version="3.19.274.0")]}, "version 3.19.274.0 is listed twice"),
        ({"entries": ["gts.3.19.274.tgz"]}, "entries[0]: expected an object, found str"),
        ({"entries": [entry(size=5)]}, "entries[0]: unknown key 'size'"),
        ({"signature": "x"}, "the signed document: unknown key 'signature'"),
    ],
)
def test_a_signed_document_that_breaks_the_schema_is_refused_in_one_line(
    key: SigningKey, change: dict[str, Any], problem: str
) -> None:
    with pytest.raises(FeedRejected) as caught:
        parse_feed(signed(document(**change), key), trust(key))
    message = str(caught.value)
    assert message.startswith("the feed is refused: ") and problem in message, message
    assert "\n" not in message


@pytest.mark.parametrize("missing", ["format", "product", "sequence", "published", "expires", "entries"])
def test_every_document_key_is_required(key: SigningKey, missing: str) -> None:
    doc = document()
    del doc[missing]
    with pytest.raises(FeedRejected, match=f"the key '{missing}' is missing"):
        parse_feed(signed(doc, key), trust(key))


@pytest.mark.parametrize("missing", ["product", "version", "channel", "url", "length", "sha256", "published"])
def test_every_entry_key_but_notes_and_min_version_is_required(key: SigningKey, missing: str) -> None:
    bad = entry()
    del bad[missing]
    with pytest.raises(FeedRejected, match=rf"entries\[0\]: the key '{missing}' is missing"):
        parse_feed(signed(document(entries=[bad]), key), trust(key))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"format": 1, "format": 1}', "the key 'format' appears twice"),
        ('{"format": NaN}', "NaN is not a finite number"),
        ('{"format": Infinity}', "Infinity is not a finite number"),
        ('{"format": 1', "is not valid JSON"),
    ],
)
def test_document_text_that_is_not_strict_json_is_refused(key: SigningKey, text: str, problem: str) -> None:
    with pytest.raises(FeedRejected, match=problem):
        parse_feed(signed(text, key), trust(key))


def test_exactly_the_entry_limit_is_read_and_one_more_is_refused(key: SigningKey) -> None:
    many = [entry(version=f"1.{i}", url=f"{i}.tgz", notes="") for i in range(MAX_ENTRIES)]
    assert len(parse_feed(signed(document(entries=many), key), trust(key)).entries) == MAX_ENTRIES
    many.append(entry(version="2.0", notes=""))
    with pytest.raises(FeedRejected, match=f"{MAX_ENTRIES + 1} entries, more than the limit of {MAX_ENTRIES}"):
        parse_feed(signed(document(entries=many), key), trust(key))


# -- hostile envelopes (nothing of the document is read before its signature verifies) ----------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "the envelope is not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8 text (byte 0)"),
        (b"<html>503</html>", "the envelope is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b'{"format": "dropgate-feed/1", "signed": "{}", "signatures": [], "x": 1}', "unknown key 'x'"),
        (b'{"format": "dropgate-feed/2", "signed": "{}", "signatures": []}', "format 'dropgate-feed/2'"),
        (b'{"format": "dropgate-feed/1", "signed": "{}", "signatures": []}', "a list of 1 to 8 signatures"),
        (b'{"format": "dropgate-feed/1", "signed": 5, "signatures": []}', "signed: expected a string"),
        (b'{"format": "dropgate-feed/1", "signed": "\\ud800", "signatures": [{}]}', "a lone surrogate"),
        (b'{"length": 10, "format": 1, "product": "gts"}', "unknown key 'length'"),
    ],
)
def test_an_envelope_that_is_not_a_feed_is_refused(key: SigningKey, data: bytes, problem: str) -> None:
    with pytest.raises(FeedRejected, match=re.escape(problem)):
        parse_feed(data, trust(key))


@pytest.mark.parametrize(
    ("signature", "problem"),
    [
        ({"key_id": "vendor-2026", "algorithm": "rsa", "signature": "AA=="}, "algorithm: 'rsa', expected 'ed25519'"),
        ({"key_id": "vendor-2026", "algorithm": "ed25519", "signature": "!!"}, "signature is not base64"),
        ({"key_id": "vendor-2026", "algorithm": "ed25519", "signature": "AAAA"}, "3 bytes, an Ed25519 signature"),
        ({"key_id": "../k", "algorithm": "ed25519", "signature": "AAAA"}, "key_id: '../k' is not valid"),
        ({"key_id": "vendor-2026", "algorithm": "ed25519"}, "the key 'signature' is missing"),
    ],
)
def test_a_malformed_signature_is_refused(key: SigningKey, signature: dict[str, Any], problem: str) -> None:
    with pytest.raises(FeedRejected, match=problem):
        parse_feed(signed(document(), key, signatures=[signature]), trust(key))


def test_more_than_eight_signatures_are_refused(key: SigningKey) -> None:
    one = json.loads(signed(document(), key))["signatures"][0]
    with pytest.raises(FeedRejected, match="a list of 1 to 8 signatures"):
        parse_feed(signed(document(), key, signatures=[one] * 9), trust(key))


def test_no_trusted_key_at_all_refuses_every_feed(key: SigningKey) -> None:
    with pytest.raises(FeedRejected, match=r"no trusted keys are configured \(trust.keys is empty\)"):
        parse_feed(signed(document(), key), TrustStore({}))


# -- freshness: freeze and replay ---------------------------------------------------------------------


def test_a_feed_is_used_until_its_expiry_and_refused_from_then_on(key: SigningKey) -> None:
    feed = parse_feed(signed(document(), key), trust(key))
    check_fresh(feed, now=feed.expires - 1, seen=None)
    with pytest.raises(FeedRejected, match=r"it expired at 2026-12-06T00:00:00Z \(now 2026-12-06T00:00:00Z\)"):
        check_fresh(feed, now=feed.expires, seen=None)


def test_an_older_sequence_than_the_newest_seen_is_refused_as_a_replay(key: SigningKey) -> None:
    feed = parse_feed(signed(document(sequence=5), key), trust(key))
    now = feed.published
    check_fresh(feed, now=now, seen=(4, "x"))
    check_fresh(feed, now=now, seen=(5, feed.digest))  # the same feed again, next night
    with pytest.raises(FeedRejected, match="its sequence 5 is older than sequence 6 already seen here"):
        check_fresh(feed, now=now, seen=(6, "y"))
    with pytest.raises(FeedRejected, match="sequence 5 was already seen here with different contents"):
        check_fresh(feed, now=now, seen=(5, "another digest"))


# -- the vendor's side: build and verify ---------------------------------------------------------------


def test_build_reads_every_archive_from_its_signed_head(tmp_path: Path) -> None:
    site = ArchiveSite(tmp_path)
    dist = tmp_path / "dist"
    dist.mkdir()
    for version, manifest in (("3.19.274", {"notes": "Patch.", "min_version": "3.19.0"}),
                              ("3.20.0", {"channel": "unstable", "notes": "Preview."}),
                              ("3.9.1", {})):
        shutil.copy(site.pack(version, **manifest), dist)
    (dist / "README.txt").write_text("not an archive, not listed")
    data = build_feed(dist, site.private_key, "https://updates.example/gts/", sequence=42, now=lambda: 1.8e9)
    feed = parse_feed(data, trust(site.key))
    assert [e.version for e in feed.entries] == ["3.9.1", "3.19.274", "3.20.0"]  # compared as versions
    by_version = {e.version: e for e in feed.entries}
    patch = by_version["3.19.274"]
    archive = dist / "gts.3.19.274.tgz"
    assert patch.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert patch.length == archive.stat().st_size
    assert patch.url == "https://updates.example/gts/gts.3.19.274.tgz"
    assert (patch.notes, patch.min_version, patch.channel) == ("Patch.", "3.19.0", "stable")
    assert by_version["3.20.0"].channel == "unstable"
    assert (feed.sequence, feed.published, feed.expires) == (42, 1.8e9, 1.8e9 + 7 * 86400)


def test_build_never_trusts_a_file_name(tmp_path: Path) -> None:
    site = ArchiveSite(tmp_path)
    dist = tmp_path / "dist"
    dist.mkdir()
    shutil.copy(site.pack("3.19.274"), dist / "gts.3.20.0.tgz")
    with pytest.raises(FeedRejected, match=r"the name says gts 3.20.0, the signed manifest gts 3.19.274"):
        build_feed(dist, site.private_key, "https://updates.example/")


def test_build_refuses_an_archive_the_key_did_not_sign(tmp_path: Path) -> None:
    site = ArchiveSite(tmp_path)
    dist = tmp_path / "dist"
    dist.mkdir()
    shutil.copy(site.pack("3.19.274"), dist)
    other, _ = generate_keypair(tmp_path / "keys" / "other")
    with pytest.raises(FeedRejected, match=r"gts.3.19.274.tgz: the manifest is signed with key 'vendor-2026', "
                                            r"which is not trusted here"):
        build_feed(dist, other, "https://updates.example/")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_feed_build_and_verify_on_the_command_line(tmp_path: Path) -> None:
    site = ArchiveSite(tmp_path)
    dist = tmp_path / "dist"
    dist.mkdir()
    shutil.copy(site.pack("3.19.274", notes="Patch."), dist)
    out = tmp_path / "feed.json"
    # When the vendor builds the feed
    built = cli("feed", "build", str(dist), "--key", str(site.private_key), "--base-url",
                "https://updates.example/gts", "-o", str(out), "--sequence", "7")
    assert built.returncode == 0, built.stderr
    assert f"wrote {out}: gts, 1 archives, sequence 7, expires " in built.stdout
    # Then verify says it is good and lists the archive
    verified = cli("feed", "verify", str(out), "--key", str(site.public_key))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "feed.json: OK: gts, sequence 7, signed with key vendor-2026" in verified.stdout
    assert "3.19.274" in verified.stdout and "https://updates.example/gts/gts.3.19.274.tgz" in verified.stdout
    as_json = json.loads(cli("feed", "verify", str(out), "--key", str(site.public_key), "--json").stdout)
    assert as_json["ok"] and as_json["document"]["entries"][0]["notes"] == "Patch."
    # and a site that trusts another key would refuse it
    other = generate_keypair(tmp_path / "keys" / "other")[1]
    refused = cli("feed", "verify", str(out), "--key", str(other))
    assert refused.returncode == 1
    assert "REJECTED: the feed is refused: signed with key 'vendor-2026', which is not trusted here" in refused.stdout


def test_feed_verify_says_when_a_feed_has_expired(tmp_path: Path, key: SigningKey) -> None:
    stale = tmp_path / "feed.json"
    stale.write_bytes(signed(document(published="2025-01-01T00:00:00Z", expires="2025-01-08T00:00:00Z"), key))
    public = tmp_path / "vendor.pub"
    from pipeline.signing import public_key_line

    public.write_text(public_key_line(key.key_id, key.public))
    result = cli("feed", "verify", str(stale), "--key", str(public))
    assert result.returncode == 1
    assert "REJECTED: the feed is refused: it expired at 2025-01-08T00:00:00Z" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["feed", "build", "nowhere", "--key", "k", "--base-url", "https://x/", "-o", "f"], 1, "k"),
        (["feed", "build", ".", "--key", "k", "--base-url", "https://x/", "-o", "f", "--expires", "soon"], 2,
         "--expires: expected a duration"),
        (["feed", "verify", "nothing.json", "--key", "nothing.pub"], 2, "cannot read public key nothing.pub"),
    ],
)
def test_feed_commands_say_what_is_wrong_in_one_line(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
