"""What the benchmark scripts do around their measurements: a work folder, the whole run's time, a child's peak memory.

Used by the scripts beside it (not a benchmark itself).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn


@contextlib.contextmanager
def work_folder(prefix: str, parent: Path | None, keep: bool) -> Iterator[Path]:
    """A fresh folder under `parent` (default: the temporary folder), removed at the end unless `keep`."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        if keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def exit_timed(main: Callable[[], int]) -> NoReturn:
    """Run a benchmark's `main`, say how long the whole of it took, and exit with its code."""
    began = time.perf_counter()
    code = main()
    print(f"(bench took {time.perf_counter() - began:.0f} s)")
    sys.exit(code)


def high_water(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM of its current program), in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0
