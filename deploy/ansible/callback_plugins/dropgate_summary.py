"""Ansible callback: the summary of a dropgate rollout, printed at the end however the rollout ended.

rollout.yml gives every site it reaches a fact `dropgate_site` (its line: outcome,
versions before and after, downtime, run id). This plugin collects those facts,
notes which wave each site was in, which sites failed before they had a line,
and which were never reached (the rollout stopped first), and prints one table
after Ansible's own recap — also when a failed wave stopped the play, which is
why this is a callback and not a last task.

With DROPGATE_ROLLOUT_SUMMARY=FILE (or `summary_file` under
[callback_dropgate_summary] in ansible.cfg) it also writes the summary as JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: dropgate_summary
type: aggregate
short_description: the per-site summary of a dropgate rollout
description:
  - Prints, at the end of rollout.yml, one line per site (outcome, versions before and after,
    downtime, run id), including the sites the rollout never reached, and optionally writes it as JSON.
options:
  summary_file:
    description: also write the summary as JSON to this file
    env:
      - name: DROPGATE_ROLLOUT_SUMMARY
    ini:
      - section: callback_dropgate_summary
        key: summary_file
"""


FINE = ("succeeded", "skipped", "waiting", "planned")


def _result(result: Any) -> dict[str, Any]:
    """The task's result dict (`result` from ansible-core 2.19 on, `_result` before)."""
    value = getattr(result, "result", None)
    return dict(value if isinstance(value, dict) else result._result)


def _host(result: Any) -> str:
    host = getattr(result, "host", None) or result._host
    return str(host.get_name())


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.1f}s" if value < 120 else f"{value / 60:.1f}m"


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "dropgate_summary"
    # Found beside rollout.yml, it runs without being listed in callbacks_enabled.
    CALLBACK_NEEDS_ENABLED = False

    def __init__(self) -> None:
        super().__init__()
        self.archive: dict[str, Any] = {}
        self.hosts: list[str] = []
        self.records: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, dict[str, Any]] = {}
        self.waves: dict[str, int] = {}
        self.wave = 0
        self.in_rollout = False
        self.stopped = ""

    # -- what Ansible tells ------------------------------------------------------------
    def v2_playbook_on_play_start(self, play: Any) -> None:
        # With `serial`, each wave starts the play again.
        self.in_rollout = bool((getattr(play, "vars", None) or {}).get("dropgate_rollout_play"))
        if self.in_rollout:
            self.wave += 1

    def v2_runner_on_ok(self, result: Any) -> None:
        facts = _result(result).get("ansible_facts") or {}
        host = _host(result)
        if "rollout_archive" in facts:
            self.archive = dict(facts["rollout_archive"])
        if "dropgate_rollout_hosts" in facts:
            for name in facts["dropgate_rollout_hosts"]:
                if name not in self.hosts:
                    self.hosts.append(str(name))
        if "dropgate_rollout_stopped" in facts:
            self.stopped = str(facts["dropgate_rollout_stopped"])
        if self.in_rollout:
            self.waves.setdefault(host, self.wave)
        if "dropgate_site" in facts:
            self.records[host] = dict(facts["dropgate_site"])

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        if ignore_errors or not self.in_rollout:
            return
        host = _host(result)
        self.waves.setdefault(host, self.wave)
        if host not in self.records:
            body = _result(result)
            message = str(body.get("msg") or "").strip()
            if body.get("stderr"):
                message = str(body["stderr"]).strip().splitlines()[-1]
            self.errors[host] = {"outcome": "error", "note": message[:300]}

    def v2_runner_on_unreachable(self, result: Any) -> None:
        if not self.in_rollout:
            return
        host = _host(result)
        self.waves.setdefault(host, self.wave)
        message = str(_result(result).get("msg") or "").strip().splitlines()
        self.errors[host] = {"outcome": "unreachable", "note": (message[-1] if message else "")[:300]}

    def v2_playbook_on_stats(self, stats: Any) -> None:
        if not self.archive and not self.records:
            return  # not a rollout (site.yml, or another playbook in this folder)
        summary = self.summary()
        self._display.display(self.render(summary))
        try:
            path = self.get_option("summary_file")
        except KeyError:  # options not loaded (an old ansible-core): the environment still says
            path = None
        path = path or os.environ.get("DROPGATE_ROLLOUT_SUMMARY")
        if path:
            temporary = f"{path}.part"
            with open(temporary, "w", encoding="utf-8") as out:
                json.dump(summary, out, indent=2, default=str)
                out.write("\n")
            os.replace(temporary, path)

    # -- the summary ---------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        sites = []
        names = self.hosts + [h for h in [*self.records, *self.errors] if h not in self.hosts]
        for host in names:
            record = self.records.get(host)
            if record is None:
                record = {"site": host, "outcome": "not reached", "note": "untouched"}
                record.update(self.errors.get(host, {}))
            record = {"site": host, "wave": self.waves.get(host), **record}
            sites.append(record)
        bad = [s for s in sites if s["outcome"] not in (*FINE, "not reached")]
        waiting = [s for s in sites if s["outcome"] == "waiting"]
        unreached = [s for s in sites if s["outcome"] == "not reached"]
        if bad:
            result = "stopped: " + ", ".join(f"{s['site']} {s['outcome']}" for s in bad)
        elif self.stopped:
            result = f"stopped: {self.stopped}"
        elif unreached:
            result = "incomplete: some sites were not reached"
        elif waiting:
            result = "done, some sites wait for their own approval or window: rerun later to follow them"
        else:
            result = "done"
        counts: dict[str, int] = {}
        for site in sites:
            counts[site["outcome"]] = counts.get(site["outcome"], 0) + 1
        return {"archive": self.archive, "result": result, "counts": counts, "sites": sites}

    @staticmethod
    def render(summary: dict[str, Any]) -> str:
        archive = summary["archive"]
        title = archive.get("name", "?")
        if archive.get("sha256"):
            title += f" (sha256 {archive['sha256'][:12]}…)"
        header = ("wave", "site", "outcome", "before", "after", "downtime", "run", "note")
        rows = [header]
        for site in summary["sites"]:
            rows.append((
                str(site.get("wave") or "-"), site["site"], site["outcome"], str(site.get("before") or "-"),
                str(site.get("after") or "-"), _seconds(site.get("downtime_seconds")), str(site.get("run") or "-"),
                str(site.get("note") or ""),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = [f"DROPGATE ROLLOUT {title}"]
        for row in rows:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
                         + "  " + row[-1])
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(summary["counts"].items()))
        lines.append(f"result: {summary['result']} ({counts})")
        return "\n".join(line.rstrip() for line in lines)
