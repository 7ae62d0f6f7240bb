"""Validate on a real platform tree: a trust key file the site broke is the site's fault, not the archive's.

The run is still rejected (SPEC: a failure in validate), but by a SiteFault,
never an ArchiveRejected: the message says the archive was not judged, and
nothing of it is written anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.errors import ArchiveRejected, SiteFault
from states import validate
from tests.archive_helpers import ArchiveSite

FILES = {"VERSION": b"3.19.274\n", "bin/app": b"#!/bin/sh\necho app\n"}


def not_a_key(key: Path) -> str:
    key.write_text("ssh-ed25519 AAAA not-ours\n")
    return "is not a dropgate public key"


def missing(key: Path) -> str:
    key.unlink()
    return "No such file or directory"


def a_folder(key: Path) -> str:
    key.unlink()
    key.mkdir()
    return "Is a directory"


@pytest.mark.parametrize("damage", [not_a_key, missing, a_folder], ids=["not a key", "missing", "a folder"])
def test_an_unusable_trust_key_is_a_site_fault_and_nothing_is_written(
    tmp_path: Path, damage: Callable[[Path], str]
) -> None:
    # Given a good signed archive, and the site's trusted key file broken after it was signed
    site = ArchiveSite(tmp_path)
    ctx = site.context(site.pack("3.19.274", FILES, min_version="3.19.0"))
    detail = damage(site.public_key)
    releases_before = sorted(os.listdir(site.platform / "releases"))
    # When validate runs
    with pytest.raises(SiteFault) as fault:
        validate.run(ctx)
    # Then it fails for the site's reason, naming the key file, and says the archive was not judged
    message = str(fault.value)
    assert not isinstance(fault.value, ArchiveRejected)
    assert message.startswith("site problem: cannot authenticate, the trusted keys are unusable: trust.keys[0]: ")
    assert str(site.public_key) in message and detail in message
    assert "the archive itself was not judged" in message and "dropgate retry 1" in message
    assert "\n" not in message
    # and nothing was staged
    assert sorted(os.listdir(site.platform / "releases")) == releases_before
    assert not (site.platform / ".staging").exists()
