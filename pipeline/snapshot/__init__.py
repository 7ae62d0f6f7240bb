"""Snapshots of the platform's data: take, verify, restore, estimate, prune, list.

A snapshot is a folder `<backups>/<run id>/`:

    snapshot.json     the summary, written last: its presence means complete and verified
    manifest.jsonl    a header line, then one JSON line per folder, file, symlink, hard link and dump
    data/<name>/...   a copy of each data path (`name` is the path's base name, made unique)
    dumps/<name>      the output of each dump command

Manifest lines (`mode` is octal text, times are nanoseconds), each data path's
entries in the order of the walk (a folder's entries by name, subfolders depth
first), written as compact JSON with the keys in this order:

    {"format": "dropgate-snapshot/1", "run": 7, "created": 1795..., "previous": 6,
     "roots": [{"name": "uploads", "source": "/srv/gts/uploads"}]}
    {"root": "uploads", "path": ".", "type": "dir", "mode": "0750", "uid": 990, "gid": 990, "mtime_ns": ...}
    {"root": "uploads", "path": "a/b.pdf", "type": "file", "size": 5120, "mode": "0640", "uid": 990,
     "gid": 990, "mtime_ns": ..., "src_dev": ..., "src_ino": ..., "src_ctime_ns": ..., "sha256": "..."}
    {"root": "uploads", "path": "latest", "type": "symlink", "mode": ..., "target": "a/b.pdf"}
    {"root": "uploads", "path": "a/c.pdf", "type": "hardlink", "target": "a/b.pdf"}
    {"root": "dumps", "path": "db.sql", "type": "dump", "size": ..., "sha256": "..."}

`src_*` identify the live file the copy was read from: while the live file is
still that inode with that ctime, it has not changed since.

Snapshots after the first share every unchanged file with the previous one by
hard link (between snapshots only, never with the live data), so their cost
follows what changed: the previous manifest is read along the walk, and an
unchanged file costs a stat, a comparison of its line, a link and a stat of
the link. New files are hashed as they are copied (the manifest holds the hash
of the bytes stored), cloned where the filesystem can. What is trusted without
reading, and what is hashed when: docs/backups.md. A snapshot is built in
`<backups>/.<run id>.partial/` and renamed into place only once it is complete,
checked against its manifest and synced to disk; any failure removes it.

Restoring copies out of the snapshot (never links to it): files whose inode and
ctime are still those recorded were not touched since the snapshot and are
left alone; everything else is rewritten atomically (temporary name, then
rename), extra entries are removed, names of one file are linked again, and
modes, owners and mtimes are set back.

The package, by responsibility: `layout` (names), `tree` (walk, metadata, hashes),
`manifest` (reading and writing it; the previous snapshot's files), `catalog` (summaries,
listing, pruning), `space` (estimates, a full disk), `progress` (reporting,
stopping), `copier` (one file), `linker` (the helper process that links a large
snapshot's unchanged files), `places` (what holds its place in the manifest while
it is copied or linked), `take`, `verify`, `restore`.
"""

from __future__ import annotations

from pipeline.snapshot.catalog import (
    SnapshotInfo,
    latest_snapshot,
    list_snapshots,
    prune_snapshots,
    read_summary,
    record_verification,
)
from pipeline.snapshot.layout import DATA, DUMPS, FORMAT, MANIFEST, SUMMARY, format_bytes, root_names, snapshot_dir
from pipeline.snapshot.manifest import Manifest, iter_manifest, read_manifest
from pipeline.snapshot.progress import Checkpoint, DumpWriter, Progress
from pipeline.snapshot.restore import RestoreReport, restore_snapshot
from pipeline.snapshot.space import Estimate, Space, estimate_snapshot, probe_space
from pipeline.snapshot.take import take_snapshot
from pipeline.snapshot.tree import read_xattrs
from pipeline.snapshot.verify import verify_snapshot

__all__ = [
    "DATA",
    "DUMPS",
    "FORMAT",
    "MANIFEST",
    "SUMMARY",
    "Checkpoint",
    "DumpWriter",
    "Estimate",
    "Manifest",
    "Progress",
    "RestoreReport",
    "SnapshotInfo",
    "Space",
    "estimate_snapshot",
    "format_bytes",
    "iter_manifest",
    "latest_snapshot",
    "list_snapshots",
    "probe_space",
    "prune_snapshots",
    "read_manifest",
    "read_summary",
    "read_xattrs",
    "record_verification",
    "restore_snapshot",
    "root_names",
    "snapshot_dir",
    "take_snapshot",
    "verify_snapshot",
]
