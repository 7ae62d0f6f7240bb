"""Taking a snapshot: walk, share or copy, write the manifest, run the dumps, verify, sync, rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.errors import NoSpace, SnapshotError
from pipeline.snapshot.catalog import SnapshotInfo, read_summary, write_json_atomic
from pipeline.snapshot.copier import Copied, Copier, link_previous
from pipeline.snapshot.layout import (
    BUFFER,
    DATA,
    DUMPS,
    FORMAT,
    MANIFEST,
    SUMMARY,
    format_bytes,
    partial_dir,
    root_names,
)
from pipeline.snapshot.manifest import FILE_KEYS, Previous
from pipeline.snapshot.progress import Checkpoint, DumpWriter, Progress, Throttle, no_checkpoint, no_progress
from pipeline.snapshot.space import Space, estimate_with, probe_space, translate_os_error
from pipeline.snapshot.tree import (
    apply_meta,
    can_chown,
    file_fields,
    file_sha256,
    fsync_dir,
    kind_of,
    meta_fields,
    read_xattrs,
    sync_filesystem,
    walk_tree,
)
from pipeline.snapshot.verify import verify_snapshot


def take_snapshot(
    sources: Sequence[Path],
    dest: Path,
    previous: Path | None = None,
    *,
    run_id: int,
    dumps: Sequence[tuple[str, DumpWriter]] = (),
    checkpoint: Checkpoint = no_checkpoint,
    progress: Progress = no_progress,
    space: Callable[[Path], Space] = probe_space,
    workers: int | None = None,
    reflink: bool = True,
    durable: bool = True,
    write: Callable[[int, memoryview], int] = os.write,
    now: Callable[[], float] = time.time,
) -> SnapshotInfo:
    """Snapshot every path of `sources` (and each dump) into `dest`, verified, sharing unchanged files.

    Checks first that the space is there (NoSpace naming the folder and the missing
    bytes, before anything is written); builds the snapshot in a partial folder that
    any failure removes (a full disk raises NoSpace naming the file being copied;
    `write` is the one call that writes file content, for tests without a small filesystem);
    checks every entry against the manifest (type, size, mode, mtime, links; the hashes
    were computed from the copies themselves, shared files' when they were first
    written); syncs it to disk; renames it into place. A previous snapshot whose
    manifest cannot be read is not used: this one is then a full copy.
    """
    if dest.exists():
        raise SnapshotError(f"{dest} already exists; a snapshot is never overwritten")
    missing_sources = [str(source) for source in sources if not os.path.lexists(source)]
    if missing_sources:
        raise SnapshotError(f"data path {', '.join(missing_sources)} does not exist")
    try:
        prev = Previous.load(previous)
    except (SnapshotError, KeyError, TypeError):
        prev = Previous.load(None)
    created = now()
    dump_hint = sum(prev.dumps.values())
    estimate = estimate_with(sources, prev, dump_hint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = space(dest.parent)
    if estimate.need_bytes > free.free_bytes:
        missing = estimate.need_bytes - free.free_bytes
        raise NoSpace(
            f"not enough space for the backup in {dest.parent}: {format_bytes(estimate.need_bytes)} needed "
            f"({estimate.new_files:,} files to copy), {format_bytes(free.free_bytes)} free, "
            f"{missing:,} bytes missing",
            path=dest.parent,
            missing=missing,
        )
    if estimate.need_inodes > free.free_inodes:
        raise NoSpace(
            f"not enough inodes for the backup in {dest.parent}: {estimate.need_inodes:,} needed, "
            f"{free.free_inodes:,} free",
            path=dest.parent,
            missing=0,
        )
    partial = partial_dir(dest)
    if partial.exists():
        shutil.rmtree(partial)  # left by a run that died; never trusted
    partial.mkdir(mode=0o700)
    throttle = Throttle(progress, estimate.bytes + dump_hint)
    try:
        summary = _fill(
            sources,
            partial=partial,
            prev=prev,
            run_id=run_id,
            created=created,
            dumps=dumps,
            checkpoint=checkpoint,
            throttle=throttle,
            workers=workers,
            reflink=reflink,
            space=space,
            write=write,
        )
        _check_verified(partial, verify_snapshot(partial, hashes=False, checkpoint=checkpoint))
        summary["verified_at"] = now()
        summary["verify_problems"] = []
        summary["finished"] = now()
        write_json_atomic(partial / SUMMARY, summary)
        if durable:
            sync_filesystem(partial)
        checkpoint()
        os.rename(partial, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    throttle.add(max(0, throttle.expected - throttle.done), force=True)  # complete, whatever vanished
    return read_summary(dest)


def _check_verified(dest: Path, problems: Sequence[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise SnapshotError(f"the snapshot {dest} failed verification: {problems[0]}{more}")


def _fill(
    sources: Sequence[Path],
    *,
    partial: Path,
    prev: Previous,
    run_id: int,
    created: float,
    dumps: Sequence[tuple[str, DumpWriter]],
    checkpoint: Checkpoint,
    throttle: Throttle,
    workers: int | None,
    reflink: bool,
    space: Callable[[Path], Space],
    write: Callable[[int, memoryview], int],
) -> dict[str, Any]:
    """Copy or link every entry into `partial`, write the manifest, run the dumps; return the summary."""
    owner = can_chown()
    names = root_names(sources)
    copier = Copier(reflink, write)
    counts = dict.fromkeys(
        ("files", "dirs", "bytes", "new_files", "new_bytes", "shared_files", "changing_files", "vanished_files"), 0
    )
    folders: list[tuple[str, dict[str, Any]]] = []  # folder times are set once their content is in
    pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1), thread_name_prefix="snapshot")
    window: deque[tuple[dict[str, Any], str, Future[Copied]]] = deque()
    limit = 64
    manifest_path = partial / MANIFEST
    current = ""

    def settle(manifest: Any, block: bool) -> None:
        while window and (block or len(window) >= limit or window[0][2].done()):
            entry, src, future = window.popleft()
            try:
                copied = future.result()
            except FileNotFoundError as error:
                if error.filename != src:
                    raise translate_os_error(error, src, partial, space, throttle) from error
                counts["vanished_files"] += 1  # removed by the platform since the walk saw it
                counts["files"] -= 1
                continue
            except OSError as error:
                raise translate_os_error(error, src, partial, space, throttle) from error
            entry.update(file_fields(copied.info), size=copied.size, sha256=copied.sha256)
            if copied.xattrs:
                entry["xattrs"] = copied.xattrs
            manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
            counts["new_files"] += 1
            counts["new_bytes"] += copied.size
            counts["bytes"] += copied.size
            counts["changing_files"] += not copied.settled
            throttle.add(copied.size)

    manifest = None
    try:
        manifest = open(manifest_path, "w", encoding="utf-8")  # noqa: SIM115 - closed below, quietly on failure
        header = {
            "format": FORMAT,
            "run": run_id,
            "created": created,
            "previous": prev.run,
            "roots": [{"name": name, "source": str(src)} for name, src in zip(names, sources, strict=True)],
        }
        manifest.write(json.dumps(header, separators=(",", ":")) + "\n")
        (partial / DATA).mkdir()
        for name, source_path in zip(names, sources, strict=True):
            source, base = str(source_path), str(partial / DATA / name)
            inodes: dict[tuple[int, int], str] = {}  # files with several names: the first name seen
            links: list[tuple[str, str, dict[str, Any]]] = []  # made once every file of this path is in
            for rel, info in walk_tree(source_path):
                checkpoint()
                kind = kind_of(info)
                if kind is None:
                    continue
                src = source if rel == "." else f"{source}/{rel}"
                dst = base if rel == "." else f"{base}/{rel}"
                current = src
                entry: dict[str, Any] = {"root": name, "path": rel, "type": kind}
                if kind == "dir":
                    os.mkdir(dst, 0o700)
                    entry.update(meta_fields(info))
                    xattrs = read_xattrs(src)
                    if xattrs:
                        entry["xattrs"] = xattrs
                    folders.append((dst, entry))
                    counts["dirs"] += 1
                    manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
                elif kind == "symlink":
                    try:
                        target = os.readlink(src)
                    except FileNotFoundError:
                        counts["vanished_files"] += 1
                        continue
                    os.symlink(target, dst)
                    entry.update(meta_fields(info), target=target)
                    xattrs = read_xattrs(src)
                    if xattrs:
                        entry["xattrs"] = xattrs
                    apply_meta(dst, entry, owner)
                    manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
                elif info.st_nlink > 1 and (info.st_dev, info.st_ino) in inodes:
                    first = inodes[(info.st_dev, info.st_ino)]
                    entry.update(target=first)
                    entry["type"] = "hardlink"
                    links.append((f"{base}/{first}", dst, entry))
                    counts["files"] += 1
                else:
                    if info.st_nlink > 1:
                        inodes[(info.st_dev, info.st_ino)] = rel
                    counts["files"] += 1
                    shared = prev.unchanged(source, rel, info)
                    if shared is not None and link_previous(prev.copy_of(source, rel), dst, shared):
                        entry.update((k, v) for k, v in zip(FILE_KEYS, shared, strict=True) if v is not None)
                        counts["shared_files"] += 1
                        counts["bytes"] += info.st_size
                        throttle.add(info.st_size)
                        manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
                    else:
                        window.append((entry, src, pool.submit(copier.copy, src, dst, owner)))
                settle(manifest, block=False)
            if links:
                settle(manifest, block=True)
                for first_copy, dst, entry in links:
                    current = dst
                    try:
                        os.link(first_copy, dst)
                    except FileNotFoundError:
                        counts["vanished_files"] += 1  # its first name was removed before it was copied
                        counts["files"] -= 1
                        continue
                    manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
        settle(manifest, block=True)
        for dst, entry in reversed(folders):
            apply_meta(dst, entry, owner)
        current = str(manifest_path)
        manifest.flush()
        dump_sizes = _run_dumps(
            partial, dumps, manifest=manifest, checkpoint=checkpoint, throttle=throttle, space=space
        )
        current = str(manifest_path)
        manifest.flush()
        os.fsync(manifest.fileno())
        manifest.close()
    except OSError as error:
        raise translate_os_error(error, current, partial, space, throttle) from error
    finally:
        copier.stop.set()  # nothing is left to copy on success; on failure, copies in progress end early
        pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(OSError, AttributeError):
            manifest.close()  # type: ignore[union-attr]  # after a failure (a full disk) the buffered lines are lost with the partial folder
    return {
        "format": FORMAT,
        "run": run_id,
        "created": created,
        "previous": prev.run,
        "sources": [str(source) for source in sources],
        **counts,
        "cloned_files": copier.cloned,
        "dumps": dump_sizes,
        "manifest_sha256": file_sha256(manifest_path),
    }


def _run_dumps(
    partial: Path,
    dumps: Sequence[tuple[str, DumpWriter]],
    *,
    manifest: Any,
    checkpoint: Checkpoint,
    throttle: Throttle,
    space: Callable[[Path], Space],
) -> dict[str, int]:
    sizes: dict[str, int] = {}
    if not dumps:
        return sizes
    folder = partial / DUMPS
    folder.mkdir(mode=0o700)
    for name, write in dumps:
        checkpoint()
        target = folder / name
        try:
            write(target)
        except Exception as error:
            written = target.stat().st_size if target.exists() else 0
            if space(partial).free_bytes < BUFFER:
                raise NoSpace(
                    f"the backup disk filled while writing the dump {name} to {target} "
                    f"({written:,} bytes written, {space(partial).free_bytes:,} free; its full size is unknown)",
                    path=target,
                    missing=0,
                ) from error
            raise
        info = os.stat(target)
        os.chmod(target, 0o600)
        entry = {"root": DUMPS, "path": name, "type": "dump", "size": info.st_size, "sha256": file_sha256(target)}
        manifest.write(json.dumps(entry, separators=(",", ":")) + "\n")
        sizes[name] = info.st_size
        throttle.add(info.st_size)
    return sizes
