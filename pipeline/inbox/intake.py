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

The hashing and copying run on `hashing.Hasher`'s worker threads; what a
previous daemon left is settled by `leftovers.Leftovers` (`recover`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
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
from pipeline.inbox.hashing import NAME_MAX, TAKEN_MODE, Hasher
from pipeline.inbox.leftovers import Leftovers
from pipeline.inbox.order import name_key
from pipeline.journal import Journal

log = logging.getLogger("dropgate")


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
        self._hasher = Hasher(config.limits.max_archive_bytes, self._hashed)
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
        self._hasher.start(self._dir_fd)

    def stop(self) -> None:
        """Cancel hashing (each worker stops within one chunk) and let go of every descriptor."""
        self._hasher.stop()
        with self._lock:
            for item in self._items.values():
                if item.fd is not None and not self._hasher.running():
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
        self._hasher.submit(item)

    def _hashed(self, item: Item) -> None:
        """A worker finished with `item` (hashed, or refused): it can be published."""
        with self._lock:
            item.done = True
        self.wake()

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
        See `pipeline.inbox.leftovers`.
        """
        leftovers = Leftovers(
            self.journal, self.folder, self.spool, self.rejected, new_token=self._new_token, screen=self._screen_again
        )
        leftovers.recover()

    def _screen_again(self, token: str, name: str, arrival_ns: int) -> None:
        self._screen(Item(token, name, arrival_ns, batch=0))


def _arrival_order(item: Item) -> tuple[object, ...]:
    return (item.batch, item.arrival_ns, name_key(item.name))


def _evidence_name(run_id: int, name: str) -> str:
    """`<id>-<name>`, shortened so that it and its `.reason` fit in a file name."""
    evidence = f"{run_id}-{name}"
    while len(os.fsencode(evidence + ".reason")) > NAME_MAX:
        evidence = evidence[:-1]
    return evidence
