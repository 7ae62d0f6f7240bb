"""Filters of rollout.yml: what to do on a site, and the line each site gets in the summary.

They run on the controller, on what the site's own `dropgate status --json` and
`history --json` said, so that the decision is one piece of Python that can be
tested rather than a page of Jinja:

    dropgate_archive       the archive's name, product, version, sha256 (from its path and checksum)
    dropgate_plan          drop, wait (for a run of this archive already there), retry, skip or fail
    dropgate_site_record   the site's line of the summary, from the plan and the wait's result
    dropgate_version_cmp   -1, 0 or 1, comparing versions the way dropgate does (3.9 < 3.10, rc before final)
"""

from __future__ import annotations

import re
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # imported outside Ansible (the unit tests)

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        """A filter's one-line error."""


# The same rules as pipeline/versions.py and the archive's name rule: a site's dropgate
# compares exactly so, and the controller must agree with it.
_VERSION = re.compile(r"^(?P<release>\d+(?:\.\d+)*)(?:[-~.]?(?P<tag>[A-Za-z][A-Za-z0-9.]*))?$")
_PRODUCT = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ENDED_BADLY = ("rejected", "failed", "rolled_back", "interrupted")
BLOCKING = ("failed", "rolled_back", "interrupted")
# Outcomes of a site that let the rollout go on to the next wave.
FINE = ("succeeded", "skipped", "waiting", "planned")


def version_key(text: str) -> tuple[object, ...]:
    match = _VERSION.match(str(text).strip())
    if not match:
        raise AnsibleFilterError(f"{text!r} is not a version like 3.19.274 or 3.20.0-rc1")
    release = tuple(int(part) for part in match.group("release").split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    tag_text = match.group("tag") or ""
    tag = tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in re.findall(r"\d+|[A-Za-z]+", tag_text))
    return (release, 0 if tag else 1, tag)


def version_cmp(left: str, right: str) -> int:
    a, b = version_key(left), version_key(right)
    return (a > b) - (a < b)


