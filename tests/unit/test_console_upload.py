"""The import's streaming receiver on a real inbox folder: hostile forms, limits, chunk edges, leftovers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.console.upload import MARK, Receiver, Upload, Uploads, remove_stale_parts
from pipeline.errors import UploadRefused
from tests.conftest import cannot_run

BOUNDARY = "b0undary"
TOKEN = "the-token"


def form(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart body of (field name, file name or None, content)."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def receiver(inbox: Path, max_bytes: int = 1 << 20) -> Receiver:
    upload = Upload(1, "", "alice", "192.0.2.1", 0, 0.0)
    return Receiver(
        upload,
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
        inbox=inbox,
        max_bytes=max_bytes,
        csrf_ok=lambda token: token == TOKEN,
    )


def push(rx: Receiver, body: bytes, chunk: int = 4096) -> Path:
    try:
        for start in range(0, len(body), chunk):
            rx.write(rx.feed(body[start : start + chunk]))
        return rx.finish()
    except BaseException:
        rx.abandon()
        raise


def test_a_good_form_lands_in_the_inbox_under_its_name_with_its_hash(tmp_path: Path) -> None:
    content = bytes(range(256)) * 1000
    rx = receiver(tmp_path)
    target = push(rx, form(("csrf", None, TOKEN.encode()), ("archive", "gts.1.2.3.tgz", content)))
    assert target == tmp_path / "gts.1.2.3.tgz"
    assert target.read_bytes() == content
    assert rx.upload.sha256 == hashlib.sha256(content).hexdigest() and rx.upload.size == len(content)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gts.1.2.3.tgz"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=3000), chunk=st.integers(min_value=1, max_value=700))
def test_any_chunking_of_any_content_gives_the_same_file(
    tmp_path_factory: pytest.TempPathFactory, content: bytes, chunk: int
) -> None:
    inbox = tmp_path_factory.mktemp("inbox")
    # content that looks like the boundary's start must not confuse the parser
    content = content.replace(b"\r\n--" + BOUNDARY.encode(), b"")
    target = push(receiver(inbox), form(("csrf", None, TOKEN.encode()), ("archive", "gts.1.0.1.tgz", content)), chunk)
    assert target.read_bytes() == content


@pytest.mark.parametrize("size", [0, 1, 1024, 4096])
def test_the_limit_is_inclusive_and_one_byte_more_is_refused_leaving_nothing(tmp_path: Path, size: int) -> None:
    ok = receiver(tmp_path / "ok", max_bytes=size)
    (tmp_path / "ok").mkdir()
    landed = push(ok, form(("csrf", None, TOKEN.encode()), ("archive", "gts.1.0.1.tgz", b"x" * size)))
    assert landed.stat().st_size == size
    (tmp_path / "over").mkdir()
    over = receiver(tmp_path / "over", max_bytes=size)
    with pytest.raises(UploadRefused) as refused:
        push(over, form(("csrf", None, TOKEN.encode()), ("archive", "gts.1.0.1.tgz", b"x" * (size + 1))), chunk=1)
    assert refused.value.status == 413
    assert "limits.max_archive_bytes" in str(refused.value)
    assert list((tmp_path / "over").iterdir()) == []


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (form(("archive", "gts.1.0.1.tgz", b"data")), 403, "security token is missing"),
        (form(("csrf", None, b"wrong"), ("archive", "gts.1.0.1.tgz", b"data")), 403, "security token"),
        (form(("archive", "gts.1.0.1.tgz", b"data"), ("csrf", None, TOKEN.encode())), 403, "security token"),
        (form(("csrf", None, TOKEN.encode()), ("other", "gts.1.0.1.tgz", b"data")), 400, "unexpected file"),
        (
            form(
                ("csrf", None, TOKEN.encode()), ("archive", "gts.1.0.1.tgz", b"a"), ("archive", "gts.1.0.2.tgz", b"b")
            ),
            400,
            "unexpected file",
        ),
        (form(("csrf", None, TOKEN.encode())), 400, "no file was chosen"),
        (form(("csrf", None, b"x" * 5000), ("archive", "gts.1.0.1.tgz", b"a")), 400, "field of the form is too long"),
        (form(("csrf", None, TOKEN.encode()), ("archive", "/etc/passwd", b"a")), 400, "cannot be an archive name"),
        (form(("csrf", None, TOKEN.encode()), ("archive", "..", b"a")), 400, "cannot be an archive name"),
        (form(("csrf", None, TOKEN.encode()), ("archive", "gts.1.0.1.tgz", b"x" * 100))[:-30], 400, "ended before"),
        (b"garbage without any boundary at all", 400, "not a well-formed form"),
    ],
)
def test_a_hostile_or_broken_form_is_refused_and_leaves_nothing(
    tmp_path: Path, body: bytes, status: int, message: str
) -> None:
    with pytest.raises(UploadRefused) as refused:
        push(receiver(tmp_path), body)
    assert refused.value.status == status
    assert message in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_oversized_part_headers_are_refused(tmp_path: Path) -> None:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrf"\r\nX-Pad: {"p" * 9000}\r\n\r\n{TOKEN}\r\n'
    ).encode()
    with pytest.raises(UploadRefused, match=r"oversized headers|Maximum header size"):
        push(receiver(tmp_path), body)


def test_a_name_already_in_the_inbox_or_being_uploaded_is_refused_and_the_other_file_kept(tmp_path: Path) -> None:
    (tmp_path / "gts.1.0.1.tgz").write_bytes(b"dropped over sftp")
    (tmp_path / "gts.1.0.2.tgz.part").write_bytes(b"another upload")
    for name, expected in (("gts.1.0.1.tgz", "already in the inbox"), ("gts.1.0.2.tgz", "being uploaded already")):
        with pytest.raises(UploadRefused, match=expected) as refused:
            push(receiver(tmp_path), form(("csrf", None, TOKEN.encode()), ("archive", name, b"new")))
        assert refused.value.status == 409
    assert (tmp_path / "gts.1.0.1.tgz").read_bytes() == b"dropped over sftp"
    assert (tmp_path / "gts.1.0.2.tgz.part").read_bytes() == b"another upload"


def test_a_cut_upload_is_removed_by_abandon(tmp_path: Path) -> None:
    rx = receiver(tmp_path)
    body = form(("csrf", None, TOKEN.encode()), ("archive", "gts.1.0.1.tgz", b"z" * 100_000))
    rx.write(rx.feed(body[:50_000]))
    assert (tmp_path / "gts.1.0.1.tgz.part").stat().st_size > 0
    rx.abandon()
    rx.abandon()  # twice is harmless (the error path and the shutdown path may both run it)
    assert list(tmp_path.iterdir()) == []


def test_only_a_multipart_form_is_accepted(tmp_path: Path) -> None:
    upload = Upload(1, "", "alice", "a", 0, 0.0)
    for content_type in ("application/octet-stream", "multipart/form-data", "text/plain; boundary=x", ""):
        with pytest.raises(UploadRefused) as refused:
            Receiver(upload, content_type=content_type, inbox=tmp_path, max_bytes=10, csrf_ok=lambda _t: True)
        assert refused.value.status == 415


def test_at_most_the_limit_of_uploads_receive_at_once() -> None:
    uploads = Uploads(limit=2)
    first = uploads.begin(account="a", address="x", expected=1, first_run=0)
    uploads.begin(account="b", address="x", expected=1, first_run=0)
    with pytest.raises(UploadRefused) as refused:
        uploads.begin(account="c", address="x", expected=1, first_run=0)
    assert refused.value.status == 503
    first.state = "complete"
    assert uploads.begin(account="c", address="x", expected=1, first_run=0).account == "c"
    assert [u.account for u in uploads.receiving()] == ["b", "c"]


def test_after_a_crash_only_the_consoles_own_parts_are_removed(tmp_path: Path) -> None:
    # Given a console upload cut by a crash (nothing ran abandon) and an SFTP client's .part beside it
    rx = receiver(tmp_path)
    rx.write(rx.feed(form(("csrf", None, TOKEN.encode()), ("archive", "gts.1.0.1.tgz", b"z" * 10_000))[:5000]))
    if not _has_xattrs(tmp_path / "gts.1.0.1.tgz.part"):
        cannot_run(f"the filesystem of {tmp_path} keeps no user extended attributes")
    (tmp_path / "gts.1.0.2.tgz.part").write_bytes(b"an sftp upload, resumable")
    (tmp_path / "gts.1.0.3.tgz").write_bytes(b"a dropped archive")
    # When the console starts again
    removed = remove_stale_parts(tmp_path)
    # Then its own .part is gone and nothing else was touched
    assert removed == ["gts.1.0.1.tgz.part"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gts.1.0.2.tgz.part", "gts.1.0.3.tgz"]
    rx.abandon()


def _has_xattrs(path: Path) -> bool:
    try:
        return os.getxattr(path, MARK) == b"1"
    except OSError:
        return False
