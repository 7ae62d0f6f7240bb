"""Taking a snapshot: walk, share or copy, write the manifest, run the dumps, verify, sync, rename."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.errors import NoSpace, SnapshotError
from pipeline.snapshot.catalog import SnapshotInfo, read_summary, write_json_atomic
from pipeline.snapshot.copier import Copied, Copier, Sharer
from pipeline.snapshot.layout import (
    BLOCK,
    BUFFER,
    DATA,
    DUMPS,
    FORMAT,
    MANIFEST,
    SUMMARY,
    entry_folder,
    partial_dir,
    root_names,
)
from pipeline.snapshot.linker import REFUSED, LinkHelper
from pipeline.snapshot.manifest import ManifestWriter, Placed, Previous, encode_entry
from pipeline.snapshot.places import (
    BATCH_BYTES,
    BATCH_FILES,
    LINK_BATCH,
    Copy,
    InFlight,
    Linking,
    copy_files,
    shared_line,
)
from pipeline.snapshot.progress import Checkpoint, DumpWriter, Progress, Throttle, no_checkpoint, no_progress
from pipeline.snapshot.space import Space, Tally, disk_error, estimate_with, probe_space, refusal
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

log = logging.getLogger(__name__)

_LINK_HELPER_FILES = 2000  # a previous snapshot with fewer files is linked by the walk itself


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

    Makes sure the space is there (NoSpace naming the folder and the missing
    bytes): a first snapshot walks the data before writing anything; a later one
    counts its need as it goes, stops writing before it would need more than was
    free when it began, and walks on to tell the whole need. Builds the snapshot
    in a partial folder that any failure removes (a disk that fills meanwhile
    raises NoSpace naming what was being written and the bytes; `write` is the
    one call that writes file content, for tests without a small filesystem);
    checks every entry against the manifest read back (type, size, mode, mtime,
    links; the hashes were taken from the bytes as they were written, shared
    files' when their bytes were first copied); syncs it to disk; renames it into
    place. A previous snapshot that cannot be used is not: this one is then a
    full copy. What is trusted without reading: docs/backups.md.
    """
    if dest.exists():
        raise SnapshotError(f"{dest} already exists; a snapshot is never overwritten")
    missing_sources = [str(source) for source in sources if not os.path.lexists(source)]
    if missing_sources:
        raise SnapshotError(f"data path {', '.join(missing_sources)} does not exist")
    try:
        prev = Previous.load(previous)
    except (SnapshotError, KeyError, TypeError, ValueError):
        prev = Previous.load(None)
    created = now()
    dump_hint = sum(prev.dumps.values())
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = space(dest.parent)
    if prev.run is None:
        # A full copy: walk first to know the space needed and the bytes to come (the walk costs little
        # beside the copy). Later snapshots skip this walk: the fill keeps within `free` as it goes.
        estimate = estimate_with(sources, prev, dump_hint)
        refused = refusal(estimate, free, dest.parent)
        if refused is not None:
            raise refused
        throttle = Throttle(progress, estimate.bytes + dump_hint)
        guard = None
    else:
        throttle = Throttle(progress, prev.bytes + dump_hint, below_end=True)
        guard = free
    partial = partial_dir(dest)
    if partial.exists():
        shutil.rmtree(partial)  # left by a run that died; never trusted
    backups = dest.parent

    def full(error: OSError, doing: str, path: Path, this_file: int) -> SnapshotError:
        left = max(0, throttle.expected - throttle.done) + this_file
        return disk_error(error, backups=backups, doing=doing, path=path, still_to_write=left, space=space)

    try:
        partial.mkdir(mode=0o700)
    except OSError as error:
        raise full(error, f"creating {partial}", partial, BLOCK) from error
    try:
        summary, placed = _fill(
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
            guard=guard,
            dump_hint=dump_hint,
        )
        _check_verified(partial, verify_snapshot(partial, hashes=False, placed=placed, checkpoint=checkpoint))
        summary["verified_at"] = now()
        summary["verify_problems"] = []
        summary["finished"] = now()
        try:
            write_json_atomic(partial / SUMMARY, summary)
        except OSError as error:
            size = len(json.dumps(summary, indent=1, sort_keys=True)) + 1
            raise full(error, f"writing the snapshot's summary {partial / SUMMARY}", partial / SUMMARY, size) from error
        if durable:
            try:
                sync_filesystem(partial)
            except OSError as error:
                raise full(error, f"syncing {partial} to disk", partial, 0) from error
        checkpoint()
        os.rename(partial, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    throttle.finish()  # complete, whatever vanished
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
    guard: Space | None,
    dump_hint: int,
) -> tuple[dict[str, Any], Placed]:
    """Copy or link every entry into `partial`, write the manifest, run the dumps.

    Returns the summary, and the manifest lines whose entry was checked where it landed
    (a linked file's lstat against its record, a copy's fstat against the source's mode,
    mtime and owner): the check after taking need not look at them again.

    With a `guard` (the space free when the snapshot began, no estimate made), the need
    is counted along the walk; once it exceeds the guard nothing more is written, the
    walk goes on counting, and NoSpace says the whole need.

    The manifest lists each data path's entries in the order of the walk (the next
    snapshot reads it along its own walk); a file being copied holds its place.
    """
    owner = can_chown()
    names = root_names(sources)
    copier = Copier(reflink, write)
    sharer = Sharer()  # unchanged files: linked from the previous snapshot by the walk, or by a helper process
    helper = None
    if prev.file_count >= _LINK_HELPER_FILES:
        try:
            helper = LinkHelper()
        except OSError as error:
            log.warning("snapshot: %s; the walk links the unchanged files itself", error.strerror)
            helper = None
    counts = dict.fromkeys(
        ("files", "dirs", "bytes", "new_files", "new_bytes", "shared_files", "changing_files", "vanished_files"), 0
    )
    folders: list[tuple[str, dict[str, Any]]] = []  # folder times are set once their content is in
    pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1), thread_name_prefix="snapshot")
    # Manifest lines in walk order (each with its folder if its entry was checked where it landed), and copies
    # holding their place.
    window: deque[tuple[str, str | None] | InFlight | Linking] = deque()
    in_flight = 0
    limit, most = 64, 4096  # copies in flight; lines waiting behind the oldest copy
    backups = partial.parent
    doing, where = "", ""  # what was being done (`{}`: where), for the error

    def translate(error: OSError, what: str, path: str | Path, this_file: int) -> SnapshotError:
        left = max(0, throttle.expected - throttle.done) + this_file
        return disk_error(error, backups=backups, doing=what, path=path, still_to_write=left, space=space)

    manifest = ManifestWriter(partial / MANIFEST, translate)
    tally, short = Tally(dump_hint), False  # with a guard: what the snapshot needs so far; over it: stop writing

    def submit(batch: InFlight | Linking) -> None:
        if isinstance(batch, InFlight):
            batch.future = pool.submit(copy_files, copier, batch.files, owner)
            return
        assert helper is not None
        previous_folder = prev.copy_of(batch.source, batch.folder or ".")
        folder = f"{batch.base}/{batch.folder}" if batch.folder else batch.base
        expected = [number for _name, _size, match in batch.files for number in match.expected]
        batch.future = helper.submit(previous_folder, folder, [name for name, _, _ in batch.files], expected)

    def settle_links(batch: Linking, codes: Sequence[int]) -> None:
        """The helper's answers, in walk order: a linked file's line as it was; any other, copied here."""
        placed_in = entry_folder(batch.root, batch.path(batch.files[0][0]))  # one folder for the batch
        for (name, size, match), code in zip(batch.files, codes, strict=True):
            if code == 0:
                manifest.add(shared_line(match, batch.root, renamed=batch.renamed), placed_in)
                counts["shared_files"] += 1
                counts["bytes"] += size
                throttle.add(size)
                continue
            rel = batch.path(name)
            item = Copy({"root": batch.root, "path": rel, "type": "file"}, f"{batch.source}/{rel}",
                         f"{batch.base}/{rel}", None, None, size, batch.renamed)
            if code != REFUSED:
                settle_one(item, OSError(code, os.strerror(code), item.dst))
                continue
            try:  # the previous copy is gone or not as recorded (rare): copied here and now
                copied: Copied | OSError = copier.copy(item.src, item.dst, owner)
            except OSError as error:
                copied = error
            settle_one(item, copied)

    def settle(block: bool) -> None:
        nonlocal in_flight
        while window:
            head = window[0]
            if isinstance(head, tuple):
                manifest.add(*head)
                window.popleft()
                continue
            if head.future is None:
                if isinstance(head, Linking) and head is window[-1] and not block:
                    return  # the walk may still add files of this folder
                submit(head)
            assert head.future is not None
            if not (block or in_flight >= limit or len(window) >= most or head.future.done()):
                return
            window.popleft()
            in_flight -= 1
            if isinstance(head, Linking):
                settle_links(head, head.future.result())
                continue
            for item, copied in zip(head.files, head.future.result(), strict=True):
                settle_one(item, copied)

    def settle_one(item: Copy, copied: Copied | OSError | None) -> None:
        if isinstance(copied, (FileNotFoundError, NotADirectoryError)) and copied.filename == item.src:
            counts["vanished_files"] += 1  # removed by the platform since the walk saw it, or its folder was
            counts["files"] -= 1
            return
        if isinstance(copied, OSError):
            raise translate(copied, f"copying {item.src}", item.src, 0) from copied
        entry = item.entry
        if copied is None:
            assert item.match is not None
            line = shared_line(item.match, entry["root"], renamed=item.renamed)
            manifest.add(line, entry_folder(entry["root"], entry["path"]))
            counts["shared_files"] += 1
            counts["bytes"] += item.size
            throttle.add(item.size)
            return
        entry.update(file_fields(copied.info), size=copied.size, sha256=copied.sha256)
        if copied.xattrs:
            entry["xattrs"] = copied.xattrs
        placed_in = entry_folder(entry["root"], entry["path"]) if copied.stored_as_copied(owner) else None
        manifest.add(encode_entry(entry), placed_in)
        counts["new_files"] += 1
        counts["new_bytes"] += copied.size
        counts["bytes"] += copied.size
        counts["changing_files"] += not copied.settled
        throttle.add(copied.size)

    def push(line: str, placed_in: str | None = None) -> None:
        """A manifest line after those of the files already on their way (an open batch closes)."""
        if window and not isinstance(window[-1], tuple) and window[-1].future is None:
            submit(window[-1])
        window.append((line, placed_in))

    try:
        header = {
            "format": FORMAT,
            "run": run_id,
            "created": created,
            "previous": prev.run,
            "roots": [{"name": name, "source": str(src)} for name, src in zip(names, sources, strict=True)],
        }
        manifest.add(encode_entry(header))
        doing, where = "creating {}", str(partial / DATA)
        (partial / DATA).mkdir()
        for name, source_path in zip(names, sources, strict=True):
            source, base = str(source_path), str(partial / DATA / name)
            inodes: dict[tuple[int, int], str] = {}  # files with several names: the first name seen
            links: list[tuple[str, str, dict[str, Any]]] = []  # made once every file of this path is in
            known = prev.files(source)
            renamed = prev.names.get(source, name) != name
            try:
                for rel, info in walk_tree(source_path):
                    checkpoint()
                    kind = kind_of(info)
                    if kind is None:
                        continue
                    second_name = kind == "file" and info.st_nlink > 1 and (info.st_dev, info.st_ino) in inodes
                    match = None
                    if kind == "file" and not second_name:
                        if info.st_nlink > 1:
                            inodes[(info.st_dev, info.st_ino)] = rel
                        match = known.match(rel, info)
                    if guard is not None:
                        new = match is None or match.racy
                        tally.entry(name, rel, "name" if second_name else kind, info.st_size, new=new)
                        if short or tally.over(guard):
                            if not short:
                                short = True
                                copier.stop.set()  # nothing more is written; copies in progress end early
                            continue
                    src = source if rel == "." else f"{source}/{rel}"
                    dst = base if rel == "." else f"{base}/{rel}"
                    doing, where = "creating {}", dst
                    if kind == "file" and not second_name:
                        counts["files"] += 1
                        if match is not None and not match.racy and helper is not None and rel != ".":
                            folder, _, file_name = rel.rpartition("/")
                            last = window[-1] if window else None
                            if (
                                isinstance(last, Linking)
                                and last.future is None
                                and last.folder == folder
                                and len(last.files) < LINK_BATCH
                            ):
                                last.files.append((file_name, info.st_size, match))
                                continue
                            if isinstance(last, (InFlight, Linking)) and last.future is None:
                                submit(last)
                            window.append(
                                Linking(name, renamed, source, base, folder, [(file_name, info.st_size, match)])
                            )
                            in_flight += 1
                            settle(block=False)
                            continue
                        if match is not None and not match.racy:
                            if sharer.link(prev.copy_of(source, rel), dst, match.holds):
                                line, folder = shared_line(match, name, renamed=renamed), entry_folder(name, rel)
                                if window:
                                    push(line, folder)
                                    settle(block=False)
                                else:  # no copy holds a place before it
                                    manifest.add(line, folder)
                                counts["shared_files"] += 1
                                counts["bytes"] += info.st_size
                                throttle.add(info.st_size)
                                continue
                            match = None
                        item = Copy(
                            {"root": name, "path": rel, "type": kind},
                            src,
                            dst,
                            prev.copy_of(source, rel) if match is not None else None,
                            match,
                            info.st_size,
                            renamed,
                        )
                        last = window[-1] if window else None
                        if (
                            isinstance(last, InFlight)
                            and last.future is None
                            and match is None
                            and info.st_size < BATCH_BYTES
                            and last.bytes + info.st_size <= BATCH_BYTES
                            and len(last.files) < BATCH_FILES
                        ):
                            last.files.append(item)  # a small file joins the batch just before it
                            last.bytes += info.st_size
                        else:
                            if isinstance(last, (InFlight, Linking)) and last.future is None:
                                submit(last)
                            window.append(InFlight([item], info.st_size))
                            in_flight += 1
                    elif kind == "dir":
                        os.mkdir(dst, 0o700)
                        entry: dict[str, Any] = {"root": name, "path": rel, "type": kind, **meta_fields(info)}
                        xattrs = read_xattrs(src)
                        if xattrs:
                            entry["xattrs"] = xattrs
                        folders.append((dst, entry))
                        counts["dirs"] += 1
                        push(encode_entry(entry))
                    elif kind == "symlink":
                        try:
                            target = os.readlink(src)
                        except FileNotFoundError:
                            counts["vanished_files"] += 1
                            continue
                        os.symlink(target, dst)
                        entry = {"root": name, "path": rel, "type": kind, **meta_fields(info), "target": target}
                        xattrs = read_xattrs(src)
                        if xattrs:
                            entry["xattrs"] = xattrs
                        apply_meta(dst, entry, owner)
                        push(encode_entry(entry))
                    else:  # a second name of a file seen before
                        first = inodes[(info.st_dev, info.st_ino)]
                        entry = {"root": name, "path": rel, "type": "hardlink", "target": first}
                        links.append((f"{base}/{first}", dst, entry))
                        counts["files"] += 1
                    settle(block=False)
            finally:
                known.close()
            if links and not short:
                settle(block=True)
                for first_copy, dst, entry in links:
                    doing, where = "creating {}", dst
                    try:
                        os.link(first_copy, dst)
                    except FileNotFoundError:
                        counts["vanished_files"] += 1  # its first name was removed before it was copied
                        counts["files"] -= 1
                        continue
                    push(encode_entry(entry))
        if short:
            assert guard is not None
            refused = refusal(tally.estimate(), guard, backups)
            assert refused is not None  # the guard trips exactly when the need no longer fits
            raise refused
        settle(block=True)
        for dst, entry in reversed(folders):
            doing, where = "setting the times of {}", dst
            apply_meta(dst, entry, owner)
        dump_sizes = _run_dumps(
            partial, dumps, manifest=manifest, checkpoint=checkpoint, throttle=throttle, space=space
        )
        manifest.close()
    except OSError as error:
        raise translate(error, doing.format(where), where, BLOCK) from error
    finally:
        if helper is not None:
            helper.close()  # killed and waited for: nothing links into the partial folder once it is removed
        sharer.close()
        copier.stop.set()  # nothing is left to copy on success; on failure, copies in progress end early
        pool.shutdown(wait=True, cancel_futures=True)
        copier.close()
        manifest.abandon()  # after a failure (a full disk) the lines not written are lost with the partial folder
    on_disk = file_sha256(manifest.path)
    manifest.check_written(on_disk)
    summary = {
        "format": FORMAT,
        "run": run_id,
        "created": created,
        "previous": prev.run,
        "sources": [str(source) for source in sources],
        **counts,
        "cloned_files": copier.cloned,
        "dumps": dump_sizes,
        "manifest_sha256": on_disk,
    }
    return summary, manifest.placed


def _run_dumps(
    partial: Path,
    dumps: Sequence[tuple[str, DumpWriter]],
    *,
    manifest: ManifestWriter,
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
        manifest.add(encode_entry(entry))
        sizes[name] = info.st_size
        throttle.add(info.st_size)
    return sizes
