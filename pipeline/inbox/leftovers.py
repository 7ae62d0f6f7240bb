"""What a previous daemon left between the inbox and its runs, settled at start-up.

A file under the one run id that has no run yet (the daemon died inside the
transaction that would have created it) goes back into `intake/`; a copy cut
short is removed (it is made again from the original); every intake folder is
then screened again from the start, hashed again, not trusted. When there is
evidence of runs above that id, the journal lost runs and nothing is touched.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.inbox.files import printable
from pipeline.inbox.hashing import COPY_SUFFIX
from pipeline.journal import Journal

log = logging.getLogger("dropgate")

_TOKEN = re.compile(r"(\d+)-\d+(?:\.\d+)?")
_ORPHAN_REJECTED = re.compile(r"(\d+)-(.+)", re.DOTALL)


@dataclass
class Leftovers:
    """The intake's folders and journal, and how the intake makes a folder and screens a file."""

    journal: Journal
    folder: Path  # <state>/intake
    spool: Path
    rejected: Path
    new_token: Callable[[int, int], str]  # (arrival ns, inode): a new folder under intake/, by name
    screen: Callable[[str, str, int], None]  # (token, name, arrival ns): screen that file from the start

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
            for entry in entries(self.rejected):
                match = _ORPHAN_REJECTED.fullmatch(entry.name)
                if match and int(match.group(1)) == orphan and not entry.name.endswith(".reason"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path + ".reason")
                    self._bring_in(Path(entry.path), match.group(2))
        for entry in sorted(entries(self.folder), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                self._resume(entry.name)
            else:
                os.unlink(entry.path)  # a refusal's reason written before its run: written again

    def _higher_ids_exist(self, orphan: int) -> bool:
        """Evidence of runs above `orphan` means the journal lost runs: leave everything alone then."""
        for entry in entries(self.spool):
            if entry.name.isdigit() and int(entry.name) > orphan:
                return True
        for entry in entries(self.rejected):
            match = _ORPHAN_REJECTED.fullmatch(entry.name)
            if match and int(match.group(1)) > orphan:
                return True
        return False

    def _bring_back(self, folder: Path, run_id: int) -> None:
        for entry in entries(folder):
            self._bring_in(Path(entry.path), entry.name)
        with contextlib.suppress(OSError):
            folder.rmdir()

    def _bring_in(self, path: Path, name: str) -> str:
        token = self.new_token(time.time_ns(), path.lstat().st_ino)
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
        self.screen(token, names[0], arrival)


def entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(folder))
    except FileNotFoundError:
        return []
    except OSError as error:
        if error.errno == errno.ENOTDIR:
            return []
        raise
