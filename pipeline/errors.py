"""Every error dropgate raises on purpose; the message is the operator's one-line explanation."""

from __future__ import annotations

from pathlib import Path


class DropgateError(Exception):
    """Root of dropgate's own errors."""


class ConfigError(DropgateError):
    """The configuration is invalid; the message lists every problem with its key path."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(problems))


class JournalError(DropgateError):
    """The journal cannot be opened or read."""


class JournalDamaged(JournalError):
    """The journal file is not an intact SQLite database; it is left exactly as found."""


class JournalMissing(JournalError):
    """There is no journal (or an empty one) where one is expected; the message names the evidence."""


class KeyFileError(DropgateError):
    """A key file cannot be read or is not a dropgate key of the expected kind."""


class SnapshotError(DropgateError):
    """A snapshot could not be taken, verified or restored (the message says what and where)."""


class NoSpace(SnapshotError):
    """The backups filesystem lacks space; `path` is where it ran out, `missing` how many bytes."""

    def __init__(self, message: str, *, path: Path, missing: int) -> None:
        super().__init__(message)
        self.path = path
        self.missing = missing


class DaemonUnreachable(DropgateError):
    """The command needs the running daemon and none answers on the control socket."""


class NotAllowed(DropgateError):
    """The caller may not do this: not root, not in the admin group (exit code 4)."""


class AlreadyRunning(DropgateError):
    """Another daemon holds the lock on this state folder."""


class ControlRefused(DropgateError):
    """The daemon refused an operator command (the message says why)."""


class StepFailed(DropgateError):
    """A step could not do its work; the run goes to its failure path."""


class ArchiveRejected(StepFailed):
    """The archive is not acceptable (authentication, format, limits, versions, policy)."""


class ArchiveMisnamed(ArchiveRejected):
    """The archive's file name is not `<product>.<version>.tgz` of what it carries.

    Only the name was judged, not the bytes: like a site fault, the same bytes
    under their own name are not a refused repeat (`Journal.last_with_sha`).
    """


class SiteFault(StepFailed):
    """The site, not the archive, made a step fail (no space, permission, a key file, a folder).

    The run is `rejected` like any failure before `backup`, but it did not judge
    the archive: the same bytes may be dropped again (`Journal.last_with_sha`).
    """


class PrereqFailed(StepFailed):
    """A critical prerequisite of the machine or the platform is not met."""


class StepTimeout(StepFailed):
    """A step ran past its time limit."""


class StepAborted(StepFailed):
    """A step was stopped from outside (shutdown or abort) before it finished."""

    def __init__(self, message: str, *, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


class CommandFailed(StepFailed):
    """A configured command or hook exited non-zero."""


class RollbackFailed(StepFailed):
    """Putting the platform back as it was did not fully succeed."""


class UploadRefused(DropgateError):
    """The console refused an upload (the message says why; `status` is the HTTP answer's code)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class RejectedByOperator(ArchiveRejected):
    """An operator refused a run waiting in approval or window (`dropgate reject`)."""


class ApprovalExpired(ArchiveRejected):
    """No approval came within `policy.approval_expires`."""


class FeedRejected(DropgateError):
    """The vendor's feed is not acceptable (signature, format, expiry, sequence, product)."""


class FetchFailed(DropgateError):
    """The feed or an archive could not be downloaded, or the bytes are not what the feed signed."""


class FetchStopped(FetchFailed):
    """A download was stopped from outside (the daemon stops, auto-update switched off); its .part is kept."""
