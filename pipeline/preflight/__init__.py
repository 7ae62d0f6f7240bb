"""`dropgate preflight [ARCHIVE]`: the server check, and what an update would do.

Without an archive it runs every machine and platform check of the `prereq`
step (plus the gate and the daemon, from the journal, read-only) and prints
them as a table, or as JSON with `--json`. With an archive it first
authenticates it, then adds what the update would do: the versions, whether it
needs downtime and why, the files it adds, changes and removes against the
current release, the hooks and migrations it will run (with the SQL text of
`.sql` migrations), the release notes and the disk it needs. The migrations and
hooks are read from a temporary folder that is removed afterwards; nothing
else is written anywhere.

Exit codes: 0 nothing critical, 1 something critical, 2 configuration or usage error.

`--json` prints one object (keys are stable; new keys may be added):

    ok                  true when no check is critical
    counts              {ok, notice, critical}: how many checks of each level
    installed_version   the live release's version, or null
    checks              [{name, level, subject, message}] in the table's order; name is one of
                        archive, payload, scripts, version, cpus, memory, requirements, free_space,
                        disk_needed, data_paths, health, gate, daemon; subject is a mount point
                        for free_space/disk_needed, else ""
    thresholds          {min_cpus, recommended_cpus, min_memory_gib, recommended_memory_gib,
                        min_free_percent, free_bytes, free_margin_percent, raised_by_archive: [name]}
    filesystems         [{mount, roles, total_bytes, free_bytes, free_percent,
                          needs: {release|backup|archive|archive requirement: bytes}, needed_bytes}]
    update              null without an archive (or when it cannot be authenticated), else
                        {archive, size_bytes, product, version, channel, key_id, min_version,
                         from_version, to_version, downtime, downtime_reason, requirements,
                         files: {added: [{path, size, old_size, what}], changed: [...], removed: [...],
                                 unchanged, growth_bytes},
                         migrations: [{path, role, runs_with, sql}], hooks: {pre_apply, post_apply},
                         scripts: [{path, role, runs_with, sql}] (hooks and migrations in run order),
                         notes, release_bytes, backup_bytes}

`files` compares the archive's files with the current release, `preview`
authenticates the archive and describes what it would do, `report` gathers
every check into one `Report`, `table` renders it, `command` is the command.
"""

from __future__ import annotations

from pipeline.preflight.command import EXIT_CRITICAL, EXIT_OK, EXIT_USAGE, cmd_preflight
from pipeline.preflight.files import FileChange, FileChanges, compare_release, file_mode, file_sha256, release_files
from pipeline.preflight.preview import Preview, Script, check_archive, describe_runner, preview_archive, read_scripts
from pipeline.preflight.report import Report, build_report, check_gate
from pipeline.preflight.table import render, render_checks, render_preview

__all__ = [
    "EXIT_CRITICAL",
    "EXIT_OK",
    "EXIT_USAGE",
    "FileChange",
    "FileChanges",
    "Preview",
    "Report",
    "Script",
    "build_report",
    "check_archive",
    "check_gate",
    "cmd_preflight",
    "compare_release",
    "describe_runner",
    "file_mode",
    "file_sha256",
    "preview_archive",
    "read_scripts",
    "release_files",
    "render",
    "render_checks",
    "render_preview",
]
