"""What a run has changed on the platform so far, read from its facts.

One description for `status`, the page, the restart message and the
rollback: writing the maintenance flag and stopping services change the
platform as much as apply does (visitors get the 503 page, the next update's
pre-checks find it unhealthy), so they count, and a rollback undoes them.
The facts are written before each change is made (`states.maintenance`,
`states.apply`), so after a crash they err on the side of "changed".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def apply_began(facts: Mapping[str, Any]) -> bool:
    """`apply` records the previous release before its first change (a hook, a migration, the switch)."""
    return "previous_release" in facts


def maintenance_changes(facts: Mapping[str, Any]) -> list[str]:
    """What entering maintenance changed: the flag, the services (as far as the stop commands got)."""
    if facts.get("maintenance_since") is None:
        return []
    changes = ["maintenance flag on"]
    stop = facts.get("services_stop")
    if not isinstance(stop, Mapping):  # a run recorded before this fact existed
        changes.append("services stopped")
        return changes
    started, done, total = int(stop.get("started", 0)), int(stop.get("done", 0)), int(stop.get("total", 0))
    if total and done == total:
        changes.append(f"services stopped ({total} stop command{'s' if total != 1 else ''} ran)")
    elif started:
        changes.append(f"services being stopped (stop {started}/{total} had started, {done} finished)")
    return changes


def services_stopped(facts: Mapping[str, Any]) -> bool:
    """Whether any stop command was started (so leaving maintenance must start the services)."""
    if facts.get("maintenance_since") is None:
        return False
    stop = facts.get("services_stop")
    return not isinstance(stop, Mapping) or int(stop.get("started", 0)) > 0


def describe_changes(platform_changed: bool, facts: Mapping[str, Any]) -> str:
    """The one line `status` and `show` print after "platform:"."""
    if not platform_changed:
        return "untouched"
    if apply_began(facts):
        return "changed — rollback restores release and backup"
    done = maintenance_changes(facts) or ["maintenance entered"]
    return (
        f"changed — {', '.join(done)}; apply had not begun (release and data untouched): "
        "rollback starts the services and removes the flag"
    )


def restart_summary(platform_changed: bool, facts: Mapping[str, Any]) -> str:
    """What the restart message says was changed when the daemon died."""
    if not platform_changed:
        return "the platform was not changed yet"
    if apply_began(facts):
        extra = maintenance_changes(facts)
        return "the platform WAS changed: apply had begun" + (f"; {', '.join(extra)}" if extra else "")
    done = maintenance_changes(facts) or ["maintenance entered"]
    return f"the platform WAS changed: {', '.join(done)}; apply had not begun (release and data untouched)"


def rollback_plan(facts: Mapping[str, Any]) -> str:
    """What `dropgate rollback` will do for a run with these facts."""
    if apply_began(facts):
        return "rollback puts the previous release back, restores the data and dumps, and leaves maintenance"
    if facts.get("maintenance_since") is not None:
        start = "starts the services and " if services_stopped(facts) else ""
        return f"rollback {start}removes the maintenance flag; the data is not restored (apply had not begun)"
    return "there is nothing to roll back"


def rollback_done(facts: Mapping[str, Any]) -> str:
    """What a finished rollback of a run with these facts (as they were before it) put back."""
    if apply_began(facts):
        return "the previous release, the data and the dumps restored, maintenance left"
    if services_stopped(facts):
        return "services started and the maintenance flag removed; the data was not restored (apply had not begun)"
    return "the maintenance flag removed; the data was not restored (apply had not begun)"
