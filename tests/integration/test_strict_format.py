"""The archive format, strict by construction: each class of malformed input is one clear line.

The attacker here holds a vendor key (or the build that signs was corrupted),
so most archives below carry a valid signature from the trusted key; what the
format forbids must be refused all the same. Each case goes through the
validate step, through `dropgate verify` (the real CLI), and a sample of every
class through a running daemon fed by its inbox. Every refusal is one line,
never a traceback, and leaves nothing under releases/ or in staging.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ArchiveRejected
from states import validate
from tests.archive_helpers import (
    INSTALLED,
    ArchiveSite,
    Member,
    forge,
    head_blocks,
    manifest_fields,
    members_for,
    payload_member,
    signer,
    tree,
)
from tests.conftest import ROOT, Site

GOOD = {"VERSION": b"3.19.274\n", "bin/app": b"#!/bin/sh\necho hi\n", "hooks/pre.sh": b"#!/bin/sh\n"}
MODES = {"bin/app": 0o755, "hooks/pre.sh": 0o755}
NAME = "gts.3.19.274.tgz"
DIRS = ["bin", "hooks"]

BYTES_REPR = re.compile(r"(?:^|[\s(\[{=:,])b['\"]")  # a Python bytes repr: b'...' or b"..."


def fields(content: dict[str, bytes] | None = None, modes: dict[str, int] | None = None, **overrides: Any) -> Any:
    """The manifest (without length) of GOOD, or of `content`, with `overrides` replacing whole keys."""
    return {**manifest_fields(content or GOOD, modes=modes or MODES, dirs=DIRS), **overrides}


def members(files: dict[str, bytes] | None = None, modes: dict[str, int] | None = None, *extra: Member) -> list[Member]:
    folders = [Member(f"payload/{name}", kind=tarfile.DIRTYPE, mode=0o755) for name in DIRS]
    return [*folders, *members_for(files or GOOD, modes or MODES), *extra]


def signed(
    site: ArchiveSite, manifest: Any = None, payload: list[Member] | bytes | None = None, **options: Any
) -> Path:
    """An archive signed with the site's trusted key (the attacker holds a vendor key)."""
    body = payload if isinstance(payload, bytes) else payload_member(payload if payload is not None else members())
    return forge(site.build / NAME, manifest if manifest is not None else fields(), body, signer(site.key), **options)


def raw(site: ArchiveSite, text: dict[str, str], **overrides: Any) -> Path:
    """A signed archive whose manifest has raw JSON text in place of placeholder strings (keys of `text`)."""
    manifest = fields(**overrides)

    def encoded(length: int) -> bytes:
        out = json.dumps({"length": length, **manifest}, separators=(",", ":"), ensure_ascii=False)
        for placeholder, value in text.items():
            assert json.dumps(placeholder) in out, placeholder
            out = out.replace(json.dumps(placeholder), value)
        return out.encode()

    return signed(site, encoded)


def with_file(path: str, content: bytes, mode: int = 0o644) -> tuple[dict[str, bytes], dict[str, int]]:
    return {**GOOD, path: content}, {**MODES, path: mode}


def entry_field(name: str, key: str, value: Any) -> Callable[[ArchiveSite], Path]:
    def build(site: ArchiveSite) -> Path:
        manifest = fields()
        manifest["files"][name][key] = value
        return signed(site, manifest)

    return build


def sig_text(text: bytes) -> Callable[[ArchiveSite], Path]:
    return lambda site: signed(site, signature_json=lambda _key_id, _raw: text)


def named(
    files: dict[str, bytes], modes: dict[str, int] | None = None, dirs: list[str] | None = None
) -> Callable[[ArchiveSite], Path]:
    """An archive whose payload is `files` (and folders `dirs`), all listed truthfully."""
    folders = dirs if dirs is not None else []

    def build(site: ArchiveSite) -> Path:
        manifest = manifest_fields(files, modes=modes, dirs=folders)
        payload = [Member(f"payload/{d}", kind=tarfile.DIRTYPE, mode=0o755) for d in folders]
        return signed(site, manifest, [*payload, *members_for(files, modes)])

    return build