def archive_facts(path: str, sha256: str, size: int = 0) -> dict[str, Any]:
    """What the rollout knows of its archive: `<product>.<version>.tgz` and its checksum."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    example = "expected <product>.<version>.tgz, as the vendor ships it (e.g. gts.3.19.274.tgz)"
    product, dot, version = name.removesuffix(".tgz").partition(".")
    if not name.endswith(".tgz") or not dot or not _PRODUCT.match(product):
        raise AnsibleFilterError(f"archive {name!r}: {example}")
    try:
        version_key(version)
    except AnsibleFilterError:
        raise AnsibleFilterError(f"archive {name!r}: {version!r} is not a version ({example})") from None
    if not _SHA256.match(str(sha256)):
        raise AnsibleFilterError(f"archive {name!r}: no sha256 checksum (got {sha256!r})")
    return {"path": str(path), "name": name, "product": product, "version": version,
            "sha256": str(sha256), "size": int(size)}


def _is_mine(run: dict[str, Any], archive: dict[str, Any]) -> bool:
    """A run of this archive: the same bytes, or a queued run of its name not hashed yet."""
    if run.get("sha256"):
        return bool(run["sha256"] == archive["sha256"])
    return run.get("archive") == archive["name"] and run.get("outcome") is None


def plan(status: dict[str, Any], history: list[dict[str, Any]], archive: dict[str, Any],
         retry: bool = False) -> dict[str, Any]:
    """What to do on one site, from its `status --json` and `history --json` (newest first).

    action: drop (copy the archive into the inbox), wait (a run of this archive is
    already queued or running: follow it, never drop it twice), retry (the operator
    asked to run a failed run of it again), skip (reported, the rollout goes on) or
    fail (this archive's earlier run still blocks the site: the rollout stops).
    """
    installed = status.get("installed_version")
    gate = status.get("gate")
    running = bool((status.get("daemon") or {}).get("running", True))
    result: dict[str, Any] = {
        "action": "skip", "reason": "", "run": None, "installed": installed, "gate": gate,
        "after": max((int(run["id"]) for run in history), default=0),
    }

    def decide(action: str, reason: str, run: int | None = None) -> dict[str, Any]:
        return {**result, "action": action, "reason": reason, "run": run}

    mine = [run for run in history if _is_mine(run, archive)]
    unfinished = [run for run in mine if run.get("outcome") is None]
    if unfinished:
        run = unfinished[-1]  # the oldest: it runs first
        where = "queued" if run.get("step") == "queued" else f"in {run.get('step')}"
        if not running:
            return decide("skip", f"run {run['id']} of this archive is {where}, but the daemon is not running",
                          run["id"])
        return decide("wait", f"already there as run {run['id']} ({where}): following it, not dropping it again",
                      run["id"])
    if mine and mine[0].get("outcome") == "succeeded" and installed is not None and \
            _compare_or_none(installed, archive["version"]) == 0:
        return decide("skip", f"already installed by run {mine[0]['id']}", mine[0]["id"])
    if installed is None:
        return decide("skip", "no release is installed (run `dropgate init` on the site first)")
    order = _compare_or_none(installed, archive["version"])
    if order is None:
        return decide("skip", f"cannot compare the installed version {installed!r} with {archive['version']}")
    if order >= 0:
        newer = "already installed" if order == 0 else f"is older than the installed {installed}"
        return decide("skip", f"version {archive['version']} {newer}")
    if mine and mine[0].get("outcome") in ENDED_BADLY:
        last = mine[0]
        outcome, number = last["outcome"], last["id"]
        if outcome in BLOCKING and last.get("resolved") is None:
            return decide("fail", f"run {number} of this archive ended {outcome} and still blocks the gate: "
                                  f"`dropgate show {number} --log`, repair, `dropgate resolve {number} --note ...`",
                          number)
        if not retry:
            why = f": {last['error']}" if last.get("error") else ""
            return decide("skip", f"run {number} of this archive ended {outcome}{why}; not dropped again "
                                  "(rerun with -e dropgate_retry=true to run it again)", number)
        if running and gate == "idle":
            return decide("retry", f"run {number} ended {outcome}: retried on the operator's request", number)
    if not running:
        return decide("skip", "the daemon is not running")
    if gate == "blocked":
        blockers = ", ".join(f"run {b['id']} ({b['outcome']})" for b in status.get("blocked_by") or [])
        return decide("skip", f"the gate is blocked by {blockers or 'an earlier run'}: resolve it first")
    if gate != "idle":
        current = status.get("run") or {}
        return decide("skip", f"the gate is {gate} with run {current.get('id')} ({current.get('archive')})")
    queued = status.get("queued") or []
    if queued:
        names = ", ".join(f"run {q['id']} ({q['archive']})" for q in queued)
        return decide("skip", f"other archives are queued: {names}")
    if any(upload.get("name") == archive["name"] for upload in status.get("uploading") or []):
        return decide("skip", f"an upload of {archive['name']} is already in the inbox")
    if any(item.get("name") == archive["name"] for item in status.get("screening") or []):
        # taken from the inbox, not a run yet (a rerun right after the drop, or a flood): not dropped twice
        return decide("skip", f"{archive['name']} is being screened (taken from the inbox, not yet a run)")
    if "inbox" not in status:
        raise AnsibleFilterError("the site's `dropgate status --json` does not say where its inbox is "
                                 "(dropgate on the site is older than this playbook)")
    return decide("drop", f"{installed} → {archive['version']}")


def _compare_or_none(installed: str, version: str) -> int | None:
    try:
        return version_cmp(installed, version)
    except AnsibleFilterError:
        return None


def site_record(plan: dict[str, Any], wait: dict[str, Any] | None, archive: dict[str, Any],
                site: str, check: bool = False) -> dict[str, Any]:
    """The site's line of the rollout summary (collected by the dropgate_summary callback).

    `check`: a dry run (ansible-playbook --check): the line says what would be done.
    """
    record: dict[str, Any] = {
        "site": site, "archive": archive["name"], "action": plan["action"], "run": plan.get("run"),
        "before": plan.get("installed"), "after": plan.get("installed"), "outcome": "skipped",
        "note": plan.get("reason", ""), "downtime_seconds": None, "run_seconds": None,
    }
    if plan["action"] == "skip":
        return record
    if plan["action"] == "fail":
        return {**record, "outcome": "blocked"}
    if check:
        return {**record, "outcome": "planned", "note": f"would {plan['action']}: {plan.get('reason', '')}"}
    wait = wait or {}
    state = wait.get("state")
    run = wait.get("run") or {}
    after = (wait.get("status") or {}).get("installed_version", record["after"])
    record.update(run=run.get("id", record["run"]), after=after, note=wait.get("message", ""))
    if state == "ended":
        facts = run.get("facts") or {}
        downtime = facts.get("downtime_seconds")
        if downtime is None and run.get("outcome") == "succeeded":
            downtime = 0.0
        started, finished = run.get("started"), run.get("finished")
        record.update(
            outcome=run["outcome"],
            note=run.get("error") or "",
            downtime_seconds=None if downtime is None else round(float(downtime), 3),
            run_seconds=round(float(finished) - float(started), 3) if started and finished else None,
        )
        if run["outcome"] != "succeeded":
            record["note"] = f"{record['note']} (`dropgate show {run['id']} --log` on the site)".lstrip()
    elif state == "waiting":
        record["outcome"] = "waiting"
    else:
        record["outcome"] = state or "error"
    return record


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "dropgate_archive": archive_facts,
            "dropgate_plan": plan,
            "dropgate_site_record": site_record,
            "dropgate_version_cmp": version_cmp,
        }
