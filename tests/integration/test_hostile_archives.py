"""A corpus of hostile and broken archives, each rejected by the validate step with its own reason.

Given a platform with 3.19.273 live and a trusted vendor key, when the
validate step meets one of these archives, then it raises ArchiveRejected
(the runner's "rejected" outcome: the daemon goes on) with a one-line message
naming the member, the rule, and what was expected and found; nothing is
written outside the run's staging folder, which is gone afterwards, and no
release folder appears.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.errors import ArchiveRejected
from pipeline.signing import SigningKey, load_signing_key
from states import validate
from tests.archive_helpers import (
    INSTALLED,
    ArchiveSite,
    Member,
    forge,
    manifest_fields,
    members_for,
    payload_member,
    signer,
    tree,
)
from tests.conftest import Site

GOOD = {"VERSION": b"3.19.274\n", "bin/app": b"#!/bin/sh\necho hi\n"}
MODES = {"bin/app": 0o755}
NAME = "gts.3.19.274.tgz"
EVIL_ABSOLUTE = Path(f"/tmp/dropgate-evil-{uuid.uuid4().hex}")


def fields(**overrides: Any) -> dict[str, Any]:
    return manifest_fields(GOOD, modes=MODES, dirs=["bin"], **overrides)


def members(*extra: Member, skip: str = "") -> list[Member]:
    listed = [Member("payload/bin", kind=tarfile.DIRTYPE, mode=0o755), *members_for(GOOD, MODES)]
    return [m for m in listed if m.name != skip] + list(extra)


def forged(
    site: ArchiveSite,
    payload: list[Member] | bytes,
    manifest: dict[str, Any] | None = None,
    *,
    name: str = NAME,
    key: SigningKey | None = None,
    **options: Any,
) -> Path:
    body = payload if isinstance(payload, bytes) else payload_member(payload)
    return forge(site.build / name, manifest or fields(), body, signer(key or site.key), **options)


def intruder(key_id: str) -> SigningKey:
    return SigningKey(key_id, Ed25519PrivateKey.generate())


def payload_offset(data: bytes | bytearray) -> int:
    """Where the payload's gzip member starts: right after the head member."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    decompressor.decompress(data)
    return len(data) - len(decompressor.unused_data)


def rewrite(path: Path, change: Callable[[bytearray], None]) -> Path:
    data = bytearray(path.read_bytes())
    change(data)
    path.write_bytes(bytes(data))
    return path


# -- the archives ----------------------------------------------------------------


def empty(site: ArchiveSite) -> Path:
    path = site.build / NAME
    path.write_bytes(b"")
    return path


def text_file(site: ArchiveSite) -> Path:
    path = site.build / NAME
    path.write_text("#!/bin/sh\nrm -rf /\n")
    return path


def zip_file(site: ArchiveSite) -> Path:
    path = site.build / NAME
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("VERSION", "3.19.274\n")
    return path


def plain_tar(site: ArchiveSite) -> Path:
    path = site.build / NAME
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("VERSION")
        info.size = 9
        archive.addfile(info, io.BytesIO(b"3.19.274\n"))
    return path


def gzip_of_text(site: ArchiveSite) -> Path:
    path = site.build / NAME
    path.write_bytes(gzip.compress(b"this is not a tar stream\n" * 100))
    return path


def ordinary_tgz(site: ArchiveSite) -> Path:
    path = site.build / NAME
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("README")
        info.size = 6
        archive.addfile(info, io.BytesIO(b"hello\n"))
    return path


def corrupt_deflate(site: ArchiveSite) -> Path:
    path = forged(site, members())

    def break_deflate(data: bytearray) -> None:
        start = payload_offset(data) + 10  # after the 10-byte gzip header
        data[start : start + 4] = b"\xff" * 4  # a first block of the reserved type 3

    return rewrite(path, break_deflate)