def one_member(site: ArchiveSite) -> Path:
    """Head and payload in a single gzip member (a plain `tar -czf` of both)."""
    tar = gzip.decompress(payload_member(members()))
    return signed(
        site,
        payload=b"",
        head=lambda manifest, sig: gzip.compress(head_blocks(manifest, sig) + tar, compresslevel=0, mtime=0),
    )


def empty_member_between(site: ArchiveSite) -> Path:
    return signed(site, payload=gzip.compress(b"", mtime=0) + payload_member(members()))


def empty_member_after(site: ArchiveSite) -> Path:
    return signed(site, extra=gzip.compress(b"", mtime=0))


def second_payload_after(site: ArchiveSite) -> Path:
    return signed(site, extra=payload_member([]))


def manifest_is_a_folder(site: ArchiveSite) -> Path:
    def head(manifest: bytes, sig: bytes) -> bytes:
        folder = tarfile.TarInfo("manifest.json")
        folder.type = tarfile.DIRTYPE
        return gzip.compress(folder.tobuf(tarfile.USTAR_FORMAT) + head_blocks(manifest, sig), mtime=0)

    return signed(site, head=head)


def folder_entry_mode(mode: int, name: str = "payload") -> Callable[[ArchiveSite], Path]:
    def build(site: ArchiveSite) -> Path:
        listed = [m for m in members() if m.name != f"payload/{name}"]
        return signed(
            site,
            payload=[
                Member(f"payload/{name}" if name != "payload" else "payload", kind=tarfile.DIRTYPE, mode=mode),
                *listed,
            ],
        )

    return build


def deep(depth: int, opener: str = "[") -> str:
    closer = {"[": "]", "{": "}"}[opener]
    inner = '{"a":' if opener == "{" else "["
    return inner * depth + ("0" + closer * depth if opener == "{" else "]" * depth)


