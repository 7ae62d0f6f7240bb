"""Step `validate`: authenticate the archive, check it may go on this platform, stage its release.

Nothing on the platform changes here: the payload is streamed into the run's
staging folder (`platform.root/.staging/<run>/`) and only moved to
`releases/<version>/` once every check passed; any failure removes the
staging folder, so a rejected archive leaves no trace among the releases.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from pipeline.archive import Manifest, authenticate, load_trusted_keys, parse_archive_name, stage_payload
from pipeline.context import StepContext
from pipeline.errors import ArchiveRejected, ConfigError, StepFailed
from pipeline.release import (
    current_release,
    installed_version,
    plan_downtime,
    release_dir,
    releases_dir,
    staging_dir,
)
from pipeline.versions import Version, upgrade_problem

BACKGROUND = True  # runs while the platform serves users: at `background` priority (pipeline/priority.py)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size} bytes"


def check_policy(manifest: Manifest, ctx: StepContext, name_product: str, name_version: str) -> str:
    """Name, product, channel and versions; returns the installed version the update starts from."""
    config = ctx.config
    product = config.platform.product
    if manifest.product != name_product:
        raise ArchiveRejected(
            f"the archive name {ctx.archive_name} says product {name_product}, "
            f"the signed manifest says {manifest.product} (renamed archive?)"
        )
    if manifest.product != product:
        raise ArchiveRejected(
            f"the archive is for product {manifest.product}, this platform is {product} (platform.product)"
        )
    if Version.parse(name_version) != Version.parse(manifest.version) or name_version != manifest.version:
        raise ArchiveRejected(
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
    """A fresh staging folder that is removed unless the body moved it away."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with suppress(OSError):
            path.parent.rmdir()  # only when no other run's staging is there


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
    config = ctx.config
    limits = config.limits
    root = config.platform.root
    try:
        size = ctx.archive.stat().st_size
    except OSError as error:
        raise StepFailed(f"cannot read the spooled archive {ctx.archive}: {error.strerror}") from error
    if size > limits.max_archive_bytes:
        raise ArchiveRejected(
            f"the archive is {size} bytes, above limits.max_archive_bytes ({limits.max_archive_bytes})"
        )
    name_product, name_version = parse_archive_name(ctx.archive_name)
    if name_product != config.platform.product:
        raise ArchiveRejected(
            f"the archive name {ctx.archive_name} is for product {name_product}, "
            f"this platform is {config.platform.product} (platform.product)"
        )
    try:
        keys = load_trusted_keys(config.trust.keys)
    except ConfigError as error:
        raise ArchiveRejected(f"cannot authenticate: {'; '.join(error.problems)}") from None
    manifest = authenticate(ctx.archive, keys)
    ctx.event(f"signature ok (key {manifest.key_id}): {manifest.product} {manifest.version} ({manifest.channel})")
    installed = check_policy(manifest, ctx, name_product, name_version)
    target = release_dir(root, manifest.version)
    with staging(staging_dir(root, ctx.run_id)) as folder:
        stage_payload(ctx.archive, manifest, folder, limits, checkpoint=ctx.checkpoint, progress=ctx.progress)
        ctx.checkpoint()
        os.sync()  # the staged files are on disk before the release appears under releases/
        releases_dir(root).mkdir(parents=True, exist_ok=True)
        _make_room(target, root)
        folder.rename(target)
    ctx.event(
        f"staged {len(manifest.files)} files, {_megabytes(manifest.unpacked_bytes)} into releases/{manifest.version}"
    )
    downtime, reason = plan_downtime(installed, manifest.version, manifest.downtime)
    ctx.save_facts(
        manifest=manifest.summary(),
        from_version=installed,
        to_version=manifest.version,
        release_dir=str(target),
        downtime=downtime,
        downtime_reason=reason,
    )
    ctx.update_run(from_version=installed, to_version=manifest.version)