def corrupt_crc(site: ArchiveSite) -> Path:
    path = forged(site, members())
    return rewrite(path, lambda data: data.__setitem__(slice(-8, -4), bytes(b ^ 0xFF for b in data[-8:-4])))


def truncated(site: ArchiveSite) -> Path:
    files = {**GOOD, "blob": bytes(range(256)) * 2000}
    path = forged(
        site, members(Member("payload/blob", files["blob"])), manifest_fields(files, modes=MODES, dirs=["bin"])
    )
    return rewrite(path, lambda data: data.__delitem__(slice(len(data) // 2, None)))


def appended(site: ArchiveSite) -> Path:
    path = forged(site, members())
    with open(path, "ab") as handle:
        handle.write(b"\0" * 100)
    return path


def bad_signature(site: ArchiveSite) -> Path:
    def flipped(manifest: bytes) -> tuple[str, bytes]:
        key_id, raw = signer(site.key)(manifest)
        return key_id, bytes([raw[0] ^ 1]) + raw[1:]

    return forge(site.build / NAME, fields(), payload_member(members()), flipped)


def unknown_key(site: ArchiveSite) -> Path:
    return forged(site, members(), key=intruder("intruder"))


def impostor_key(site: ArchiveSite) -> Path:
    return forged(site, members(), key=intruder("vendor-2026"))


def signature_of_other_manifest(site: ArchiveSite) -> Path:
    other = signer(site.key)(b'{"length":1,"product":"gts","version":"3.19.274"}')
    return forge(site.build / NAME, fields(), payload_member(members()), lambda _manifest: other)


def malformed_signature(site: ArchiveSite) -> Path:
    return forged(site, members(), signature_json=lambda _key_id, _raw: b"not json")


def manifest_with_traversal(site: ArchiveSite) -> Path:
    manifest = fields()
    manifest["files"]["../evil"] = manifest["files"].pop("VERSION")
    return forged(site, members(), manifest)


def renamed_version(site: ArchiveSite) -> Path:
    return forged(site, members(), name="gts.3.19.275.tgz")


def renamed_product(site: ArchiveSite) -> Path:
    return forged(site, members(), name="foo.3.19.274.tgz")


def other_product_inside(site: ArchiveSite) -> Path:
    return forged(site, members(), fields(product="other"))


def name_without_version(site: ArchiveSite) -> Path:
    return forged(site, members(), name="update.tgz")


def downgrade(site: ArchiveSite) -> Path:
    return forged(site, members(), fields(version="3.18.0"), name="gts.3.18.0.tgz")


def same_version(site: ArchiveSite) -> Path:
    return forged(site, members(), fields(version=INSTALLED), name=f"gts.{INSTALLED}.tgz")


def release_candidate_of_installed(site: ArchiveSite) -> Path:
    return forged(site, members(), fields(version=f"{INSTALLED}-rc1"), name=f"gts.{INSTALLED}-rc1.tgz")


def unmet_minimum(site: ArchiveSite) -> Path:
    return forged(site, members(), fields(version="3.21.0", min_version="3.20.0"), name="gts.3.21.0.tgz")


def unstable(site: ArchiveSite) -> Path:
    return forged(site, members(), fields(channel="unstable"))


def good(site: ArchiveSite) -> Path:
    return forged(site, members())


def bomb(site: ArchiveSite) -> Path:
    zeros = bytes(32 * 2**20)
    files = {"data/zeros.bin": zeros}
    return forged(
        site,
        [Member("payload/data", kind=tarfile.DIRTYPE, mode=0o755), *members_for(files)],
        manifest_fields(files, dirs=["data"]),
    )


def traversal(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/../../evil", b"owned\n")))


def absolute(site: ArchiveSite) -> Path:
    return forged(site, members(Member(str(EVIL_ABSOLUTE), b"owned\n")))


def outside_payload(site: ArchiveSite) -> Path:
    return forged(site, members(Member("etc/cron.d/evil", b"* * * * * root sh\n")))


def symlink_escape(site: ArchiveSite) -> Path:
    return forged(
        site,
        members(
            Member("payload/escape", kind=tarfile.SYMTYPE, link="../../../../etc", mode=0o777),
            Member("payload/escape/passwd", b"root::0:0::/:/bin/sh\n"),
        ),
    )


def hardlink(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/passwd", kind=tarfile.LNKTYPE, link="/etc/passwd")))


def char_device(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/null", kind=tarfile.CHRTYPE)))


def block_device(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/sda", kind=tarfile.BLKTYPE)))


def fifo(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/pipe", kind=tarfile.FIFOTYPE)))


def setuid(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/bin/app", GOOD["bin/app"], mode=0o4755), skip="payload/bin/app"))


def setgid_folder(site: ArchiveSite) -> Path:
    listed = members(skip="payload/bin")
    return forged(site, [Member("payload/bin", kind=tarfile.DIRTYPE, mode=0o2755), *listed])


def duplicate(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/VERSION", b"3.19.274\n")))


def not_in_manifest(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/extra.sh", b"#!/bin/sh\n")))


def missing_from_payload(site: ArchiveSite) -> Path:
    return forged(site, members(skip="payload/bin/app"))


def hash_mismatch(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/bin/app", b"#!/bin/sh\necho XX\n", mode=0o755), skip="payload/bin/app"))


def size_mismatch(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/bin/app", b"#!/bin/sh\n", mode=0o755), skip="payload/bin/app"))


def mode_mismatch(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/bin/app", GOOD["bin/app"], mode=0o777), skip="payload/bin/app"))


def non_utf8_name(site: ArchiveSite) -> Path:
    return forged(site, payload_member(members(Member(b"payload/caf\xe9.txt", b"x")), fmt=tarfile.GNU_FORMAT))


def overlong_component(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/" + "a" * 300, b"x")))


def overlong_path(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/" + "/".join(["d" * 200] * 6), b"x")))


def overlong_gnu_name(site: ArchiveSite) -> Path:
    return forged(site, payload_member(members(Member("payload/" + "b" * 300, b"x")), fmt=tarfile.GNU_FORMAT))


def shell_substitution(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/$(touch pwned)", b"x")))


def shell_separator(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/a;rm -rf ~", b"x")))


def newline_name(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/a\nb", b"x")))


def data_after_end(site: ArchiveSite) -> Path:
    return forged(site, payload_member(members(), tail=b"hidden payload after the end marker"))


def garbage_after_gzip(site: ArchiveSite) -> Path:
    return forged(site, payload_member(members()) + b"GARBAGE!")


def huge_pax_header(site: ArchiveSite) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("payload/VERSION")
        info.size = len(GOOD["VERSION"])
        info.pax_headers = {"comment": "x" * 100_000}
        tar.addfile(info, io.BytesIO(GOOD["VERSION"]))
    return forged(site, gzip.compress(buffer.getvalue(), mtime=0))


def raw_header(name: bytes, size_field: bytes) -> bytes:
    """A ustar header written by hand, with any bytes in its size field and a valid checksum."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = size_field
    block[136:148] = b"14524715400\0"
    block[156:157] = b"0"
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def negative_size(site: ArchiveSite) -> Path:
    tar = raw_header(b"payload/VERSION", b"-0000000011\0") + bytes(1024)
    return forged(site, gzip.compress(tar, mtime=0))


def far_future_time(site: ArchiveSite) -> Path:
    files = {"VERSION": GOOD["VERSION"]}
    payload = [Member("payload/VERSION", GOOD["VERSION"], mtime=2**80)]
    return forged(site, payload_member(payload, fmt=tarfile.GNU_FORMAT), manifest_fields(files) | {"dirs": []})


def file_where_folder_listed(site: ArchiveSite) -> Path:
    only_version = {"VERSION": GOOD["VERSION"]}
    manifest = manifest_fields(only_version, dirs=["bin"])
    return forged(site, [*members_for(only_version), Member("payload/bin", b"not a folder")], manifest)


def unlisted_folder(site: ArchiveSite) -> Path:
    return forged(site, members(Member("payload/cache", kind=tarfile.DIRTYPE, mode=0o755)))


def no_current_release(site: ArchiveSite) -> Path:
    (site.platform / "current").unlink()
    return forged(site, members())


@dataclass
class Case:
    build: Callable[[ArchiveSite], Path]
    expect: str
    config: dict[str, Any] = field(default_factory=dict)


CASES = {
    "empty file": Case(empty, "empty file (0 bytes): not an update archive"),
    "not an archive": Case(text_file, "starts with bytes 23 21 2f 62, expected the gzip signature 1f 8b"),
    "zip": Case(zip_file, "a zip archive, not a dropgate .tgz"),
    "uncompressed tar": Case(plain_tar, "expected the gzip signature 1f 8b"),
    "gzip of text": Case(gzip_of_text, "no valid tar header where manifest.json should be"),
    "ordinary tgz": Case(ordinary_tgz, "the first member is 'README', expected the file manifest.json"),
    "corrupt gzip stream": Case(corrupt_deflate, "corrupt gzip stream near byte"),
    "corrupt gzip checksum": Case(corrupt_crc, "incorrect data check"),
    "truncated": Case(truncated, "incomplete archive:"),
    "data appended": Case(appended, "data was appended to it"),
    "bad signature": Case(bad_signature, "the signature does not verify with the trusted key 'vendor-2026'"),
    "unknown key": Case(unknown_key, "signed with key 'intruder', which is not trusted here (trusted: vendor-2026)"),
    "impostor key": Case(impostor_key, "does not verify with the trusted key 'vendor-2026'"),
    "signature of another manifest": Case(
        signature_of_other_manifest, "the manifest was altered or signed with another key"
    ),
    "malformed signature": Case(malformed_signature, "manifest.sig is not a dropgate signature"),
    "signed traversal in manifest": Case(
        manifest_with_traversal, "the signed manifest is invalid: files: '../evil': '..' path component"
    ),
    "renamed version": Case(
        renamed_version, "gts.3.19.275.tgz says version 3.19.275, the signed manifest says 3.19.274"
    ),
    "renamed product": Case(renamed_product, "foo.3.19.274.tgz is for product foo, this platform is gts"),
    "other product inside": Case(other_product_inside, "says product gts, the signed manifest says other"),
    "name without version": Case(name_without_version, "archive name 'update.tgz' has no version"),
    "downgrade": Case(
        downgrade, "downgrade refused: the archive's version 3.18.0 is older than the installed 3.19.273"
    ),
    "same version": Case(same_version, "version 3.19.273 is already installed"),
    "pre-release of installed": Case(
        release_candidate_of_installed, "3.19.273-rc1 is older than the installed 3.19.273"
    ),
    "unmet minimum": Case(unmet_minimum, "version 3.21.0 needs at least 3.20.0 installed, found 3.19.273"),
    "unstable disallowed": Case(unstable, "channel unstable is not allowed here (policy.channels: stable)"),
    "archive too large": Case(good, "above limits.max_archive_bytes (1000)", {"limits": {"max_archive_bytes": 1000}}),
    "too many members": Case(
        good, "the manifest lists more entries than limits.max_members (2)", {"limits": {"max_members": 2}}
    ),
    "file too large": Case(
        good, "file 'VERSION' is 9 bytes, above limits.max_file_bytes (5)", {"limits": {"max_file_bytes": 5}}
    ),
    "unpacked too large": Case(
        good, "unpacks to 27 bytes, above limits.max_unpacked_bytes (10)", {"limits": {"max_unpacked_bytes": 10}}
    ),
    "decompression bomb": Case(bomb, "expansion ratio above 200:1"),
    "path traversal": Case(traversal, "member 'payload/../../evil': '..' path component"),
    "absolute path": Case(absolute, f"member '{EVIL_ABSOLUTE}': absolute path"),
    "outside payload": Case(outside_payload, "member 'etc/cron.d/evil' is outside payload/"),
    "symlink escape": Case(symlink_escape, "member 'payload/escape' is a symbolic link (→ '../../../../etc')"),
    "hardlink escape": Case(hardlink, "member 'payload/passwd' is a hard link (→ '/etc/passwd')"),
    "character device": Case(
        char_device, "member 'payload/null' is a character device; only regular files and folders"
    ),
    "block device": Case(block_device, "member 'payload/sda' is a block device"),
    "fifo": Case(fifo, "member 'payload/pipe' is a FIFO"),
    "setuid file": Case(setuid, "member 'payload/bin/app': mode 4755 has a setuid, setgid or sticky bit"),
    "setgid folder": Case(setgid_folder, "member 'payload/bin': mode 2755 has a setuid, setgid or sticky bit"),
    "duplicate member": Case(duplicate, "member 'payload/VERSION' appears twice in the archive"),
    "member not in manifest": Case(not_in_manifest, "member 'payload/extra.sh' is not listed in the signed manifest"),
    "manifest file missing": Case(
        missing_from_payload, "file 'bin/app' is listed in the signed manifest but missing from the payload"
    ),
    "hash mismatch": Case(hash_mismatch, "member 'payload/bin/app': SHA-256 "),
    "size mismatch": Case(size_mismatch, "member 'payload/bin/app': 10 bytes in the archive, the manifest says 18"),
    "mode mismatch": Case(mode_mismatch, "member 'payload/bin/app': mode 0777 in the archive, the manifest says 0755"),
    "non-UTF-8 name": Case(non_utf8_name, "member 'payload/caf\\xe9.txt': the name is not valid UTF-8"),
    "overlong name component": Case(overlong_component, "path component of 300 bytes, longer than the 255-byte limit"),
    "overlong path": Case(overlong_path, "bytes, longer than the 1024-byte limit"),
    "overlong GNU long name": Case(overlong_gnu_name, "path component of 300 bytes, longer than the 255-byte limit"),
    "shell substitution in name": Case(
        shell_substitution, "member 'payload/$(touch pwned)': character '$' is not allowed"
    ),
    "shell separator in name": Case(shell_separator, "member 'payload/a;rm -rf ~': character ';' is not allowed"),
    "newline in name": Case(newline_name, "member 'payload/a\\nb': character '\\n' is not allowed"),
    "data after end marker": Case(data_after_end, "data after the tar end-of-archive marker"),
    "garbage after gzip": Case(garbage_after_gzip, "corrupt gzip stream"),
    "huge pax header": Case(huge_pax_header, "a pax extended header of 100"),
    "negative size in a header": Case(
        negative_size, "corrupt tar header: size field b'-0000000011\\x00' is not an octal number"
    ),
    "file where a folder is listed": Case(
        file_where_folder_listed, "member 'payload/bin' is not listed in the signed manifest (it lists a folder there)"
    ),
    "unlisted folder": Case(
        unlisted_folder, "member 'payload/cache' is a folder that the signed manifest does not list"
    ),
    "no trusted keys": Case(good, "no trusted keys are configured (trust.keys is empty)", {"trust": {"keys": []}}),
    "no installed release": Case(no_current_release, "no release is installed under"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_hostile_archive_is_rejected_without_a_trace(tmp_path: Path, case: Case) -> None:
    # Given a platform with 3.19.273 live and the archive spooled for run 1
    site = ArchiveSite(tmp_path, **case.config)
    archive = case.build(site)
    ctx = site.context(archive)
    before = tree(tmp_path)

    # When the validate step runs
    with pytest.raises(ArchiveRejected) as rejection:
        validate.run(ctx)

    # Then it is rejected with its own one-line reason
    message = str(rejection.value)
    assert case.expect in message
    assert "\n" not in message
    # and nothing was written anywhere: no release, no staging left, no escaped file
    assert tree(tmp_path) == before
    assert sorted(p.name for p in (site.platform / "releases").iterdir()) == [INSTALLED]
    assert not (site.platform / ".staging").exists()
    assert not EVIL_ABSOLUTE.exists()
    assert not (tmp_path / "evil").exists()
    assert not site.reporter.updates  # no facts, no versions recorded for a rejected archive


def test_a_timestamp_far_in_the_future_is_clamped_not_fatal(tmp_path: Path) -> None:
    site = ArchiveSite(tmp_path)
    ctx = site.context(far_future_time(site))

    validate.run(ctx)

    staged = site.platform / ".staging" / "1" / "VERSION"
    assert staged.read_bytes() == GOOD["VERSION"]
    assert staged.stat().st_mtime == 2**33


def test_the_corpus_has_more_than_thirty_distinct_reasons() -> None:
    assert len({case.expect for case in CASES.values()}) >= 30


def test_the_same_site_accepts_the_well_formed_archive(tmp_path: Path) -> None:
    # Given the forger's well-formed archive (the control for the corpus above)
    site = ArchiveSite(tmp_path)
    ctx = site.context(good(site))

    # When it is validated
    validate.run(ctx)

    # Then its release is staged, ready to move under releases/ once the pre-change steps pass
    release = site.platform / ".staging" / "1"
    assert (release / "bin" / "app").read_bytes() == GOOD["bin/app"]
    assert (release / "bin" / "app").stat().st_mode & 0o777 == 0o755


# -- through the real daemon ---------------------------------------------------------


def test_the_daemon_rejects_hostile_drops_keeps_them_aside_and_goes_on(site: Site) -> None:
    # Given a running daemon on a site with 1.0.0 live, trusting the vendor key
    private, _ = site.keypair()
    key = load_signing_key(private)
    files = {"VERSION": b"2.0.0\n"}
    hostile = {
        "gts.2.0.0.tgz": (
            [*members_for(files), Member("payload/escape", kind=tarfile.SYMTYPE, link="/etc")],
            "member 'payload/escape' is a symbolic link (→ '/etc')",
        ),
        "gts.2.0.1.tgz": (
            [*members_for(files), Member("payload/../../../evil", b"owned")],
            "member 'payload/../../../evil': '..' path component",
        ),
        "gts.0.9.0.tgz": (
            members_for(files),
            "downgrade refused: the archive's version 0.9.0 is older than the installed 1.0.0",
        ),
    }
    daemon = site.start_daemon()

    # When each is dropped into the inbox
    for name, (payload, _expect) in hostile.items():
        version = name[len("gts.") : -len(".tgz")]
        archive = forge(site.root / name, manifest_fields(files, version=version), payload_member(payload), signer(key))
        site.drop(archive, name)

    # Then each run is rejected with its own reason, in status, show and the reason file beside the kept archive
    for run_id, (name, (_payload, expect)) in enumerate(hostile.items(), start=1):
        run = site.wait_outcome(run_id)
        assert (run["archive"], run["outcome"]) == (name, "rejected")
        assert expect in run["error"]
        assert expect in site.cli("show", str(run_id)).stdout
        kept = site.state / "rejected" / f"{run_id}-{name}"
        assert kept.exists()
        assert expect in (site.state / "rejected" / f"{run_id}-{name}.reason").read_text()
    # nothing was installed or left in staging, nothing escaped, and the daemon is still serving
    assert sorted(p.name for p in (site.platform / "releases").iterdir()) == ["1.0.0"]
    assert not (site.platform / ".staging").exists()
    assert not (site.root / "evil").exists()
    assert daemon.alive()
    assert site.status()["gate"] == "idle"
