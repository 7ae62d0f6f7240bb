"""Site faults: which failures are the site's (not the archive's), and how they are said.

A full disk, a permission, a missing folder or an unusable trust key file stop
a run before the archive could be judged. Such a run is still `rejected`
(SPEC: a failure in validate or prereq), but its `fault` is `site`: the bytes
are not locked out as a repeat, and the message says what to fix and that the
archive may simply be dropped again.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from pipeline.errors import SiteFault

_KINDS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "missing file or folder",
    errno.ENOTDIR: "missing folder",
}


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, or what it was explicitly raised from (`raise ... from`)."""
    current: BaseException | None = error
    for _ in range(5):
        if current is None or isinstance(current, OSError):
            return current
        current = current.__cause__
    return None


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding `path` (or its nearest existing parent)."""
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    current = current.resolve()
    device = current.stat().st_dev
    while current != current.parent and current.parent.stat().st_dev == device:
        current = current.parent
    return current


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def site_fault(
    error: BaseException, *, doing: str, run_id: int, path: Path | None = None, needed: int | None = None
) -> SiteFault | None:
    """A SiteFault saying what the site lacked while `doing`, or None when `error` is not the site's."""
    cause = os_error_of(error)
    if cause is None or cause.errno not in _KINDS:
        return None
    where = Path(cause.filename) if isinstance(cause.filename, str) else path
    detail = ""
    if cause.errno in (errno.ENOSPC, errno.EDQUOT) and where is not None:
        try:
            mount = mount_point(where)
            free = shutil.disk_usage(mount).free
            need = f"needed ~{_bytes(needed)}, " if needed else ""
            detail = f" ({need}{_bytes(free)} free on {mount})"
        except OSError:
            pass
    place = f" on {where}" if cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else f": {where}"
    if where is None:
        place = ""
    return SiteFault(
        f"site problem: {_KINDS[cause.errno]}{place} while {doing}{detail}; "
        f"the archive itself was not judged: fix it, then drop it again or `dropgate retry {run_id}`"
    )
