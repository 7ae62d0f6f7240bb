"""Names inside an archive: the path rules of a release, and the archive's own file name.

"Letters" are Unicode letters (with their combining marks) and digits; the
rest of ASCII is limited to space and `._-+@=,~%`. A name must be in Unicode
normal form NFC, and no two names of one manifest may be equal after NFKC
normalization and case folding (a case-insensitive or normalizing filesystem
would take them as one file): that second rule lives with the entries
(`pipeline.archive.entries.folded`). Products and versions are ASCII.
"""

from __future__ import annotations

import re
import unicodedata

from pipeline.errors import ArchiveMisnamed
from pipeline.versions import Version

PRODUCT = re.compile(r"[a-z0-9][a-z0-9_-]*")
MAX_NAME_BYTES = 255  # one path component (NAME_MAX)
MAX_PATH_BYTES = 1024  # a whole path inside the release
NAME_PUNCTUATION = "._-+@=,~% "
_ASCII_NAME = re.compile(r"[A-Za-z0-9._\-+@=,~% ]+")
_SURROGATE_ESCAPE = re.compile(r"\\udc([89a-f][0-9a-f])")


def quote(name: str | bytes) -> str:
    """A name as it reads in a one-line message: quoted, escaped, shortened; bytes that are not UTF-8 as \\xNN."""
    text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
    shown = f"{text[:100]!r}… ({len(text)} characters)" if len(text) > 120 else repr(text)
    return _SURROGATE_ESCAPE.sub(r"\\x\1", shown)


def _allowed(char: str) -> bool:
    if char.isascii():
        return char.isalnum() or char in NAME_PUNCTUATION
    return unicodedata.category(char)[0] in "LMN"  # letters, their combining marks, digits


def path_problem(path: str) -> str | None:
    """What is wrong with `path` as a name inside a release, or None when it is acceptable.

    Relative, `/`-separated, no empty, `.` or `..` component, components of at
    most 255 bytes and paths of at most 1024 bytes (UTF-8), made of letters,
    digits, space and `._-+@=,~%` only, in Unicode normal form NFC, so that no
    name can reach outside the release nor mean anything to a shell.
    """
    if not path:
        return "empty name"
    if path.startswith("/"):
        return "absolute path (only paths relative to the release are allowed)"
    encoded = len(path.encode("utf-8", "surrogatepass"))
    if encoded > MAX_PATH_BYTES:
        return f"name of {encoded} bytes, longer than the {MAX_PATH_BYTES}-byte limit"
    for part in path.split("/"):
        if part == "..":
            return "'..' path component (it would escape the release folder)"
        if part in ("", "."):
            return "empty or '.' path component"
        size = len(part.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            return f"path component of {size} bytes, longer than the {MAX_NAME_BYTES}-byte limit"
        if _ASCII_NAME.fullmatch(part):
            continue
        for char in part:
            if not _allowed(char):
                allowed = NAME_PUNCTUATION.strip()
                return f"character {char!r} is not allowed in names (letters, digits, space and {allowed})"
    if not path.isascii() and not unicodedata.is_normalized("NFC", path):
        return "not in Unicode normal form NFC (write accented letters as one character each)"
    return None


def parse_archive_name(name: str) -> tuple[str, str]:
    """The product and version that an archive's file name `<product>.<version>.tgz` claims."""
    example = "expected <product>.<version>.tgz, e.g. gts.3.19.274.tgz"
    if not name.endswith(".tgz"):
        raise ArchiveMisnamed(f"archive name {quote(name)} does not end in .tgz ({example})")
    product, dot, version = name[: -len(".tgz")].partition(".")
    if not dot:
        raise ArchiveMisnamed(f"archive name {quote(name)} has no version ({example})")
    if not PRODUCT.fullmatch(product):
        raise ArchiveMisnamed(f"archive name {quote(name)} does not start with a product name ({example})")
    try:
        Version.parse(version)
    except ValueError:
        raise ArchiveMisnamed(f"archive name {quote(name)}: {quote(version)} is not a version ({example})") from None
    return product, version
