"""The runner: one run at a time through the `transitions` machine, and the gate.

The machine is the order of SPEC section 1: queued → validate → prereq →
[approval] → [window] → backup → [maintenance] → apply → verify → succeeded,
with `rejected` before backup, `failed`/`interrupted` from backup on, and the
`rollback` state between a failure (or an operator's command) and
`rolled_back`. Each step is `states.<step>.run(ctx)`; the runner owns time
limits, the journal records and the failure paths; observers only watch.

`machine` is the machine (states, transitions, the model, `dropgate graph`),
`loop` the `Runner` thread that takes runs through it, `commands` the
operator's commands it serves, `archives` what becomes of a run's archive and
staged release after its outcome.
"""

from __future__ import annotations

from pipeline.runner.loop import Runner
from pipeline.runner.machine import (
    CHANGE_STEPS,
    MACHINE_STATES,
    OPTIONAL_STEPS,
    ROLLBACK_AFTER,
    ROLLBACK_OF_OUTCOMES,
    RunModel,
    build_machine,
    cmd_graph,
    load_steps,
    machine_transitions,
    mermaid,
)

__all__ = [
    "CHANGE_STEPS",
    "MACHINE_STATES",
    "OPTIONAL_STEPS",
    "ROLLBACK_AFTER",
    "ROLLBACK_OF_OUTCOMES",
    "RunModel",
    "Runner",
    "build_machine",
    "cmd_graph",
    "load_steps",
    "machine_transitions",
    "mermaid",
]
