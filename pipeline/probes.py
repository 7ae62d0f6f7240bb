"""What the machine has: CPU cores, memory, filesystems (psutil by default).

The prerequisites and the preflight report read the machine only through a
`Probe`, so that a test can present a 2-core, 4 GiB, 95 %-full machine without
patching anything; `SystemProbe` is the real one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil


@dataclass(frozen=True)
class DiskUsage:
    """One filesystem as seen from a path on it.

    `free` is what an unprivileged process may still write (blocks reserved for
    root are not counted: a platform that fills them is already in trouble).
    `device` identifies the filesystem, so that paths on the same one are
    counted once; `mount` is where it is mounted, for the operator.
    """

    total: int
    free: int
    device: int
    mount: str

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free / self.total if self.total > 0 else 0.0


class Probe(Protocol):
    """The machine as the prerequisites see it."""

    def cpu_count(self) -> int:
        """CPU cores (logical) this process may run on."""
        ...

    def memory_bytes(self) -> int:
        """Total memory the kernel manages, in bytes."""
        ...

    def disk_usage(self, path: Path) -> DiskUsage:
        """The filesystem holding `path` (or its nearest existing parent, if it does not exist yet)."""
        ...


def existing_ancestor(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent (a folder not created yet)."""
    candidate = path.absolute()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding the existing `path`."""
    candidate = path.resolve()
    while not os.path.ismount(candidate) and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


class SystemProbe:
    """The real machine, through psutil and os.statvfs."""

    def cpu_count(self) -> int:
        logical = psutil.cpu_count(logical=True) or 1
        try:
            usable = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return logical
        return min(logical, usable) if usable else logical

    def memory_bytes(self) -> int:
        return int(psutil.virtual_memory().total)

    def disk_usage(self, path: Path) -> DiskUsage:
        where = existing_ancestor(path)
        try:
            usage = psutil.disk_usage(str(where))
            device = where.stat().st_dev
        except FileNotFoundError:
            # Removed between the two looks (a named race): measure its parent instead.
            if where == where.parent:
                raise
            return self.disk_usage(where.parent)
        return DiskUsage(total=int(usage.total), free=int(usage.free), device=device, mount=str(mount_point(where)))
