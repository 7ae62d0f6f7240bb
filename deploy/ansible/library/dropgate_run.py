#!/usr/bin/python
"""Ansible module: follow one dropgate run on a site until it ends or waits for the site's own gates.

Runs on the site. It only reads: `dropgate history --json` to find the run of an
archive just dropped (by its sha256, or a retry by the run it retries), then
`dropgate show ID --json` (soon, then every `poll` seconds) until the run has an outcome, or
waits for an operator's approval or a maintenance window, or `timeout` passes;
then `dropgate status --json` for the installed version. One task, no retry
lines in the output, one dropgate command per poll.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: dropgate_run
short_description: Follow a dropgate run until it ends, or waits for approval or a window
description:
  - Finds the run of an archive (by sha256 and name, newer than run C(after)), or the retry of run
    C(retry_of), or takes C(run); then polls C(dropgate show ID --json) until the run has an outcome,
    waits in C(approval) or C(window), or C(timeout) seconds pass. Changes nothing.
options:
  command: {description: the dropgate command on the site, type: str, default: /usr/bin/dropgate}
  config: {description: the site's configuration file, type: str, default: /etc/dropgate/dropgate.yaml}
  sha256: {description: the archive's sha256, type: str}
  name: {description: the archive's file name, type: str}
  after: {description: the newest run id before the archive was dropped, type: int, default: 0}
  retry_of: {description: follow the run that retries this run, type: int}
  run: {description: follow this run, type: int}
  timeout: {description: seconds the run may take before the site counts as timed out, type: float, default: 7200}
  pickup_timeout: {description: seconds the daemon may take to take the archive from the inbox, type: float,
                   default: 300}
  poll: {description: "seconds between two looks (the first looks come sooner: 0.25, 0.5, 1, 2 s, ...)", type: float,
         default: 5}
"""

RETURN = r"""
state: {description: "ended, waiting, timeout, not_taken or error", type: str}
waiting_for: {description: "approval or window when state is waiting", type: str}
run: {description: the run as C(dropgate show ID --json) prints it, type: dict}
status: {description: C(dropgate status --json) at the end, type: dict}
message: {description: one line for the summary, type: str}
"""


class Cli:
    """The site's dropgate command line, read-only commands only."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.argv = [module.params["command"], "--config", module.params["config"]]
        self.last_error: list[str] = []

    def json(self, *args: str) -> Any:
        """The command's JSON, or None when it failed (the journal busy, the daemon restarting)."""
        code, out, err = self.module.run_command([*self.argv, *args, "--json"])
        if code != 0:
            self.last_error = (err or out).strip().splitlines()[-1:] or [f"exit status {code}"]
            return None
        try:
            value = json.loads(out)
        except ValueError:
            self.last_error = [f"`dropgate {' '.join(args)} --json` printed no JSON"]
            return None
        self.last_error = []
        return value


def find_run(history: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any] | None:
    """The oldest run newer than `after` of this archive's bytes (or the retry of `retry_of`).

    A run taken but not hashed yet is matched by its name, and only while no run
    of these bytes is there; the caller checks its bytes once they are known.
    """
    newer = [run for run in reversed(history) if int(run["id"]) > params["after"]]  # oldest first
    if params["retry_of"] is not None:
        return next((run for run in newer if run.get("retry_of") == params["retry_of"]), None)
    hashed = [run for run in newer if run.get("sha256") == params["sha256"]]
    if hashed:
        return hashed[0]
    return next((run for run in newer if not run.get("sha256") and run.get("archive") == params["name"]), None)


def waiting_for(run: dict[str, Any]) -> str | None:
    """`approval` or `window` when the run waits for the site's own gates, else None."""
    if run.get("outcome") is not None:
        return None
    if run.get("step") == "approval" and "approved_at" not in (run.get("facts") or {}):
        return "approval"
    if run.get("step") == "window":
        facts = run.get("facts") or {}
        if "window_waiting" in facts:
            return "window" if facts["window_waiting"] else None
        # A site whose dropgate predates that fact says it only in the window step's last event.
        events = run.get("events") or []
        last = events[-1] if events else {}
        if last.get("step") == "window" and str(last.get("message", "")).startswith("waiting"):
            return "window"
    return None


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "command": {"type": "str", "default": "/usr/bin/dropgate"},
            "config": {"type": "str", "default": "/etc/dropgate/dropgate.yaml"},
            "sha256": {"type": "str"},
            "name": {"type": "str"},
            "after": {"type": "int", "default": 0},
            "retry_of": {"type": "int"},
            "run": {"type": "int"},
            "timeout": {"type": "float", "default": 7200.0},
            "pickup_timeout": {"type": "float", "default": 300.0},
            "poll": {"type": "float", "default": 5.0},
        },
        required_one_of=[("sha256", "retry_of", "run")],
        supports_check_mode=True,
    )
    params = module.params
    cli = Cli(module)
    poll = max(0.2, params["poll"])
    # The first looks come quickly (a patch can end in a second), then every `poll` seconds.
    delays = (min(poll, 0.25 * 2**n) for n in range(1_000_000))
    started = time.monotonic()

    def finish(state: str, message: str, run: dict[str, Any] | None = None, **extra: Any) -> None:
        status = cli.json("status")
        module.exit_json(changed=False, state=state, message=message, run=run or {}, status=status or {},
                         waited_seconds=round(time.monotonic() - started, 1), **extra)

    run_id = params["run"]
    pickup_deadline = started + params["pickup_timeout"]
    deadline = started + params["timeout"]
    run: dict[str, Any] | None = None
    while True:
        if run_id is None:
            history = cli.json("history", "--limit", "50")
            found = find_run(history, params) if isinstance(history, list) else None
            if found is not None:
                run_id = int(found["id"])
            elif time.monotonic() >= pickup_deadline:
                what = f"the retry of run {params['retry_of']}" if params["retry_of"] is not None else params["name"]
                why = " ".join(cli.last_error) or "is the daemon running and watching that inbox?"
                finish("not_taken", f"{what} was not taken from the inbox within {params['pickup_timeout']:g}s ({why})")
        if run_id is not None:
            seen = cli.json("show", str(run_id))
            if isinstance(seen, dict):
                if params["run"] is None and params["retry_of"] is None and seen.get("sha256") \
                        and seen["sha256"] != params["sha256"]:
                    run_id = None  # a file of the same name with other bytes: not ours, look again
                    continue
                run = seen
                if run.get("outcome") is not None:
                    finish("ended", run.get("error") or "", run)
                waiting = waiting_for(run)
                if waiting == "approval":
                    finish("waiting", f"run {run_id} waits for approval: `dropgate approve {run_id}` on the site, "
                                      "then rerun the rollout", run, waiting_for=waiting)
                if waiting == "window":
                    finish("waiting", f"run {run_id} waits for a maintenance window; rerun the rollout once it "
                                      "is open", run, waiting_for=waiting)
        if time.monotonic() >= deadline:
            where = f"still in {run['step']}" if run else f"not readable ({' '.join(cli.last_error)})"
            finish("timeout", f"run {run_id} is {where} after the time limit of {params['timeout']:g}s: "
                              "look at it with `dropgate status`; rerun the rollout to follow it again", run)
        time.sleep(next(delays))


if __name__ == "__main__":
    main()
