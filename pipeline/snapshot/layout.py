"""The names of a snapshot's folder and files, and how sizes are printed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

FORMAT = "dropgate-snapshot/1"
SUMMARY = "snapshot.json"
MANIFEST = "manifest.jsonl"
DATA = "data"
DUMPS = "dumps"

BUFFER = 1 << 20
BLOCK = 4096


def format_bytes(count: float) -> str:
    """`1.9 GiB`, `12.0 MiB`, `512 B`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover


def root_names(sources: Sequence[Path]) -> list[str]:
    """The folder name of each data path under `data/`: its base name, made unique."""
    names: list[str] = []
    for source in sources:
        base = source.name or "root"
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def entry_folder(root: str, rel: str) -> str:
    """The snapshot-relative folder holding the entry `rel` of the data path named `root`."""
    if rel == ".":
        return DATA
    head = rel.rpartition("/")[0]
    return f"{DATA}/{root}/{head}" if head else f"{DATA}/{root}"


def snapshot_dir(backups_dir: Path, run_id: int) -> Path:
    return backups_dir / str(run_id)


def partial_dir(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.partial")
