"""Background work yields to the platform: the I/O class and CPU niceness of the threads that do it.

Staging an archive (`validate`) and the backup (with its dumps) run while the
platform serves its users. A step module that sets `BACKGROUND = True` is run
by `run_step` on a thread of its own whose I/O class and niceness are lowered as
`background` in the configuration says (default: idle I/O, nice 10). Linux keeps
both per thread, and every thread and process started from that thread (the
snapshot's copy threads, the dump commands) inherits them; the runner's own
thread, which later starts the platform's services, is never touched (an
unprivileged thread could not take a lowered niceness back).

The idle I/O class is honoured by the `mq-deadline` and `bfq` schedulers for the
reads a thread makes; buffered writes reach the disk later through the kernel's
writeback, at its priority. Failure to lower (another OS, a filter) is logged,
never fatal.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

from pipeline.libc import libc

_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1  # with id 0: the calling thread
_IO_CLASSES = {"best-effort": (2, 7), "idle": (3, 0)}  # (class, level): best-effort at its lowest level
_CLASS_NAMES = {0: "none", 1: "realtime", 2: "best-effort", 3: "idle"}
# ioprio_set / ioprio_get by architecture (asm-generic numbering where the table is shared).
_SYSCALLS = {
    "x86_64": (251, 252),
    "aarch64": (30, 31),
    "riscv64": (30, 31),
    "i386": (289, 290),
    "i686": (289, 290),
    "armv7l": (314, 315),
    "ppc64le": (273, 274),
    "s390x": (282, 283),
}


class Settings(Protocol):
    """The `background` section of the configuration."""

    @property
    def io_class(self) -> str: ...

    @property
    def nice(self) -> int: ...


class _StepContext(Protocol):
    step: str

    @property
    def config(self) -> Any: ...

    def log(self, line: str) -> None: ...


def _syscall(number: int, *args: int) -> int:
    result = int(libc().syscall(number, *args))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _numbers() -> tuple[int, int]:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(f"ioprio_set/ioprio_get: unknown system call numbers on {platform.machine()}")
    return numbers


def io_priority() -> tuple[str, int]:
    """The calling thread's I/O class and level (`none` when it has none of its own)."""
    value = _syscall(_numbers()[1], _IOPRIO_WHO_PROCESS, 0)
    return _CLASS_NAMES.get(value >> _IOPRIO_CLASS_SHIFT, "unknown"), value & ((1 << _IOPRIO_CLASS_SHIFT) - 1)


def lower_this_thread(settings: Settings) -> list[str]:
    """Lower the calling thread's I/O class and raise its niceness; what could not be done, as messages.

    Only ever call it on a thread that will end with the work (see the module's
    docstring): the niceness cannot be taken back without CAP_SYS_NICE.
    """
    problems = []
    if settings.io_class != "none":
        io_class, level = _IO_CLASSES[settings.io_class]
        try:
            _syscall(_numbers()[0], _IOPRIO_WHO_PROCESS, 0, (io_class << _IOPRIO_CLASS_SHIFT) | level)
        except (OSError, AttributeError) as error:
            problems.append(f"I/O class {settings.io_class} not set: {error}")
    if settings.nice > 0:
        try:
            # On Linux, PRIO_PROCESS with 0 is the calling thread alone.
            current = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, 0, max(current, settings.nice))
        except OSError as error:
            problems.append(f"nice {settings.nice} not set: {error.strerror or error}")
    return problems


def run_lowered(settings: Settings, work: Callable[[], Any], *, name: str, log: Callable[[str], None]) -> Any:
    """Run `work` on a new thread lowered as `settings` say; its result, or its exception raised here."""
    outcome: list[Any] = []
    failure: list[BaseException] = []

    def body() -> None:
        problems = lower_this_thread(settings)
        for problem in problems:
            log(f"background priority: {problem}")
        if not problems:
            log(f"background priority: I/O class {settings.io_class}, nice {settings.nice}")
        try:
            outcome.append(work())
        except BaseException as error:  # handed to the caller's thread, raised there
            failure.append(error)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0] if outcome else None


def run_step(module: ModuleType, ctx: _StepContext) -> None:
    """Run the step `module` with `ctx`: on a lowered thread if the module says `BACKGROUND = True`."""
    settings = getattr(ctx.config, "background", None)
    if not getattr(module, "BACKGROUND", False) or settings is None:
        module.run(ctx)
        return
    if settings.io_class == "none" and settings.nice == 0:
        module.run(ctx)
        return
    run_lowered(settings, lambda: module.run(ctx), name=f"dropgate-{ctx.step}", log=ctx.log)
