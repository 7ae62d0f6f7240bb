"""Names inside an archive: the path rules of a release, and the archive's own file name."""

from __future__ import annotations

import re

from pipeline.errors import ArchiveRejected
from pipeline.versions import Version

PRODUCT = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
MAX_NAME_BYTES = 255  # one path component (NAME_MAX)
MAX_PATH_BYTES = 1024  # a whole path inside the release
NAME_PUNCTUATION = "._-+@=,~% "


def quote(name: str | bytes) -> str:
    """A name as it reads in a one-line message: quoted, escaped, shortened."""
    if len(name) > 120:
        return f"{name[:100]!r}… ({len(name)} characters)"
    return repr(name)


def path_problem(path: str) -> str | None:
    """What is wrong with `path` as a name inside a release, or None when it is acceptable.

    Relative, `/`-separated, no empty, `.` or `..` component, components of at
    most 255 bytes and paths of at most 1024 bytes (UTF-8), made of letters,
    digits, space and `._-+@=,~%` only, so that no name can reach outside the
    release nor mean anything to a shell.
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
        for char in part:
            if not (char.isalnum() or char in NAME_PUNCTUATION):
                allowed = NAME_PUNCTUATION.strip()
                return f"character {char!r} is not allowed in names (letters, digits, space and {allowed})"
    return None


def parse_archive_name(name: str) -> tuple[str, str]:
    """The product and version that an archive's file name `<product>.<version>.tgz` claims."""
    example = "expected <product>.<version>.tgz, e.g. gts.3.19.274.tgz"
    if not name.endswith(".tgz"):
        raise ArchiveRejected(f"archive name {quote(name)} does not end in .tgz ({example})")
    product, dot, version = name[: -len(".tgz")].partition(".")
    if not dot:
        raise ArchiveRejected(f"archive name {quote(name)} has no version ({example})")
    if not PRODUCT.match(product):
        raise ArchiveRejected(f"archive name {quote(name)} does not start with a product name ({example})")
    try:
        Version.parse(version)
    except ValueError:
        raise ArchiveRejected(f"archive name {quote(name)}: {version!r} is not a version ({example})") from None
    return product, version
