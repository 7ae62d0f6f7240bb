"""How a finished import or download enters the inbox: renamed in under its name, never over another entry.

The console's import and the nightly fetch write `<name>.part` in the inbox and
rename it to `<name>` once complete. Another uploader (SFTP, a second browser)
may create `<name>` at the same instant; a check followed by `rename` would
then replace their file. `renameat2(RENAME_NOREPLACE)` makes the check and the
rename one step; on a filesystem without it, `link` (which never replaces)
then `unlink` does the same, the new file briefly having two names (the inbox
copies such a file rather than taking it, so nothing is lost either way).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

from pipeline.libc import libc

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def move_in(part: Path, target: Path) -> None:
    """Rename `part` to `target` unless `target` exists (a file, a folder, a link, even a dangling one).

    FileExistsError naming `target` if it does; `part` is then left as it was.
    """
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(part), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(part), None, str(target))
    os.link(part, target, follow_symlinks=False)
    os.unlink(part)


def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2 (glibc 2.28 and later), None where it has none."""
    return getattr(libc(), "renameat2", None)
