"""Linking the unchanged files of a large snapshot in a helper process, beside the walk.

A later snapshot costs, per unchanged file, a `link` and an `lstat` in the kernel
and the walk's own work in the interpreter (its `lstat` of the live file, the
comparison with the previous line, the manifest): about as much of each. Threads
cannot share that out (each system call hands the interpreter lock back and forth),
so the links are made by a small helper process: the walk sends it each folder's
unchanged files in one message and goes on while the helper links them, on the
other core. The files still hold their place in the manifest (its lines are
written in walk order when the answers come back), and every link is checked
where it landed exactly as `copier.link_previous` does: its lstat must have the
recorded size, mtime and mode, else the link is removed and the file copied.

The helper is a fresh interpreter (`-I -S`: no site, no environment) that reads
batches on its stdin and answers on its stdout. It dies with the thread that
started it (PR_SET_PDEATHSIG: a daemon killed with SIGKILL takes it along) and
ends when its stdin closes; a snapshot that stops kills it and waits for it
before its partial folder is removed.

Messages (little-endian): a batch is `<IIII` (batch, count, length of the folders,
length of the names), the previous folder and the new one separated by a NUL, the
file names separated by NULs (a name is the same in both folders), then `<q` mode,
size and mtime_ns per file; the answer is `<II` (batch, count) and one `<i` per
file: 0 linked, -1 not linked (copy it), else an errno.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future

HELPER = r"""
import ctypes, errno, os, signal, struct, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed with the snapshot's thread
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)  # the daemon died before the line above
inp, out = sys.stdin.buffer, sys.stdout.buffer
out.write(b"R")  # ready
out.flush()
REFUSED = (errno.ENOENT, errno.ENOTDIR, errno.EMLINK, errno.EXDEV, errno.EPERM, errno.ELOOP)
FOLDER = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
def exact(n):
    data = inp.read(n)
    if len(data) != n:
        sys.exit(0)
    return data
def open_folders(previous_folder, folder):
    fd = os.open(folder, FOLDER)
    try:
        return os.open(previous_folder, FOLDER), fd
    except OSError as error:
        os.close(fd)
        raise
while True:
    batch, count, folders_length, names_length = struct.unpack("<IIII", exact(16))
    previous_folder, folder = exact(folders_length).split(b"\0")
    names = exact(names_length).split(b"\0")
    expected = struct.unpack(f"<{3 * count}q", exact(24 * count))
    try:
        source, fd = open_folders(previous_folder, folder)
    except OSError as error:
        codes = [-1 if error.errno in REFUSED else (error.errno or errno.EIO)] * count
    else:
        codes = []
        for n, name in enumerate(names):
            try:
                os.link(name, name, src_dir_fd=source, dst_dir_fd=fd, follow_symlinks=False)
            except OSError as error:
                codes.append(-1 if error.errno in REFUSED else (error.errno or errno.EIO))
                continue
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if (info.st_mode, info.st_size, info.st_mtime_ns) == expected[3 * n : 3 * n + 3]:
                    codes.append(0)
                    continue
                os.unlink(name, dir_fd=fd)
                codes.append(-1)
            except OSError as error:
                codes.append(error.errno or errno.EIO)
        os.close(source)
        os.close(fd)
    out.write(struct.pack(f"<II{count}i", batch, count, *codes))
    out.flush()
"""

START_SECONDS = 10.0
REFUSED = -1  # not linked: the previous copy is gone or not as recorded; copy the file instead

class LinkHelper:
    """The helper process; `submit` sends one folder's files and returns the future of their codes."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", HELPER, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self._ready()
        self._pending: dict[int, Future[list[int]]] = {}
        self._ended: OSError | None = None  # the helper stopped: every batch from then on fails with this
        self._lock = threading.Lock()
        self._batches = 0
        self._reader = threading.Thread(target=self._read, name="snapshot-links", daemon=True)
        self._reader.start()

    def _ready(self) -> None:
        """Wait for the helper's first byte; OSError (the walk then links by itself) if it does not come."""
        stdout = self._process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], START_SECONDS)
        if ready and stdout.read(1) == b"R":
            return
        self._process.kill()
        self._process.wait()
        raise OSError(errno.ECHILD, f"the snapshot's link helper did not start within {START_SECONDS:g} s")

    def submit(
        self, previous_folder: str, folder: str, names: Sequence[str], expected: Sequence[int]
    ) -> Future[list[int]]:
        """Link `previous_folder/<name>` to `folder/<name>` for each name; `expected`: the mode, size and mtime
        (ns) each link must have, three numbers a name. The future's codes, one a name: 0, REFUSED or an errno."""
        future: Future[list[int]] = Future()
        with self._lock:
            if self._ended is not None:
                future.set_exception(self._ended)
                return future
            self._batches += 1
            batch = self._batches
            self._pending[batch] = future
        folders = os.fsencode(f"{previous_folder}\0{folder}")
        listed = os.fsencode("\0".join(names))
        message = b"".join((
            struct.pack("<IIII", batch, len(names), len(folders), len(listed)),
            folders,
            listed,
            struct.pack(f"<{len(expected)}q", *expected),
        ))
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(message)
            stdin.flush()
        except OSError as error:
            self._fail(OSError(error.errno, f"the snapshot's link helper stopped ({error.strerror})"))
        return future

    def close(self) -> None:
        """Kill the helper and wait for it: once this returns, nothing more is linked (every answer the
        snapshot waited for has come; after a failure, what is still queued is dropped)."""
        self._process.kill()
        if self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        self._process.wait()
        self._reader.join()

    def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        while True:
            head = stdout.read(8)
            if len(head) != 8:
                break
            batch, count = struct.unpack("<II", head)
            body = stdout.read(4 * count)
            if len(body) != 4 * count:
                break
            with self._lock:
                future = self._pending.pop(batch)
            future.set_result(list(struct.unpack(f"<{count}i", body)))
        stdout.close()
        self._fail(OSError(errno.EPIPE, "the snapshot's link helper stopped before it answered"))

    def _fail(self, error: OSError) -> None:
        with self._lock:
            self._ended = self._ended or error
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
