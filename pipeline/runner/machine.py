"""The run's state machine: its states and transitions, the model it moves, its Mermaid diagram.

The order is SPEC section 1: queued → validate → prereq → [approval] → [window]
→ backup → [maintenance] → apply → verify → succeeded, with `rejected` before
backup, `failed`/`interrupted` from backup on, and the `rollback` state between
a failure (or an operator's command) and `rolled_back`. Optional steps are
entered only when their module's `required(config, facts)` says so.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from transitions import Machine

from pipeline.config import STEPS, Config
from pipeline.journal import OUTCOMES
from pipeline.recovery import PRE_CHANGE_STEPS

CHANGE_STEPS = ("backup", "maintenance", "apply", "verify")
OPTIONAL_STEPS = ("approval", "window", "maintenance")
ROLLBACK_AFTER = ("maintenance", "apply", "verify")
ROLLBACK_OF_OUTCOMES = ("failed", "interrupted", "succeeded")
MACHINE_STATES = ("queued", *STEPS, "rollback", *OUTCOMES)


def machine_transitions() -> list[dict[str, Any]]:
    """The machine's transitions; optional steps are entered only when their condition holds."""
    transitions: list[dict[str, Any]] = [{"trigger": "start", "source": "queued", "dest": "validate"}]
    for index, step in enumerate(STEPS):
        for later in STEPS[index + 1 :]:
            if later in OPTIONAL_STEPS:
                transitions.append(
                    {"trigger": "advance", "source": step, "dest": later, "conditions": f"needs_{later}"}
                )
                continue
            transitions.append({"trigger": "advance", "source": step, "dest": later})
            break
        else:
            transitions.append({"trigger": "advance", "source": step, "dest": "succeeded"})
    transitions += [
        {"trigger": "reject", "source": list(PRE_CHANGE_STEPS), "dest": "rejected"},
        {"trigger": "requeue", "source": list(PRE_CHANGE_STEPS), "dest": "queued"},
        {"trigger": "fail", "source": [*CHANGE_STEPS, "rollback"], "dest": "failed"},
        {"trigger": "interrupt", "source": [*CHANGE_STEPS, "rollback"], "dest": "interrupted"},
        {"trigger": "roll_back", "source": [*ROLLBACK_AFTER, *ROLLBACK_OF_OUTCOMES], "dest": "rollback"},
        {"trigger": "restored", "source": "rollback", "dest": "rolled_back"},
    ]
    return transitions


class RunModel:
    """The object the machine moves; its conditions ask the optional steps."""

    state: str

    def __init__(self, config: Config, facts: dict[str, Any], steps: Mapping[str, ModuleType]) -> None:
        self.config = config
        self.facts = facts
        self._steps = steps

    def _required(self, step: str) -> bool:
        required: Callable[[Config, dict[str, Any]], bool] | None = getattr(self._steps[step], "required", None)
        return True if required is None else bool(required(self.config, self.facts))

    def needs_approval(self) -> bool:
        return self._required("approval")

    def needs_window(self) -> bool:
        return self._required("window")

    def needs_maintenance(self) -> bool:
        return self._required("maintenance")


def build_machine(model: Any, initial: str = "queued") -> Machine:
    return Machine(
        model=model,
        states=list(MACHINE_STATES),
        transitions=machine_transitions(),
        initial=initial,
        auto_transitions=False,
    )


def mermaid() -> str:
    """The machine as a Mermaid state diagram, generated from the machine itself."""
    from transitions.extensions import GraphMachine

    class _Model:
        def needs_approval(self) -> bool:
            return True

        def needs_window(self) -> bool:
            return True

        def needs_maintenance(self) -> bool:
            return True

    model = _Model()
    GraphMachine(
        model=model,
        states=list(MACHINE_STATES),
        transitions=machine_transitions(),
        initial="queued",
        auto_transitions=False,
        graph_engine="mermaid",
        show_conditions=True,
        title="dropgate run",
    )
    text: str = model.get_graph().draw(None)  # type: ignore[attr-defined]
    return text


def cmd_graph(args: argparse.Namespace) -> int:
    print(mermaid())
    return 0


def load_steps() -> dict[str, ModuleType]:
    """`states.<step>` for every step, and `states.rollback`."""
    return {name: importlib.import_module(f"states.{name}") for name in (*STEPS, "rollback")}