@dataclass
class Case:
    build: Callable[[ArchiveSite], Path]
    expect: str
    config: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # -- crashes: nesting and numbers ----------------------------------------------------
    "manifest.sig nested 4000 deep (unsigned)": Case(
        sig_text(b"[" * 4000), "manifest.sig is a list, expected a JSON object"
    ),
    "key_id nested deep (unsigned)": Case(
        sig_text(b'{"algorithm":"ed25519","key_id":' + b"[" * 3000), "key_id is a list, expected the id of a key"
    ),
    "notes nested 200,000 deep": Case(
        lambda s: raw(s, {"@n": deep(200_000)}, notes="@n"), "notes is a list, expected text"
    ),
    "requirement nested deep": Case(
        lambda s: raw(s, {"@n": deep(100_000, "{")}, requirements={"min_cpus": "@n"}),
        "requirements.min_cpus is an object, expected a whole number of CPU cores",
    ),
    "unknown key with a nested value": Case(lambda s: raw(s, {"@n": deep(100_000)}, extra="@n"), "unknown key 'extra'"),
    "free_bytes 1e999": Case(
        lambda s: raw(s, {"@v": "1e999"}, requirements={"free_bytes": "@v"}),
        "requirements.free_bytes is 1e999, expected a whole number of bytes",
    ),
    "min_memory_gib 1e999": Case(
        lambda s: raw(s, {"@v": "1e999"}, requirements={"min_memory_gib": "@v"}),
        "requirements.min_memory_gib is 1e999, which is not a finite number",
    ),
    "NaN": Case(
        lambda s: raw(s, {"@v": "NaN"}, requirements={"min_memory_gib": "@v"}),
        "requirements.min_memory_gib: not valid JSON at byte",
    ),
    "Infinity": Case(lambda s: raw(s, {"@v": "Infinity"}, requirements={"min_cpus": "@v"}), "found the character 'I'"),
    "negative requirement": Case(
        lambda s: raw(s, {"@v": "-1"}, requirements={"min_free_percent": "@v"}),
        "requirements.min_free_percent is -1, expected a percentage from 0 to 100",
    ),
    "a size in exponent form": Case(
        entry_field("VERSION", "size", 9e0), "files['VERSION'].size is 9.0, expected a number of bytes"
    ),
    "a size of 10^40": Case(
        lambda s: raw(s, {"@v": "1" + "0" * 40}, requirements={"free_bytes": "@v"}),
        "a number of 40 characters or more",
    ),
    # -- exact JSON types --------------------------------------------------------------
    "format true": Case(lambda s: signed(s, fields(format=True)), "format is true, expected 1"),
    "format 1.0": Case(lambda s: signed(s, fields(format=1.0)), "format is 1.0, expected 1"),
    "format text": Case(lambda s: signed(s, fields(format="1")), "format is text, expected 1"),
    "hooks []": Case(lambda s: signed(s, fields(hooks=[])), "hooks is a list, expected an object"),
    "migrations {}": Case(
        lambda s: signed(s, fields(migrations={})), "migrations is an object, expected a list of paths"
    ),
    "notes false": Case(lambda s: signed(s, fields(notes=False)), "notes is false, expected text"),
    "requirements null": Case(
        lambda s: signed(s, fields(requirements=None)), "requirements is null, expected an object"
    ),
    "requirements []": Case(lambda s: signed(s, fields(requirements=[])), "requirements is a list, expected an object"),
    "downtime 0": Case(lambda s: signed(s, fields(downtime=0)), "downtime is a number, expected true, false or null"),
    "dirs {}": Case(lambda s: signed(s, fields(dirs={})), "dirs is an object, expected a list of folder paths"),
    "files []": Case(lambda s: signed(s, fields(files=[])), "files is a list, expected an object"),
    "size true": Case(
        entry_field("VERSION", "size", True), "files['VERSION'].size is true, expected a number of bytes"
    ),
    "size as text": Case(
        entry_field("VERSION", "size", "9"), "files['VERSION'].size is text, expected a number of bytes"
    ),
    "min_version a number": Case(
        lambda s: signed(s, fields(min_version=3)), "min_version is a number, expected a version"
    ),
    "a key twice": Case(lambda s: raw(s, {"@d": '"a","notes":"b"'}, notes="@d"), "key 'notes' appears twice"),
    "a file's key twice": Case(
        lambda s: raw(
            s, {"@m": '"0644","mode":"0644"'}, files={"VERSION": {"size": 9, "sha256": "0" * 64, "mode": "@m"}}
        ),
        "expected exactly size, sha256 and mode, found 'mode'",
    ),
    "data after the manifest": Case(
        lambda s: signed(s, lambda length: json.dumps({"length": length, **fields()}).encode() + b"{}"),
        "data after the end of the JSON text",
    ),
    "key_id a number": Case(
        sig_text(b'{"algorithm":"ed25519","key_id":2026,"signature":""}'),
        "key_id is a number, expected the id of a key",
    ),
    "signature of the wrong length": Case(
        sig_text(b'{"algorithm":"ed25519","key_id":"vendor-2026","signature":"AAAA"}'),
        "signature is 3 bytes, an Ed25519 signature is 64",
    ),
    "an unknown signature key": Case(
        sig_text(b'{"algorithm":"ed25519","key_id":"vendor-2026","signature":"","by":"me"}'), "unknown key 'by'"
    ),
    "a lone surrogate in notes": Case(lambda s: raw(s, {"@v": '"\\ud800"'}, notes="@v"), "unpaired surrogate escape"),
    # -- versions and products are ASCII, matched whole --------------------------------
    "version with a trailing newline": Case(
        lambda s: signed(s, fields(version="3.19.274\n")), "version: '3.19.274\\n' is not a version"
    ),
    "version with fullwidth digits": Case(
        lambda s: signed(s, fields(version="３.19.274")), "version: '３.19.274' is not a version"
    ),
    "version with a Greek tag": Case(lambda s: signed(s, fields(version="3.19.274-β")), "is not a version"),
    "min_version with a leading space": Case(
        lambda s: signed(s, fields(min_version=" 3.19.0")), "min_version: ' 3.19.0' is not a version"
    ),
    "product with a newline": Case(lambda s: signed(s, fields(product="gts\n")), "product: expected a name like gts"),
    "product with fullwidth letters": Case(
        lambda s: signed(s, fields(product="ｇts")), "product: expected a name like gts"
    ),
    # -- modes ----------------------------------------------------------------------------
    "mode with a newline": Case(
        entry_field("VERSION", "mode", "0644\n"), "files['VERSION'].mode: expected permission bits"
    ),
    "mode with fullwidth digits": Case(
        entry_field("VERSION", "mode", "０６４４"), "expected permission bits like 0644"
    ),
    "mode 0o644": Case(entry_field("VERSION", "mode", "0o644"), "expected permission bits like 0644"),
    "mode 4755 in the manifest": Case(entry_field("bin/app", "mode", "4755"), "no setuid, setgid or sticky bit"),
    "payload/ folder 4755": Case(
        folder_entry_mode(0o4755), "member 'payload': mode 4755 has a setuid, setgid or sticky bit"
    ),
    "payload/ folder 1777": Case(folder_entry_mode(0o1777), "member 'payload': mode 1777 has a setuid"),
    "sub-folder 2755": Case(folder_entry_mode(0o2755, "hooks"), "member 'payload/hooks': mode 2755"),
    # -- the two gzip members --------------------------------------------------------------
    "head and payload in one gzip member": Case(one_member, "the first gzip member goes on after manifest.sig"),
    "an empty member between head and payload": Case(empty_member_between, "the second gzip member is empty"),
    "an empty member after the payload": Case(empty_member_after, "data follows the payload's gzip member"),
    "a second payload member": Case(second_payload_after, "data follows the payload's gzip member"),
    "manifest.json is a folder": Case(manifest_is_a_folder, "manifest.json is a folder, expected a regular file"),
    # -- names --------------------------------------------------------------------------------
    "a name in NFD": Case(named({"cafe\u0301.txt": b"x"}), "not in Unicode normal form NFC"),
    "README and readme": Case(
        named({"README": b"a", "readme": b"b"}), "'readme' and 'README' are one name on a case-insensitive"
    ),
    "straße and STRASSE": Case(named({"straße": b"a", "STRASSE": b"b"}), "are one name on a case-insensitive"),
    "a ligature and its letters": Case(named({"ﬁle": b"a", "file": b"b"}), "'file' and 'ﬁle' are one name"),
    "a folder and a file folding together": Case(
        named({"Docs/a": b"a", "docs": b"b"}, dirs=["Docs"]), "are one name on a case-insensitive"
    ),
    "a zero-width space": Case(named({"a\u200bb": b"x"}), "character '\\u200b' is not allowed"),
    "a right-to-left override": Case(named({"txt.\u202eexe": b"x"}), "character '\\u202e' is not allowed"),
    # -- hooks and migrations run as root ---------------------------------------------
    "a group-writable hook": Case(
        lambda s: signed(
            s,
            fields(modes={**MODES, "hooks/pre.sh": 0o775}, hooks={"pre_apply": "hooks/pre.sh"}),
            members(modes={**MODES, "hooks/pre.sh": 0o775}),
        ),
        "hooks.pre_apply 'hooks/pre.sh' has mode 0775: group- or world-writable",
    ),
    "a world-writable migration": Case(
        lambda s: signed(
            s,
            fields(modes={**MODES, "hooks/pre.sh": 0o757}, migrations=["hooks/pre.sh"]),
            members(modes={**MODES, "hooks/pre.sh": 0o757}),
        ),
        "migration 'hooks/pre.sh' has mode 0757",
    ),
    "a hook that is a folder": Case(
        lambda s: signed(s, fields(hooks={"post_apply": "bin"})), "hooks.post_apply 'bin' is not a file of the payload"
    ),
    "a migration listed twice": Case(
        lambda s: signed(s, fields(migrations=["bin/app", "bin/app"])), "migration 'bin/app' is listed twice"
    ),
    # -- the site's limits, before the model is built ----------------------------------
    "manifest above max_manifest_bytes": Case(
        lambda s: signed(s, fields(notes="n" * 5000)),
        "manifest.json is ",
        {"limits": {"max_manifest_bytes": 4096}},
    ),
    "more entries than max_members": Case(
        named({f"f{i}": b"x" for i in range(50)}),
        "the manifest lists more entries than limits.max_members (5)",
        {"limits": {"max_members": 5}},
    ),
}


