"""`approval`: wait for an operator's `dropgate approve ID` (only when policy.require_approval)."""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.context import StepContext

PRECHECK_MAX_AGE_SECONDS = 86400.0
POLL_SECONDS = 0.5


def required(config: Config, facts: dict[str, Any]) -> bool:
    return config.policy.require_approval


def run(ctx: StepContext) -> None:
    if "approved_at" not in ctx.facts:
        ctx.event(f"waiting for an operator: dropgate approve {ctx.run_id}")
    while "approved_at" not in ctx.facts:
        ctx.wait(POLL_SECONDS)
    prereq_at = float(ctx.facts.get("prereq_at") or 0.0)
    if ctx.now() - prereq_at > PRECHECK_MAX_AGE_SECONDS:
        from states import prereq

        ctx.event("the pre-checks are older than a day: running them again before going on")
        prereq.run(ctx)
