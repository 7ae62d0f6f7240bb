"""The intake: a taken file becomes a run only once it is fully screened.

    inbox/<name>
      → <state>/intake/<arrival>-<inode>/<name>   rename; the moved inode must be the one examined
      → dropgate's own file                        owner and mode set, or the bytes copied into a new file
      → hashed on a worker thread                  the watcher goes on taking other files meanwhile
      → screened                                   size, announced length, the same bytes run before
      → spool/<id>/<name>  or  rejected/<id>-<name> with its `.reason`

The last move happens inside the journal transaction that creates the run
(`Journal.add_run(place=...)`), so a run never exists before its file is in
place, hashed and screened. A crash leaves the file in `intake/` (finished at
the next start by `recover`) or under the one id that has no run yet (moved
back into `intake/`); never a runnable unscreened run, never a lost file.
Runs are created in the order uploads completed, a batch at a time (the files
the watcher took together), so one big file being hashed holds back the runs
of files that completed after it — their order is the contract — but not
their taking.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import queue
import re
import stat as stat_module
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.inbox.files import (
    DIR_FLAGS,
    Lease,
    announced_length_of,
    drop_lease,
    is_written,
    kind_of,
    name_refusal,
    open_entry,
    printable,
    read_head,
    recorded_name,
    same_file,
    take_lease,
)
from pipeline.inbox.order import name_key
from pipeline.journal import Journal

log = logging.getLogger("dropgate")

HASH_CHUNK = 1 << 20
HASH_WORKERS = 2
TAKEN_MODE = 0o640  # the daemon's, readable by the state folder's group (admins), by no uploader
COPY_SUFFIX = ".copy"
_TOKEN = re.compile(r"(\d+)-\d+(?:\.\d+)?")
_ORPHAN_REJECTED = re.compile(r"(\d+)-(.+)", re.DOTALL)
_NAME_MAX = 255


class _Cancelled(Exception):
    """The daemon is stopping: the item stays in intake/ and is finished at the next start."""


@dataclass
class Item:
    """One file between the inbox and its run."""

    token: str  # its folder under intake/
    name: str
    arrival_ns: int  # when its upload completed (ctime before dropgate touched it)
    batch: int  # taken together with the other items of its batch
    fd: int | None = None
    copy: str = ""  # why it is copied rather than kept (empty: it is kept)
    refusal: str | None = None
    sha256: str | None = None
    size: int | None = None
    done: bool = False
    logged: bool = False


class Intake:
    """Holds taken files until they are screened, then creates their runs in order."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        *,
        on_published: Callable[[int], None],
        wake: Callable[[], None],
        now: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.journal = journal
        self.on_published = on_published
        self.wake = wake
        self.now = now
        state = config.paths.state
        self.folder = state / "intake"
        self.spool = state / "spool"
        self.rejected = state / "rejected"
        self._items: dict[str, Item] = {}
        self._lock = threading.Lock()
        self._jobs: queue.Queue[Item | None] = queue.Queue()
        self._cancel = threading.Event()
        self._workers: list[threading.Thread] = []
        self._tokens = itertools.count()
        self._dir_fd = -1
        self._uid = os.geteuid()
        self._gid = -1

    # -- start and stop ---------------------------------------------------------------
    def open(self) -> None:
        for folder in (self.folder, self.spool, self.rejected):
            folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o750)
        self._dir_fd = os.open(self.folder, DIR_FLAGS)
        self._gid = os.fstat(self._dir_fd).st_gid
        for number in range(HASH_WORKERS):
            worker = threading.Thread(target=self._work, name=f"dropgate-intake-{number}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        """Cancel hashing (each worker stops within one chunk) and let go of every descriptor."""
        self._cancel.set()
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(timeout=2)
        with self._lock:
            for item in self._items.values():
                if item.fd is not None and not any(w.is_alive() for w in self._workers):
                    with contextlib.suppress(OSError):
                        os.close(item.fd)
                    item.fd = None

    # -- what the watcher asks ------------------------------------------------------------
    def pending(self) -> list[float]:
        """Arrival times of the files taken and not yet runs."""
        with self._lock:
            return [item.arrival_ns / 1e9 for item in self._items.values()]

    def size_refusal(self, name: str, size: int, announced: int | None) -> str | None:
        """Why a file of `size` bytes that announces `announced` is refused before a byte of it is read."""
        limit = self.config.limits.max_archive_bytes
        shown = printable(name)
        if size > limit:
            return (
                f"{shown} is {size} bytes, above limits.max_archive_bytes ({limit}); "
                "it was refused before any of it was read"
            )
        if announced is not None and size > announced:
            return f"{shown} is {size} bytes but its manifest announces {announced}: data was appended to it"
        if announced is not None and size < announced:
            return f"incomplete upload: {shown} has {size} of its {announced} bytes"
        return None

    def take(
        self,
        name: str,
        inbox_fd: int,
        fd: int,
        info: os.stat_result,
        batch: int,
        *,
        announced: int | None,
        refusal: str | None = None,
    ) -> bool:
        """Take the regular file `name`, open as `fd` (`info`: its fstat now): False while a process writes it.

        Size and announced length are judged before a byte of content is read; a
        refused file is moved aside the same way. Every later step goes through
        `fd`, which belongs to the intake once True is returned.
        """
        lease = take_lease(fd)
        if lease is Lease.WRITTEN:
            return False
        refusal = refusal or name_refusal(name) or self.size_refusal(name, info.st_size, announced)
        try:
            # Under the lease no one can open the file for writing: make it dropgate's first,
            # then an uploader who tries afterwards is refused by its owner and mode.
            owned = refusal is None and self._own(fd, info)
            token, moved = self._move_in(name, inbox_fd, info)
        finally:
            if lease is Lease.HELD:
                drop_lease(fd)
        if moved is None:
            os.close(fd)
            return True
        item = Item(token, name, info.st_ctime_ns, batch)
        if not same_file(moved, info):
            os.close(fd)
            swapped = f"{printable(name)} was replaced by another file while it was being taken; nothing of it is run"
            self._screen(item, reason=swapped, note=" (it replaced the file that was being taken)")
            return True
        item.fd = fd
        if refusal is not None:
            self._refuse(item, refusal)
        else:
            self._prepare(item, owned=owned)
        return True

    def set_aside(self, name: str, inbox_fd: int, info: os.stat_result, batch: int, reason: str | None) -> None:
        """Move `name` (not to be opened: not a regular file, or refused as it is) into intake and refuse it."""
        token, moved = self._move_in(name, inbox_fd, info)
        if moved is None:
            return
        item = Item(token, name, info.st_ctime_ns, batch)
        self._screen(item, reason=reason if same_file(moved, info) else None)

    # -- moving in ---------------------------------------------------------------------
    def _new_token(self, arrival_ns: int, ino: int) -> str:
        while True:
            token = f"{arrival_ns}-{ino}.{next(self._tokens)}"
            try:
                os.mkdir(token, mode=0o750, dir_fd=self._dir_fd)
            except FileExistsError:
                continue
            return token

    def _move_in(self, name: str, inbox_fd: int, info: os.stat_result) -> tuple[str, os.stat_result | None]:
        """Rename `name` from the inbox into a new intake folder; what arrived there (None: it vanished)."""
        token = self._new_token(info.st_ctime_ns, info.st_ino)
        folder_fd = os.open(token, DIR_FLAGS, dir_fd=self._dir_fd)
        try:
            try:
                os.rename(name, name, src_dir_fd=inbox_fd, dst_dir_fd=folder_fd)
            except FileNotFoundError:
                os.rmdir(token, dir_fd=self._dir_fd)
                return token, None
            except OSError as error:
                os.rmdir(token, dir_fd=self._dir_fd)
                log.warning("inbox: cannot move %s out of the inbox: %s", printable(name), error.strerror)
                return token, None
            return token, os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        finally:
            os.close(folder_fd)

    def _own(self, fd: int, info: os.stat_result) -> bool:
        """Make the open file dropgate's: its owner, the state folder's group, mode 0640. False if not allowed."""
        try:
            if (info.st_uid, info.st_gid) != (self._uid, self._gid):
                os.fchown(fd, self._uid, self._gid)
            os.fchmod(fd, TAKEN_MODE)
        except PermissionError:
            return False
        return True

    def _screen(self, item: Item, *, reason: str | None = None, note: str = "") -> None:
        """Look at what lies in the item's intake folder (nothing else can reach it) and go on with it."""
        with self._lock:
            self._items[item.token] = item
        folder_fd = os.open(item.token, DIR_FLAGS, dir_fd=self._dir_fd)
        try:
            info = os.stat(item.name, dir_fd=folder_fd, follow_symlinks=False)
            if not stat_module.S_ISREG(info.st_mode):
                self._refuse(item, self._describe(item.name, info, folder_fd) + note)
                return
            reason = reason or name_refusal(item.name)
            if reason is not None:
                self._refuse(item, reason)
                return
            fd = open_entry(item.name, folder_fd)
        finally:
            os.close(folder_fd)
        try:
            info = os.fstat(fd)
            refusal = self.size_refusal(item.name, info.st_size, announced_length_of(read_head(fd)))
        except OSError as error:
            os.close(fd)
            self._refuse(item, f"{printable(item.name)} cannot be read: {error.strerror}")
            return
        if refusal is not None:
            os.close(fd)
            self._refuse(item, refusal)
            return
        item.fd = fd
        self._prepare(item, owned=self._own(fd, info))

    def _describe(self, name: str, info: os.stat_result, folder_fd: int) -> str:
        shown = printable(name)
        if stat_module.S_ISLNK(info.st_mode):
            try:
                target = printable(os.readlink(name, dir_fd=folder_fd))
            except OSError as error:
                target = f"(its target cannot be read: {error.strerror})"
            return f"{shown} is a symbolic link to {target}; only regular files are taken"
        return f"{shown} is {kind_of(info.st_mode)}; only regular files are taken"

    def _refuse(self, item: Item, reason: str) -> None:
        if item.fd is not None:
            os.close(item.fd)
            item.fd = None
        item.refusal = reason
        with self._lock:
            self._items[item.token] = item
            item.done = True
        self.wake()

    def _prepare(self, item: Item, *, owned: bool) -> None:
        """Decide whether the file can be kept as it is, or must be copied; then hash it on a worker."""
        assert item.fd is not None
        info = os.fstat(item.fd)
        why = []
        if not owned:
            why.append("it could not be made dropgate's own (owner and mode)")
        if info.st_nlink != 1:
            why.append(f"it has {info.st_nlink} names (hard links)")
        written = is_written(item.fd)
        if written:
            why.append("a process had it open for writing")
        elif written is None:
            why.append("whether a process still writes it cannot be checked here")
        item.copy = "; ".join(why)
        with self._lock:
            self._items[item.token] = item
        self._jobs.put(item)

    # -- hashing (worker threads) -------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None or self._cancel.is_set():
                return
            try:
                if item.copy:
                    self._copy_and_hash(item)
                else:
                    self._hash(item)
            except _Cancelled:
                return
            except _CopyFailed as error:
                item.refusal = f"{printable(item.name)}: {error.strerror}"
            except OSError as error:
                item.refusal = f"{printable(item.name)} cannot be read: {error.strerror or error}"
            except Exception as error:  # never leave an item half-done: it is refused with the cause
                log.exception("inbox: hashing %s failed", printable(item.name))
                item.refusal = f"{printable(item.name)} could not be hashed: {error!r}"
            with self._lock:
                item.done = True
            self.wake()

    def _hash(self, item: Item) -> None:
        """SHA-256 of the kept file, read through its descriptor; it must not change meanwhile."""
        assert item.fd is not None
        before = os.fstat(item.fd)
        digest = hashlib.sha256()
        offset = 0
        while chunk := self._read(item.fd, offset):
            digest.update(chunk)
            offset += len(chunk)
        after = os.fstat(item.fd)
        if before.st_size != offset or (after.st_size, after.st_mtime_ns) != (offset, before.st_mtime_ns):
            shown = printable(item.name)
            item.refusal = f"{shown} changed while it was read ({before.st_size} → {after.st_size} bytes)"
            return
        item.sha256, item.size = digest.hexdigest(), offset

    def _copy_and_hash(self, item: Item) -> None:
        """Copy the bytes into a new file only dropgate can write, hashing what is copied; the copy replaces it."""
        assert item.fd is not None
        limit = self.config.limits.max_archive_bytes
        folder_fd = os.open(item.token, DIR_FLAGS, dir_fd=self._dir_fd)
        copy_name = item.name + COPY_SUFFIX if len(os.fsencode(item.name)) + 5 <= _NAME_MAX else COPY_SUFFIX
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy_name, dir_fd=folder_fd)
            out = os.open(copy_name, flags, TAKEN_MODE, dir_fd=folder_fd)
            try:
                digest = hashlib.sha256()
                offset = 0
                while chunk := self._read(item.fd, offset):
                    if offset + len(chunk) > limit:
                        item.refusal = (
                            f"{printable(item.name)} grew past limits.max_archive_bytes ({limit}) while it was copied"
                        )
                        break
                    digest.update(chunk)
                    offset += len(chunk)
                    self._write(out, chunk)
                else:
                    os.fsync(out)
            finally:
                os.close(out)
            if item.refusal is not None:
                os.unlink(copy_name, dir_fd=folder_fd)
                return
            os.replace(copy_name, item.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        finally:
            os.close(folder_fd)
        os.close(item.fd)
        item.fd = None
        item.sha256, item.size = digest.hexdigest(), offset

    def _read(self, fd: int, offset: int) -> bytes:
        if self._cancel.is_set():
            raise _Cancelled()
        return os.pread(fd, HASH_CHUNK, offset)

    @staticmethod
    def _write(fd: int, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            try:
                written = os.write(fd, view)
            except OSError as error:
                raise _CopyFailed(error) from error
            view = view[written:]

    # -- creating the runs (the watcher's thread) -----------------------------------------------
    def publish(self) -> None:
        """Refusals at once; accepted files as runs, batch by batch in the order they were taken."""
        with self._lock:
            finished = [item for item in self._items.values() if item.done]
            waiting = [item for item in self._items.values() if not item.done]
        ready = [item for item in finished if item.refusal is None]
        for item in sorted((i for i in finished if i.refusal is not None), key=_arrival_order):
            self._publish_refusal(item, item.refusal or "")
        if waiting:
            first_waiting = min(item.batch for item in waiting)
            ready = [item for item in ready if item.batch < first_waiting]
        if not ready:
            return
        with self.journal.holding():  # the runner sees the whole batch or none of it
            for item in sorted(ready, key=_arrival_order):
                self._publish_run(item)

    def _publish_run(self, item: Item) -> None:
        sha256 = item.sha256 or ""
        repeat = self._repeat(sha256, item.name)
        if repeat is not None:
            self._publish_refusal(item, repeat)
            return

        def place(run_id: int) -> Path:
            target = self.spool / str(run_id)
            target.mkdir(exist_ok=True)
            os.rename(self.folder / item.token / item.name, target / item.name)
            return target / item.name

        try:
            run_id = self.journal.add_run(
                item.name,
                spool=self.spool,
                arrived=item.arrival_ns / 1e9,
                sha256=sha256,
                size=item.size,
                place=place,
            )
        except OSError as error:
            self._log_once(item, f"cannot move {printable(item.name)} into {self.spool}: {error.strerror}")
            return
        taken = f"taken from the inbox ({item.size} bytes, sha256 {sha256[:12]}…)"
        if item.copy:
            taken += f"; copied into a file of dropgate's own: {item.copy}"
        self.journal.add_event(run_id, "queued", taken)
        self._forget(item)
        log.info("inbox: %s is run %d", printable(item.name), run_id)
        self.on_published(run_id)

    def _repeat(self, sha256: str, name: str) -> str | None:
        """Why these bytes must not run on their own: refused or failed before, or already waiting."""
        earlier = self.journal.last_with_sha(sha256)
        if earlier is not None and earlier.outcome != "succeeded":
            return (
                f"the same archive (sha256 {sha256[:12]}…) was already {earlier.outcome} as run {earlier.id}: "
                f"run it again only with `dropgate retry {earlier.id}`"
            )
        for run in (*self.journal.unfinished(), *self.journal.queued()):
            # Under another name it is not a copy that will run: at most one name fits the signed
            # manifest, and a copy misnamed on purpose must not swallow the genuine one.
            if run.sha256 == sha256 and run.archive == name:
                where = "queued" if run.step == "queued" else f"running ({run.step})"
                return f"the same archive (sha256 {sha256[:12]}…) is already {where} as run {run.id}: it runs once"
        return None

    def _publish_refusal(self, item: Item, reason: str) -> None:
        """A run that is rejected from the start; the file is kept in rejected/ with its reason."""
        source = self.folder / item.token / item.name
        note = self.folder / f"{item.token}.reason"  # written first: inside the transaction only renames happen
        try:
            note.write_text(reason + "\n", encoding="utf-8")
        except OSError as error:
            self._log_once(item, f"cannot write {note}: {error.strerror}")
            return
        kept: list[str] = []

        def place(run_id: int) -> Path:
            target = self.rejected / _evidence_name(run_id, recorded_name(item.name))
            try:
                os.rename(source, target)
            except OSError as error:
                kept.append(f"; it could not be kept aside: {error.strerror}")
                note.unlink(missing_ok=True)
                return source
            os.rename(note, target.with_name(target.name + ".reason"))
            return target

        now = self.now()
        try:
            run_id = self.journal.add_run(
                recorded_name(item.name),
                spool=self.spool,
                arrived=item.arrival_ns / 1e9,
                place=place,
                outcome="rejected",
                started=now,
                finished=now,
                error=reason,
                sha256=item.sha256,
                size=item.size,
            )
        except OSError as error:
            self._log_once(item, f"cannot keep {printable(item.name)} in {self.rejected}: {error.strerror}")
            return
        self.journal.add_event(run_id, "rejected", f"outcome: rejected — {reason}{''.join(kept)}")
        self._forget(item)
        log.info("run %d rejected: %s", run_id, reason)
        self.on_published(run_id)

    def _forget(self, item: Item) -> None:
        with self._lock:
            self._items.pop(item.token, None)
        if item.fd is not None:
            os.close(item.fd)
            item.fd = None
        try:
            os.rmdir(item.token, dir_fd=self._dir_fd)
        except OSError as error:
            log.warning("inbox: cannot remove %s: %s", self.folder / item.token, error.strerror)

    def _log_once(self, item: Item, message: str) -> None:
        if not item.logged:
            item.logged = True
            log.error("inbox: %s; trying again", message)

    # -- start-up ----------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish or undo what a previous daemon left between the inbox and its runs (call before runs are added).

        A file under the one id that has no run yet (the daemon died inside the
        transaction that would have created it) goes back into intake/; every
        intake folder is screened again from the start (hashed again, not trusted).
        """
        newest = self.journal.runs(limit=1)
        orphan = (newest[0].id if newest else 0) + 1
        if not self._higher_ids_exist(orphan):
            self._bring_back(self.spool / str(orphan), orphan)
            for entry in _entries(self.rejected):
                match = _ORPHAN_REJECTED.fullmatch(entry.name)
                if match and int(match.group(1)) == orphan and not entry.name.endswith(".reason"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path + ".reason")
                    self._bring_in(Path(entry.path), match.group(2))
        for entry in sorted(_entries(self.folder), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                self._resume(entry.name)
            else:
                os.unlink(entry.path)  # a refusal's reason written before its run: written again

    def _higher_ids_exist(self, orphan: int) -> bool:
        """Evidence of runs above `orphan` means the journal lost runs: leave everything alone then."""
        for entry in _entries(self.spool):
            if entry.name.isdigit() and int(entry.name) > orphan:
                return True
        for entry in _entries(self.rejected):
            match = _ORPHAN_REJECTED.fullmatch(entry.name)
            if match and int(match.group(1)) > orphan:
                return True
        return False

    def _bring_back(self, folder: Path, run_id: int) -> None:
        for entry in _entries(folder):
            self._bring_in(Path(entry.path), entry.name)
        with contextlib.suppress(OSError):
            folder.rmdir()

    def _bring_in(self, path: Path, name: str) -> str:
        token = self._new_token(time.time_ns(), path.lstat().st_ino)
        os.rename(path, self.folder / token / name)
        log.warning("inbox: %s had no run (the daemon stopped while creating it): screening it again", path)
        return token

    def _resume(self, token: str) -> None:
        match = _TOKEN.fullmatch(token)
        folder = self.folder / token
        names = sorted(os.listdir(folder)) if folder.is_dir() else []
        for name in names:
            if name != COPY_SUFFIX and name.endswith(COPY_SUFFIX) and name[: -len(COPY_SUFFIX)] in names:
                os.unlink(folder / name)  # a copy cut short: made again from the original
                names.remove(name)
            elif name == COPY_SUFFIX and len(names) > 1:
                os.unlink(folder / name)
                names.remove(name)
        if not names:
            with contextlib.suppress(OSError):
                folder.rmdir()
            return
        arrival = int(match.group(1)) if match else time.time_ns()
        for extra in names[1:]:  # never more than one; if so, each is screened on its own
            self._resume(self._bring_in(folder / extra, extra))
        log.info("inbox: finishing the intake of %s", printable(names[0]))
        self._screen(Item(token, names[0], arrival, batch=0))


class _CopyFailed(OSError):
    """Writing the copy failed (a fault of this site, e.g. a full disk), not reading the upload."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.errno, f"it could not be copied into the state folder: {error.strerror}")


def _arrival_order(item: Item) -> tuple[object, ...]:
    return (item.batch, item.arrival_ns, name_key(item.name))


def _evidence_name(run_id: int, name: str) -> str:
    """`<id>-<name>`, shortened so that it and its `.reason` fit in a file name."""
    evidence = f"{run_id}-{name}"
    while len(os.fsencode(evidence + ".reason")) > _NAME_MAX:
        evidence = evidence[:-1]
    return evidence


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(folder))
    except FileNotFoundError:
        return []
    except OSError as error:
        if error.errno == errno.ENOTDIR:
            return []
        raise