def check_rejected(site: ArchiveSite, archive: Path, expect: str, before: dict[str, tuple[str, int]]) -> str:
    ctx = site.context(archive)
    with pytest.raises(ArchiveRejected) as rejection:
        validate.run(ctx)
    message = str(rejection.value)
    assert expect in message
    assert "\n" not in message
    assert not BYTES_REPR.search(message)  # never a Python bytes repr
    assert sorted(p.name for p in (site.platform / "releases").iterdir()) == [INSTALLED]
    assert not (site.platform / ".staging").exists()
    assert not site.reporter.updates
    return message


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_validate_refuses_each_class_in_one_line(tmp_path: Path, case: Case) -> None:
    # Given a platform with 3.19.273 live and the archive spooled for run 1
    site = ArchiveSite(tmp_path, **case.config)
    archive = case.build(site)
    before = tree(site.platform)

    # When validate runs, then it is rejected with its own line, and nothing is left behind
    check_rejected(site, archive, case.expect, before)
    assert tree(site.platform) == before


def dropgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )


VERIFY_CASES = {name: case for name, case in CASES.items() if not case.config}


@pytest.mark.parametrize("case", VERIFY_CASES.values(), ids=VERIFY_CASES.keys())
def test_dropgate_verify_refuses_each_class_in_one_line(tmp_path: Path, case: Case) -> None:
    site = ArchiveSite(tmp_path)
    archive = case.build(site)

    result = dropgate("verify", str(archive), "--key", str(site.public_key))

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == ""  # no traceback
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{NAME}: REJECTED: ")
    assert case.expect in lines[0]


