"""The archive format: keys, pack, the announced length, authenticate, stage, and the vendor commands."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from pipeline.archive import (
    Manifest,
    authenticate,
    pack,
    parse_archive_name,
    path_problem,
    read_announced_length,
    stage_payload,
    verify_archive,
)
from pipeline.config import Limits
from pipeline.errors import ArchiveRejected, ConfigError, KeyFileError, StepAborted, StepFailed
from pipeline.signing import generate_keypair, load_signing_key, load_trusted_keys
from tests.archive_helpers import ArchiveSite, Member, forge, manifest_fields, payload_member, signer, tree
from tests.conftest import cannot_run, require_tool

ROOT = Path(__file__).resolve().parents[2]


def dropgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


@pytest.fixture
def site(tmp_path: Path) -> ArchiveSite:
    return ArchiveSite(tmp_path)


FILES = {
    "VERSION": b"3.19.274\n",
    "bin/app": b"#!/bin/sh\necho app\n",
    "static/css/site.css": b"body { color: #333 }\n" * 50,
    "static/img/logo.bin": bytes(range(256)) * 40,
    "migrations/001-add-index.sh": b"#!/bin/sh\necho migrating\n",
}
MODES = {"bin/app": 0o755, "migrations/001-add-index.sh": 0o755}


def packed(site: ArchiveSite, version: str = "3.19.274", **manifest: object) -> Path:
    return site.pack(version, FILES, modes=MODES, dirs=["var/empty"], **manifest)


# -- keys -------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "vendor-2026")

    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert public.read_text().startswith("dropgate-ed25519-public vendor-2026 ")
    assert private.read_text().startswith("dropgate-ed25519-private vendor-2026 ")
    assert load_signing_key(private).key_id == "vendor-2026"


def test_keygen_never_replaces_a_key_without_force(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "vendor")
    before = private.read_bytes(), public.read_bytes()

    with pytest.raises(KeyFileError, match="already exists; use --force to replace it"):
        generate_keypair(tmp_path / "vendor")
    assert (private.read_bytes(), public.read_bytes()) == before

    generate_keypair(tmp_path / "vendor", force=True)
    assert private.read_bytes() != before[0]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_keygen_into_a_missing_folder_names_the_folder(tmp_path: Path) -> None:
    result = dropgate("keygen", "-o", str(tmp_path / "missing" / "vendor"))
    assert result.returncode == 1
    assert f"the folder {tmp_path / 'missing'} does not exist; create it first" in result.stderr
    assert ".tmp" not in result.stderr


def test_keygen_command_refuses_to_overwrite_and_says_so(tmp_path: Path) -> None:
    first = dropgate("keygen", "-o", str(tmp_path / "vendor-2026"))
    second = dropgate("keygen", "-o", str(tmp_path / "vendor-2026"))

    assert first.returncode == 0, first.stderr
    assert "key id vendor-2026" in first.stdout
    assert second.returncode == 1
    assert "vendor-2026.key already exists; use --force" in second.stderr


def test_a_private_key_is_not_accepted_as_a_trusted_key(site: ArchiveSite) -> None:
    with pytest.raises(ConfigError) as error:
        load_trusted_keys([site.public_key, site.private_key])
    assert "trust.keys[1]" in str(error.value)
    assert "expected a line starting with 'dropgate-ed25519-public', found 'dropgate-ed25519-private'" in str(
        error.value
    )


def test_two_trusted_keys_with_one_id_are_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, first = generate_keypair(tmp_path / "a" / "vendor")
    _, second = generate_keypair(tmp_path / "b" / "vendor")

    with pytest.raises(ConfigError, match=r"trust.keys\[1\].*key id 'vendor' is used by another trusted key"):
        load_trusted_keys([first, second])


def test_archives_signed_with_either_key_verify_during_a_rotation(site: ArchiveSite, tmp_path: Path) -> None:
    # Given an archive signed with the old key and a site trusting the old and the new key
    archive = packed(site)
    _, new_public = generate_keypair(tmp_path / "vendor-2027")

    # When it is authenticated
    manifest = authenticate(archive, load_trusted_keys([new_public, site.public_key]))

    # Then the old key's signature is accepted and named
    assert manifest.key_id == "vendor-2026"


# -- pack, authenticate, stage ------------------------------------------------------


def test_pack_then_stage_reproduces_the_release_tree(site: ArchiveSite, tmp_path: Path) -> None:
    # Given an archive packed from a release tree with an executable and an empty folder
    archive = packed(site, min_version="3.18.0", migrations=["migrations/001-add-index.sh"], notes="Faster search.")
    keys = load_trusted_keys([site.public_key])

    # When it is authenticated and staged
    manifest = authenticate(archive, keys)
    dest = tmp_path / "staging" / "1"
    stage_payload(archive, manifest, dest, Limits())

    # Then the staged tree is the source tree, modes included
    assert archive.name == "gts.3.19.274.tgz"
    assert manifest.length == archive.stat().st_size
    assert (manifest.product, manifest.version, manifest.min_version, manifest.notes) == (
        "gts",
        "3.19.274",
        "3.18.0",
        "Faster search.",
    )
    assert manifest.migrations == ("migrations/001-add-index.sh",)
    for name, content in FILES.items():
        assert (dest / name).read_bytes() == content
        assert stat.S_IMODE((dest / name).stat().st_mode) == MODES.get(name, 0o644)
    assert (dest / "var" / "empty").is_dir()
    assert tree(dest) == tree(site.build / "src-3.19.274" / "release")


def test_tar_lists_the_archive_like_any_tgz(site: ArchiveSite) -> None:
    tar = require_tool("tar")
    archive = packed(site)

    listing = subprocess.run([tar, "-tzf", str(archive)], capture_output=True, text=True, check=True).stdout.split()

    assert listing[:2] == ["manifest.json", "manifest.sig"]
    assert "payload/bin/app" in listing
    assert "payload/var/empty/" in listing


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_payload_written_by_gnu_tar_is_accepted(site: ArchiveSite, tmp_path: Path, fmt: str) -> None:
    # Given a payload member made by GNU tar rather than by dropgate (a vendor's own tooling), long names included
    tar = require_tool("tar")
    source = tmp_path / "src"
    files = {"bin/app": b"#!/bin/sh\n", "docs/" + "n" * 120 + ".txt": b"a long name\n", "docs/café.txt": b"x"}
    for name, content in files.items():
        (source / "payload" / name).parent.mkdir(parents=True, exist_ok=True)
        (source / "payload" / name).write_bytes(content)
        (source / "payload" / name).chmod(0o644)
    payload = tmp_path / "payload.tar"
    subprocess.run(
        [tar, f"--format={fmt}", "--owner=0", "--group=0", "-cf", str(payload), "-C", str(source), "payload"],
        check=True,
        capture_output=True,
    )
    fields = manifest_fields(files, dirs=["bin", "docs"])
    archive = forge(site.build / "gts.3.19.274.tgz", fields, gzip.compress(payload.read_bytes()), signer(site.key))

    # When it is verified, then it is accepted
    manifest = verify_archive(archive, load_trusted_keys([site.public_key]))
    assert set(manifest.files) == set(files)


def test_pack_writes_into_a_folder_under_the_manifest_name(site: ArchiveSite, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "release").mkdir(parents=True)
    (source / "release" / "VERSION").write_text("3.20.0\n")
    (source / "manifest.yaml").write_text('product: gts\nversion: "3.20.0"\nchannel: unstable\n')
    out = tmp_path / "out"
    out.mkdir()

    archive = pack(source, site.private_key, out)

    assert archive == out / "gts.3.20.0.tgz"
    assert authenticate(archive, load_trusted_keys([site.public_key])).channel == "unstable"
    assert [p.name for p in out.iterdir()] == ["gts.3.20.0.tgz"]  # no temporary file left


def _source(tmp_path: Path, manifest: str = 'product: gts\nversion: "3.19.274"\n') -> Path:
    source = tmp_path / "src"
    (source / "release").mkdir(parents=True)
    (source / "release" / "VERSION").write_text("3.19.274\n")
    (source / "manifest.yaml").write_text(manifest)
    return source


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda r: (r / "link").symlink_to("/etc/passwd"), "'release/link' is a symbolic link"),
        (lambda r: os.mkfifo(r / "pipe"), "'release/pipe' is a FIFO"),
        (
            lambda r: (r / "x").write_text("") or (r / "x").chmod(0o4755),
            "'release/x' has a setuid, setgid or sticky bit",
        ),
        (lambda r: (r / "a b;c").write_text(""), "'release/a b;c': character ';' is not allowed"),
        (lambda r: (r / "$HOME").write_text(""), "character '$' is not allowed"),
    ],
    ids=["symlink", "fifo", "setuid", "semicolon", "dollar"],
)
def test_pack_refuses_what_a_receiver_would_refuse(
    site: ArchiveSite, tmp_path: Path, make: object, expect: str
) -> None:
    source = _source(tmp_path)
    make(source / "release")  # type: ignore[operator]

    with pytest.raises(ArchiveRejected, match="cannot pack") as refusal:
        pack(source, site.private_key, tmp_path)

    assert expect in str(refusal.value)
    assert not list(tmp_path.glob("*.tgz"))


def test_pack_refuses_a_device_file(site: ArchiveSite, tmp_path: Path) -> None:
    source = _source(tmp_path)
    try:
        os.mknod(source / "release" / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        cannot_run("mknod needs root")

    with pytest.raises(ArchiveRejected, match="'release/null' is a character device"):
        pack(source, site.private_key, tmp_path)


@pytest.mark.parametrize(
    ("manifest", "expect"),
    [
        (
            'product: gts\nversion: "3.19.274"\nhooks: {pre_apply: hooks/pre.sh}\n',
            "hooks.pre_apply 'hooks/pre.sh' is not a file",
        ),
        ('product: gts\nversion: "3.19.274"\ncolour: blue\n', "unknown key 'colour'"),
        ("product: gts\n", "required key 'version' is missing"),
        ('product: gts\nversion: "latest"\n', "'latest' is not a version"),
        ('product: gts\nversion: "3.19.274"\nchannel: nightly\n', "channel: expected stable or unstable"),
    ],
    ids=["missing hook", "unknown key", "no version", "bad version", "bad channel"],
)
def test_pack_refuses_a_bad_manifest_yaml(site: ArchiveSite, tmp_path: Path, manifest: str, expect: str) -> None:
    with pytest.raises(ArchiveRejected) as refusal:
        pack(_source(tmp_path, manifest), site.private_key, tmp_path)
    assert expect in str(refusal.value)


def test_pack_refuses_an_output_name_the_receiver_would_reject(site: ArchiveSite, tmp_path: Path) -> None:
    with pytest.raises(ArchiveRejected, match=r"must be named gts\.3\.19\.274\.tgz .* not latest\.tgz"):
        pack(_source(tmp_path), site.private_key, tmp_path / "latest.tgz")


def test_authenticate_reads_nothing_of_the_payload(site: ArchiveSite) -> None:
    # Given a correctly signed head followed by a payload that is not even gzip
    fields = manifest_fields({"VERSION": b"3.19.274\n"})
    archive = forge(site.build / "gts.3.19.274.tgz", fields, b"\x00not gzip at all" * 100, signer(site.key))
    keys = load_trusted_keys([site.public_key])

    # When it is authenticated, then the manifest is returned: the payload was never looked at
    assert authenticate(archive, keys).version == "3.19.274"
    # and only staging finds the damage
    with pytest.raises(ArchiveRejected, match="corrupt gzip stream"):
        verify_archive(archive, keys)


def test_stage_reports_progress_and_honours_checkpoints(site: ArchiveSite, tmp_path: Path) -> None:
    big = {f"blob{i}.bin": os.urandom(3 * 2**20) for i in range(4)}
    archive = site.pack("3.19.274", big)
    manifest = authenticate(archive, load_trusted_keys([site.public_key]))
    ratios: list[float] = []
    calls: list[int] = []

    stage_payload(
        archive, manifest, tmp_path / "ok", Limits(), checkpoint=lambda: calls.append(1), progress=ratios.append
    )

    assert ratios == sorted(ratios)
    assert ratios[-1] == 1.0
    assert len(ratios) > 4
    assert len(calls) >= 4

    def stop() -> None:
        if len(calls) > 6:
            raise StepAborted("validate was stopped: shutdown", resumable=True)
        calls.append(1)

    with pytest.raises(StepAborted):
        stage_payload(archive, manifest, tmp_path / "stopped", Limits(), checkpoint=stop)
    assert not (tmp_path / "stopped").exists()


def test_stage_refuses_an_existing_folder(site: ArchiveSite, tmp_path: Path) -> None:
    archive = packed(site)
    manifest = authenticate(archive, load_trusted_keys([site.public_key]))
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep").write_text("mine")

    with pytest.raises(StepFailed, match="already exists"):
        stage_payload(archive, manifest, tmp_path / "dest", Limits())
    assert (tmp_path / "dest" / "keep").read_text() == "mine"


def test_staging_memory_does_not_grow_with_the_archive(site: ArchiveSite, tmp_path: Path) -> None:
    # Given archives of 4 MiB and 48 MiB (incompressible, in files of 16 MiB at most)
    keys = load_trusted_keys([site.public_key])
    peaks = []
    for version, mib in (("3.19.274", 4), ("3.19.275", 48)):
        files = {f"part{i}.bin": os.urandom(min(16, mib - i * 16) * 2**20) for i in range((mib + 15) // 16)}
        archive = site.pack(version, files)
        del files
        manifest = authenticate(archive, keys)

        # When each is staged under tracemalloc
        tracemalloc.start()
        stage_payload(archive, manifest, tmp_path / version, Limits())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()

    # Then the peak stays a few chunks, whatever the size
    assert max(peaks) < 8 * 2**20, peaks
    assert peaks[1] < peaks[0] + 2 * 2**20, peaks


# -- the announced length ----------------------------------------------------------


def test_the_announced_length_is_readable_from_any_prefix(site: ArchiveSite, tmp_path: Path) -> None:
    # Given an archive being uploaded: every prefix of it, as a growing file would be
    archive = packed(site)
    data = archive.read_bytes()
    upload = tmp_path / "upload"
    head_length = 2048
    for cut in (head_length, 4096, len(data) // 2, len(data) - 1, len(data)):
        upload.write_bytes(data[:cut])

        # Then the announced full length is known from the start
        assert read_announced_length(upload) == len(data)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x1f",
        b"\x1f\x8b\x08\x00",
        b"hello, this is not an archive\n",
        gzip.compress(b"x" * 5000),
        gzip.compress(b'{"length": 99}'),
    ],
    ids=["empty", "one byte", "gzip header only", "text", "gzip of text", "bare json"],
)
def test_no_announced_length_for_what_is_not_an_archive(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "gts.3.19.274.tgz"
    path.write_bytes(content)
    assert read_announced_length(path) is None


def test_no_announced_length_for_zips_plain_tgz_and_missing_files(tmp_path: Path) -> None:
    zipped = tmp_path / "a.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("manifest.json", '{"length": 10}')
    tgz = tmp_path / "b.tgz"
    with tarfile.open(tgz, "w:gz") as archive:
        info = tarfile.TarInfo("README")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"hi\n"))

    assert read_announced_length(zipped) is None
    assert read_announced_length(tgz) is None
    assert read_announced_length(tmp_path / "missing.tgz") is None


# -- names, the manifest ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("bin/app", None),
        ("static/Ünïcode café.txt", None),
        (".htaccess", None),
        ("a+b@c=d,e~f%g", None),
        ("", "empty name"),
        ("/etc/passwd", "absolute path"),
        ("a/../../b", "'..' path component"),
        ("a//b", "empty or '.' path component"),
        ("./a", "empty or '.' path component"),
        ("a/", "empty or '.' path component"),
        ("a\\b", "character '\\\\' is not allowed"),
        ("a`id`", "character '`' is not allowed"),
        ("a|b", "character '|' is not allowed"),
        ("a\tb", "character '\\t' is not allowed"),
        ("x" * 256, "path component of 256 bytes"),
        ("é" * 128, "path component of 256 bytes"),
        ("/".join(["d" * 100] * 11), "longer than the 1024-byte limit"),
    ],
)
def test_path_rules(path: str, problem: str | None) -> None:
    found = path_problem(path)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


@pytest.mark.parametrize(
    ("name", "expected"),
    [("gts.3.19.274.tgz", ("gts", "3.19.274")), ("my-app.3.20.0-rc1.tgz", ("my-app", "3.20.0-rc1"))],
)
def test_archive_names(name: str, expected: tuple[str, str]) -> None:
    assert parse_archive_name(name) == expected


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("gts.3.19.274.tar.gz", "does not end in .tgz"),
        ("gts.tgz", "has no version"),
        ("GTS.3.19.274.tgz", "does not start with a product name"),
        ("gts.latest.tgz", "'latest' is not a version"),
    ],
)
def test_bad_archive_names(name: str, expect: str) -> None:
    with pytest.raises(ArchiveRejected) as rejection:
        parse_archive_name(name)
    assert expect in str(rejection.value)


def test_the_manifest_round_trips_through_the_journal_as_json(site: ArchiveSite) -> None:
    archive = packed(site, hooks={"post_apply": "bin/app"}, requirements={"min_cpus": 8}, downtime=True)
    manifest = authenticate(archive, load_trusted_keys([site.public_key]))

    restored = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))

    assert restored == manifest
    assert restored.hooks == {"post_apply": "bin/app"}
    assert restored.requirements == {"min_cpus": 8}
    assert restored.downtime is True
    assert len(restored.digest) == 64
    assert restored.key_id == "vendor-2026"


# -- the vendor's verify command ------------------------------------------------------


def test_verify_command_says_ok_or_exactly_what_is_wrong(site: ArchiveSite, tmp_path: Path) -> None:
    archive = packed(site)
    ok = dropgate("verify", str(archive), "--key", str(site.public_key))
    renamed = tmp_path / "gts.3.19.275.tgz"
    shutil.copyfile(archive, renamed)
    wrong = dropgate("verify", str(renamed), "--key", str(site.public_key), "--json")
    tampered = tmp_path / "tampered" / archive.name
    tampered.parent.mkdir()
    tampered.write_bytes(archive.read_bytes()[:-8] + bytes(8))
    broken = dropgate("verify", str(tampered), "--key", str(site.public_key))

    assert ok.returncode == 0, ok.stderr
    assert "gts.3.19.274.tgz: OK: gts 3.19.274 (stable), signed with key vendor-2026, 5 files" in ok.stdout
    assert wrong.returncode == 1
    report = json.loads(wrong.stdout)
    assert report["ok"] is False
    assert report["error"] == "the name gts.3.19.275.tgz says gts 3.19.275, the signed manifest says gts 3.19.274"
    assert report["manifest"]["version"] == "3.19.274"
    assert broken.returncode == 1
    assert "gts.3.19.274.tgz: REJECTED: corrupt gzip stream" in broken.stdout


def test_verify_command_with_an_unusable_key_is_a_usage_error(site: ArchiveSite) -> None:
    archive = packed(site)
    result = dropgate("verify", str(archive), "--key", str(site.private_key))
    assert result.returncode == 2
    assert "is not a dropgate public key" in result.stderr


def test_pack_command_writes_the_archive(site: ArchiveSite, tmp_path: Path) -> None:
    source = _source(tmp_path)
    result = dropgate("pack", str(source), "--key", str(site.private_key), "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'gts.3.19.274.tgz'}" in result.stdout
    refused = dropgate("pack", str(source), "--key", str(site.public_key), "-o", str(tmp_path))
    assert refused.returncode == 1
    assert "is not a dropgate private key" in refused.stderr


def test_a_forged_member_list_cannot_smuggle_a_link_between_good_files(site: ArchiveSite) -> None:
    files = {"a": b"1", "c": b"3"}
    members = [
        Member("payload/a", b"1"),
        Member("payload/b", kind=tarfile.SYMTYPE, link="/"),
        Member("payload/c", b"3"),
    ]
    archive = forge(site.build / "gts.3.19.274.tgz", manifest_fields(files), payload_member(members), signer(site.key))
    with pytest.raises(ArchiveRejected, match=r"member 'payload/b' is a symbolic link \(→ '/'\)"):
        verify_archive(archive, load_trusted_keys([site.public_key]))
