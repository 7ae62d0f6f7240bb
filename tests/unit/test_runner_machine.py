"""The state machine: the order of SPEC section 1, generated into Mermaid from the machine itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.runner import MACHINE_STATES, build_machine

ROOT = Path(__file__).resolve().parents[2]


class Model:
    def __init__(self, approval: bool = False, window: bool = False, maintenance: bool = False) -> None:
        self.flags = {"approval": approval, "window": window, "maintenance": maintenance}

    def needs_approval(self) -> bool:
        return self.flags["approval"]

    def needs_window(self) -> bool:
        return self.flags["window"]

    def needs_maintenance(self) -> bool:
        return self.flags["maintenance"]


def walk(**flags: Any) -> list[str]:
    model: Any = Model(**flags)
    build_machine(model)
    model.start()
    seen = [model.state]
    while model.state not in ("succeeded",):
        model.advance()
        seen.append(model.state)
    return seen


def test_a_patch_without_options_goes_straight_through() -> None:
    assert walk() == ["validate", "prereq", "backup", "apply", "verify", "succeeded"]


def test_optional_steps_are_entered_only_when_required() -> None:
    assert walk(approval=True, window=True, maintenance=True) == [
        "validate",
        "prereq",
        "approval",
        "window",
        "backup",
        "maintenance",
        "apply",
        "verify",
        "succeeded",
    ]
    assert walk(window=True) == ["validate", "prereq", "window", "backup", "apply", "verify", "succeeded"]


def test_rejection_is_only_possible_before_backup_and_failure_only_after() -> None:
    model: Any = Model()
    build_machine(model)
    model.start()
    model.advance()  # prereq
    model.reject()
    assert model.state == "rejected"
    model = Model()
    build_machine(model, initial="apply")
    assert not model.may_reject()
    model.roll_back()
    model.restored()
    assert model.state == "rolled_back"


def test_graph_prints_every_state_as_mermaid() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "graph"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0
    assert "stateDiagram-v2" in result.stdout
    for state in MACHINE_STATES:
        assert f'state "{state}" as {state}' in result.stdout
    assert "prereq --> approval: advance [needs_approval]" in result.stdout
    assert "verify --> rollback: roll_back" in result.stdout
