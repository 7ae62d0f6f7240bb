"""Step `validate`: authenticate the archive, check it may go on this platform, stage its release.

Nothing on the platform changes here: the payload is streamed into the run's
staging folder (`platform.root/.staging/<run>/`), where it waits while the
other pre-change steps run (prereq, approval, window). `release_staged`
moves it to `releases/<version>/` when the run leaves them (the runner calls
it as `backup` starts), so a release folder appears under `releases/` only for
a run that passed every pre-change step; any failure removes the staging
folder, so a rejected archive leaves no trace among the releases.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from pipeline.archive import Manifest, authenticate, load_trusted_keys, parse_archive_name, stage_payload
from pipeline.context import StepContext
from pipeline.errors import ArchiveMisnamed, ArchiveRejected, ConfigError, SiteFault, StepFailed
from pipeline.faults import site_fault
from pipeline.release import (
    current_release,
    installed_version,
    plan_downtime,
    release_dir,
    releases_dir,
    staging_dir,
)
from pipeline.versions import Version, upgrade_problem
from states.approval import refuse_if_rejected

BACKGROUND = True  # runs while the platform serves users: at `background` priority (pipeline/priority.py)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size} bytes"


def check_policy(manifest: Manifest, ctx: StepContext, name_product: str, name_version: str) -> str:
    """Name, product, channel and versions; returns the installed version the update starts from."""
    config = ctx.config
    product = config.platform.product
    if manifest.product != name_product:
        raise ArchiveMisnamed(
            f"the archive name {ctx.archive_name} says product {name_product}, "
            f"the signed manifest says {manifest.product} (renamed archive?)"
        )
    if manifest.product != product:
        raise ArchiveRejected(
            f"the archive is for product {manifest.product}, this platform is {product} (platform.product)"
        )
    if Version.parse(name_version) != Version.parse(manifest.version) or name_version != manifest.version:
        raise ArchiveMisnamed(
            f"the archive name {ctx.archive_name} says version {name_version}, "
            f"the signed manifest says {manifest.version} (renamed archive?)"
        )
    if manifest.channel not in config.policy.channels:
        allowed = ", ".join(config.policy.channels)
        raise ArchiveRejected(
            f"channel {manifest.channel} is not allowed here (policy.channels: {allowed}); "
            f"{manifest.version} is an {manifest.channel} release"
        )
    installed = installed_version(config.platform.root)
    problem = upgrade_problem(installed, manifest.version, manifest.min_version, root=config.platform.root)
    if problem is not None or installed is None:
        raise ArchiveRejected(problem or "no installed version")
    return installed


@contextmanager
def staging(path: Path) -> Iterator[Path]:
    """A fresh staging folder (an earlier attempt's is cleared first), removed if the body fails."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        with suppress(OSError):
            path.parent.rmdir()  # only when no other run's staging is there
        raise


def _make_room(target: Path, root: Path) -> None:
    """Clear `releases/<version>` if an earlier attempt left it there; never touch the live release."""
    if not os.path.lexists(target):
        return
    live = current_release(root)
    if live is not None and target.resolve() == live:
        raise ArchiveRejected(f"{target.name} is already installed: {target} is the live release")
    aside = target.with_name(f".{target.name}.replaced")
    shutil.rmtree(aside, ignore_errors=True)
    target.rename(aside)
    shutil.rmtree(aside)


def run(ctx: StepContext) -> None:
    """Authenticate, check and stage the archive; record the manifest and the planned versions."""
    # An operator's rejection is recorded before it is answered: one a crash cut short still holds.
    refuse_if_rejected(ctx)
    config = ctx.config
    limits = config.limits
    root = config.platform.root
    try:
        size = ctx.archive.stat().st_size
    except OSError as error:
        fault = site_fault(error, doing="reading the spooled archive", run_id=ctx.run_id, path=ctx.archive)
        raise fault or StepFailed(f"cannot read the spooled archive {ctx.archive}: {error.strerror}") from error
    if size > limits.max_archive_bytes:
        raise ArchiveRejected(
            f"the archive is {size} bytes, above limits.max_archive_bytes ({limits.max_archive_bytes})"
        )
    name_product, name_version = parse_archive_name(ctx.archive_name)
    if name_product != config.platform.product:
        raise ArchiveMisnamed(
            f"the archive name {ctx.archive_name} is for product {name_product}, "
            f"this platform is {config.platform.product} (platform.product)"
        )
    try:
        keys = load_trusted_keys(config.trust.keys)
    except ConfigError as error:  # the site's trust keys, not the archive
        raise SiteFault(
            f"site problem: cannot authenticate, the trusted keys are unusable: {'; '.join(error.problems)}; "
            f"the archive itself was not judged: fix trust.keys, then drop it again or `dropgate retry {ctx.run_id}`"
        ) from None
    manifest = authenticate(ctx.archive, keys, limits, checkpoint=ctx.checkpoint)
    ctx.event(f"signature ok (key {manifest.key_id}): {manifest.product} {manifest.version} ({manifest.channel})")
    installed = check_policy(manifest, ctx, name_product, name_version)
    folder = staging_dir(root, ctx.run_id)
    try:
        with staging(folder):
            stage_payload(ctx.archive, manifest, folder, limits, checkpoint=ctx.checkpoint, progress=ctx.progress)
            ctx.checkpoint()
            os.sync()  # the staged files are on disk before the run goes on
    except ArchiveRejected:
        raise
    except (OSError, StepFailed) as error:  # a full disk or a permission is the site's, not the archive's
        fault = site_fault(error, doing="staging", run_id=ctx.run_id, path=folder, needed=manifest.unpacked_bytes)
        if fault is None:
            raise
        raise fault from error
    ctx.event(
        f"staged {len(manifest.files)} files, {_megabytes(manifest.unpacked_bytes)} in {folder}; "
        f"it moves to releases/{manifest.version} once the pre-change steps pass"
    )
    downtime, reason = plan_downtime(installed, manifest.version, manifest.downtime)
    ctx.save_facts(
        manifest=manifest.summary(),
        from_version=installed,
        to_version=manifest.version,
        staged_release=str(folder),
        downtime=downtime,
        downtime_reason=reason,
    )
    ctx.update_run(from_version=installed, to_version=manifest.version)


def release_staged(ctx: StepContext) -> None:
    """Move the run's staged release into `releases/<version>` (the run has passed every pre-change step).

    Called by the runner as the run leaves the pre-change steps; does nothing
    when the release was already moved (the facts say where it is).
    """
    staged = ctx.facts.get("staged_release")
    if not staged:
        return
    root = ctx.config.platform.root
    target = release_dir(root, str(ctx.facts["to_version"]))
    folder = Path(staged)
    if not folder.is_dir():
        raise StepFailed(f"the staged release {folder} is missing; validate should have put it there")
    releases_dir(root).mkdir(parents=True, exist_ok=True)
    _make_room(target, root)
    folder.rename(target)
    with suppress(OSError):
        folder.parent.rmdir()  # only when no other run's staging is there
    ctx.facts.pop("staged_release", None)
    ctx.save_facts(release_dir=str(target))
    ctx.event(f"the staged release is now releases/{target.name}")


def discard_staged(root: Path, facts: dict[str, object]) -> Path | None:
    """Remove a staged release that never left the staging folder (a rejected run); the folder removed, or None."""
    staged = facts.pop("staged_release", None)
    if not staged:
        return None
    folder = Path(str(staged))
    if folder.parent != root / ".staging":
        return None  # never anything but a run's staging folder
    shutil.rmtree(folder, ignore_errors=True)
    with suppress(OSError):
        folder.parent.rmdir()
    return folder
