"""The report as a table for a terminal: the checks, then the preview of the update."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

from pipeline.preflight.preview import Preview
from pipeline.preflight.report import Report
from pipeline.terminal import printable
from states.prereq import Check, format_bytes

WIDTH = 80
SHOWN_FILES = 40  # per kind in the table; --json has them all
SHOWN_SQL_LINES = 60  # per migration in the table; --json has the whole text


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=width, break_long_words=True, break_on_hyphens=False) or [""]


def render_checks(checks: Iterable[Check], width: int = WIDTH) -> list[str]:
    rows = list(checks)
    name_width = min(max((len(c.title) for c in rows), default=5), 22)
    left = 9 + name_width + 2
    lines = [f"{'LEVEL':<9}{'CHECK':<{name_width}}  RESULT"]
    for check in rows:
        body = _wrap(check.message, width - left)
        if len(check.title) > name_width:
            lines.append(f"{check.level:<9}{check.title}")
            lines += [" " * left + part for part in body]
        else:
            lines.append(f"{check.level:<9}{check.title:<{name_width}}  {body[0]}")
            lines += [" " * left + part for part in body[1:]]
    return lines


def _field(label: str, text: str, width: int = WIDTH) -> list[str]:
    body = _wrap(text, width - 14)
    return [f"  {label:<12}{body[0]}"] + [" " * 14 + part for part in body[1:]]


def render_preview(preview: Preview, width: int = WIDTH) -> list[str]:
    data = preview.to_dict()
    changes = preview.changes
    lines = ["", f"Update {preview.archive.name}"]
    lines += _field("Version", f"{preview.from_version or '(none)'} → {data['to_version']} ({data['channel']})")
    lines += _field("Downtime", f"{'yes' if preview.downtime else 'no'}: {preview.downtime_reason}")
    disk = f"release {format_bytes(preview.release_bytes)}, backup up to {format_bytes(preview.backup_bytes)}"
    lines += _field("Disk", f"{disk} (see disk_needed above)")
    growth = changes.growth
    sign = "+" if growth >= 0 else "-"
    summary = (
        f"{len(changes.added)} added, {len(changes.changed)} changed, {len(changes.removed)} removed, "
        f"{changes.unchanged} unchanged ({sign}{format_bytes(abs(growth))})"
    )
    lines += _field("Files", summary)
    for kind, items in (("added", changes.added), ("changed", changes.changed), ("removed", changes.removed)):
        for change in items[:SHOWN_FILES]:
            size = format_bytes(change.size) if change.size is not None else ""
            extra = ""
            if change.kind == "changed":
                extra = f" ({change.what}; was {format_bytes(change.old_size or 0)})"
            elif change.kind == "removed":
                extra = f" (was {format_bytes(change.old_size or 0)})"
            line = f"    {kind:<8} {size:>10}  {change.path}{extra}"
            lines += _wrap(line, width) if len(line) > width else [line]
        if len(items) > SHOWN_FILES:
            lines.append(f"    … and {len(items) - SHOWN_FILES} more {kind} (--json lists them all)")
    scripts = preview.scripts
    if not scripts:
        lines += _field("Scripts", "no hooks, no migrations")
    for index, script in enumerate(scripts, start=1):
        label = "migration" if script.role == "migration" else script.role.replace("_", "-") + " hook"
        lines += _field("Runs" if index == 1 else "", f"{index}. {label} {script.path}")
        lines += _field("", f"   with: {script.runs_with or 'nothing (apply would fail)'}")
        if script.sql is not None:
            sql_lines = script.sql.rstrip("\n").splitlines() or [""]
            for sql_line in sql_lines[:SHOWN_SQL_LINES]:
                lines.append(f"{'':17}| {sql_line}"[:width])
            if len(sql_lines) > SHOWN_SQL_LINES:
                lines.append(f"{'':17}| … {len(sql_lines) - SHOWN_SQL_LINES} more lines (--json has the whole text)")
    notes = str(data["notes"]).strip()
    lines += _field("Notes", "" if notes else "(none)")
    for paragraph in notes.splitlines():
        lines += [" " * 4 + part for part in _wrap(paragraph, width - 4)] if paragraph.strip() else [""]
    return lines


def render(report: Report, width: int = WIDTH) -> str:
    installed = report.installed or "none"
    lines = [f"Installed release: {installed}", ""]
    lines += render_checks(report.checks, width)
    if report.preview is not None:
        lines += render_preview(report.preview, width)
    counts = report.counts()
    if not counts["critical"]:
        verdict = "nothing critical" if report.preview is None else "this update can go ahead"
    else:
        verdict = "not ready" if report.preview is None else "this update would be rejected"
    lines += ["", f"{counts['critical']} critical, {counts['notice']} notice(s), {counts['ok']} ok: {verdict}"]
    # Each element is one line; a name from the archive or the disk cannot add or rewrite one.
    return "\n".join(printable(line.rstrip()) for line in lines)