def test_the_controls_pass_through_the_same_checks(tmp_path: Path) -> None:
    """The well-formed neighbours of the cases above are accepted (so the refusals are about the defect)."""
    site = ArchiveSite(tmp_path)
    controls = {
        "unicode names": named(
            {"données/été.txt": b"a", "文档/说明.txt": b"b", "Ωmega": b"c"}, dirs=["données", "文档"]
        ),
        "0644 and 644": lambda s: signed(
            s,
            manifest_fields({"a": b"1", "b": b"2"})
            | {
                "files": {
                    "a": {"size": 1, "sha256": manifest_fields({"a": b"1"})["files"]["a"]["sha256"], "mode": "644"},
                    "b": manifest_fields({"b": b"2"})["files"]["b"],
                }
            },
            members_for({"a": b"1", "b": b"2"}),
        ),
        "finite requirements": lambda s: signed(
            s,
            fields(requirements={"min_cpus": 2, "min_memory_gib": 0.5, "min_free_percent": 12.5, "free_bytes": 10**12}),
        ),
        "a 0755 hook": lambda s: signed(s, fields(hooks={"pre_apply": "hooks/pre.sh"}, migrations=["bin/app"])),
        "whitespace around the JSON": lambda s: signed(
            s,
            lambda length: (
                b'{"length" : ' + str(length).encode() + b" ,\n " + json.dumps(fields(), indent=2).encode()[1:] + b"\n"
            ),
        ),
    }
    for name, build in controls.items():
        archive = build(site)
        result = dropgate("verify", str(archive), "--key", str(site.public_key))
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        assert "REJECTED" not in result.stdout


