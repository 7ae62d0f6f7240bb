"""`approval`: wait for an operator's `dropgate approve ID` (only when policy.require_approval).

An operator may refuse the run instead (`dropgate reject ID --note ...`): it ends
`rejected`, by that operator, with the note. With `policy.approval_expires` set,
a run that waits longer than that for its approval is rejected with that reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pipeline.config import Config, format_duration
from pipeline.context import StepContext
from pipeline.errors import ApprovalExpired, RejectedByOperator, StepAborted

PRECHECK_MAX_AGE_SECONDS = 86400.0
POLL_SECONDS = 0.5


def required(config: Config, facts: dict[str, Any]) -> bool:
    return config.policy.require_approval


@contextlib.contextmanager
def ended_by_rejection(ctx: StepContext) -> Iterator[None]:
    """Around a wait: when an operator's rejection is what stopped it, raise RejectedByOperator instead.

    The runner records who rejected the run, and the note, in the facts; any other abort passes through.
    """
    try:
        yield
    except StepAborted as aborted:
        refuse_if_rejected(ctx, aborted)
        raise


def refuse_if_rejected(ctx: StepContext, cause: BaseException | None = None) -> None:
    """Raise RejectedByOperator when an operator rejected the run (the runner records it in the facts first)."""
    who = ctx.facts.get("rejected_by")
    if who:
        note = ctx.facts.get("rejected_note") or "(no note)"
        raise RejectedByOperator(f"rejected by the operator {who}: {note}") from cause


def run(ctx: StepContext) -> None:
    with ended_by_rejection(ctx):
        _wait_for_approval(ctx)


def _wait_for_approval(ctx: StepContext) -> None:
    expires = ctx.config.policy.approval_expires
    if "approved_at" not in ctx.facts:
        if "approval_asked_at" not in ctx.facts:
            ctx.save_facts(approval_asked_at=ctx.now())  # kept across restarts: the wait is not reset
        limit = f" (rejected if not approved within {format_duration(expires)})" if expires else ""
        ctx.event(f"waiting for an operator: dropgate approve {ctx.run_id}{limit}")
    asked = float(ctx.facts.get("approval_asked_at") or ctx.now())
    while "approved_at" not in ctx.facts:
        left = asked + expires - ctx.now()
        if expires and left <= 0:
            raise ApprovalExpired(
                f"not approved within {format_duration(expires)} (policy.approval_expires): rejected; "
                f"`dropgate retry {ctx.run_id}` queues it again"
            )
        ctx.wait(min(POLL_SECONDS, left) if expires else POLL_SECONDS)
    prereq_at = float(ctx.facts.get("prereq_at") or 0.0)
    if ctx.now() - prereq_at > PRECHECK_MAX_AGE_SECONDS:
        from states import prereq

        ctx.event("the pre-checks are older than a day: running them again before going on")
        prereq.run(ctx)
