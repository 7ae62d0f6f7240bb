"""The C library, loaded once, for the few system calls Python's `os` does not offer
(syncfs, renameat2 with flags, ioprio_set/get through syscall)."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    """The process's C library, with `errno` kept for `ctypes.get_errno()`."""
    return ctypes.CDLL(None, use_errno=True)