def test_verify_says_the_requirements_are_well_formed(tmp_path: Path) -> None:
    site = ArchiveSite(tmp_path)
    archive = signed(site, fields(requirements={"min_cpus": 8, "free_bytes": 2 * 10**9}))

    result = dropgate("verify", str(archive), "--key", str(site.public_key))
    report = dropgate("verify", str(archive), "--key", str(site.public_key), "--json")

    assert result.returncode == 0, result.stdout
    assert "requirements well-formed: free_bytes 2000000000, min_cpus 8" in result.stdout
    assert json.loads(report.stdout)["manifest"]["requirements"] == {"min_cpus": 8, "free_bytes": 2 * 10**9}


# -- through the running daemon --------------------------------------------------------

DAEMON_SAMPLE = [
    "manifest.sig nested 4000 deep (unsigned)",
    "notes nested 200,000 deep",
    "free_bytes 1e999",
    "format true",
    "hooks []",
    "version with a trailing newline",
    "mode with a newline",
    "payload/ folder 4755",
    "head and payload in one gzip member",
    "an empty member after the payload",
    "README and readme",
    "a group-writable hook",
    "manifest.json is a folder",
]


def test_the_daemon_refuses_a_sample_of_every_class_and_goes_on(site: Site, tmp_path: Path) -> None:
    # Given a running daemon that trusts the forger's vendor key
    forger = ArchiveSite(tmp_path / "forger")
    site.write_config(trust={"keys": [str(forger.public_key)]})
    daemon = site.start_daemon()

    # When each hostile archive is dropped into the inbox, one after the other
    for run_id, name in enumerate(DAEMON_SAMPLE, start=1):
        archive = CASES[name].build(forger)
        site.drop(archive, NAME)
        run = site.wait_outcome(run_id, timeout=120)

        # Then each is rejected with its own one-line reason, kept aside with it
        assert run["outcome"] == "rejected", (name, run)
        assert CASES[name].expect in run["error"], name
        assert "\n" not in run["error"]
        assert CASES[name].expect in (site.state / "rejected" / f"{run_id}-{NAME}.reason").read_text()
    # nothing was installed or left in staging, and the daemon is still serving
    assert sorted(p.name for p in (site.platform / "releases").iterdir()) == ["1.0.0"]
    assert not (site.platform / ".staging").exists()
    assert daemon.alive()
    assert site.status()["gate"] == "idle"
    assert "Traceback" not in daemon.output()


# -- pack refuses what a receiver would refuse --------------------------------------------


@pytest.mark.parametrize(
    ("files", "modes", "manifest", "expect"),
    [
        ({"README": b"a", "readme": b"b"}, {}, {}, "are one name on a case-insensitive"),
        ({"cafe\u0301.txt": b"x"}, {}, {}, "not in Unicode normal form NFC"),
        (
            {"hooks/pre.sh": b"#!/bin/sh\n"},
            {"hooks/pre.sh": 0o775},
            {"hooks": {"pre_apply": "hooks/pre.sh"}},
            "mode 0775",
        ),
        ({"VERSION": b"1\n"}, {}, {"requirements": {"free_bytes": 1.5}}, "free_bytes is 1.5"),
    ],
    ids=["case fold", "NFD", "writable hook", "fractional bytes"],
)
def test_pack_refuses_what_a_receiver_would_refuse(
    tmp_path: Path, files: dict[str, bytes], modes: dict[str, int], manifest: dict[str, Any], expect: str
) -> None:
    site = ArchiveSite(tmp_path)
    with pytest.raises(ArchiveRejected, match="cannot pack") as refusal:
        site.pack("3.19.274", files, modes=modes, **manifest)
    assert expect in str(refusal.value)
    assert "\n" not in str(refusal.value)
    assert not list(site.build.glob("*.tgz"))
