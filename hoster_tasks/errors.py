"""Named errors. ZFS and SSH error text becomes these exceptions here and nowhere else.

`Transient` errors are retried with backoff; `Permanent` ones fail at once and are reported.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class HosterTasksError(Exception):
    """Base of every error this package raises on purpose."""


class Permanent(HosterTasksError):
    """Retrying will not help: fail now and report."""


class Transient(HosterTasksError):
    """Connection lost, timeout, lock briefly busy: retry with backoff."""


class ConfigError(Permanent):
    pass


class InvalidName(Permanent, ValueError):
    pass


class UnknownVM(Permanent):
    pass


class NoLiveNode(Permanent):
    pass


class Busy(Transient):
    """Another job holds the dataset's lock. `datasets`: the busy ones; `taken`: what was done anyway."""

    def __init__(self, message: str, datasets: list[str] | None = None, taken: list[str] | None = None) -> None:
        super().__init__(message, datasets or [], taken or [])
        self.datasets = datasets or []
        self.taken = taken or []

    def __str__(self) -> str:
        return str(self.args[0])


class LockLost(Transient):
    """The lock's lease could not be renewed: the work was stopped."""


class CommandFailed(HosterTasksError):
    """A command exited non-zero. Carries its argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], exit_code: int, stderr: str, host: str = "local") -> None:
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stderr = stderr.strip()
        self.host = host
        # args hold every field so the exception survives Celery's JSON round trip intact
        super().__init__(self.argv, exit_code, self.stderr, host)

    def __str__(self) -> str:
        return f"[{self.host}] {' '.join(self.argv)} exited {self.exit_code}: {self.stderr or '(no stderr)'}"


class ZfsError(CommandFailed, Permanent):
    """A zfs command failed for a reason we do not recognise."""


class DatasetNotFound(ZfsError):
    pass


class SnapshotExists(ZfsError):
    pass


class DatasetBusy(ZfsError):
    pass


class NoSpace(ZfsError):
    pass


class SnapshotHeld(ZfsError):
    pass


class TargetModified(ZfsError):
    """The target changed since the incremental base: refusing, never rolling back."""


class Diverged(Permanent):
    """Source and target histories do not match; nothing was destroyed."""


class ConnectionLost(CommandFailed, Transient):
    """SSH could not connect or the connection dropped."""


class PipelineFailed(CommandFailed):
    """A stage of send | pv | ssh receive failed; argv/stderr are the first failing stage's."""


class PipelinePermanent(PipelineFailed, Permanent):
    pass


class TransferStalled(Transient):
    """No byte moved for the endpoint's `stall_seconds` (a stalled link or receiver, not a slow one): the
    stages were stopped. Retried; where ZFS can, the retry resumes from the receive's token."""


# Order matters: the first pattern that matches names the error.
_ZFS_PATTERNS: list[tuple[re.Pattern[str], type[ZfsError]]] = [
    (re.compile(r"dataset does not exist|could not find any snapshots|no such pool|does not exist"),
     DatasetNotFound),
    (re.compile(r"snapshot is held|is held|tag already exists on this dataset"), SnapshotHeld),
    (re.compile(r"dataset already exists|snapshot already exists|already exists"), SnapshotExists),
    (re.compile(r"out of space|no space left|quota exceeded"), NoSpace),
    (re.compile(r"dataset is busy|pool or dataset is busy|device busy|has dependent clones"), DatasetBusy),
    (re.compile(r"has been modified\s+since most recent snapshot|destination .* has been modified|"
                r"destination has snapshots|must specify -F to overwrite|destination .* exists"),
     TargetModified),
]

_SSH_TRANSIENT = re.compile(
    r"Connection (refused|reset|timed out|closed)|No route to host|Network is unreachable|"
    r"Broken pipe|broken pipe|Connection to .* closed|ssh_exchange_identification|kex_exchange_identification|"
    r"Operation timed out|timed out|Could not resolve hostname|Host is down|Write failed|"
    r"server not responding|Timeout, server",
)


def is_transient_text(stderr: str) -> bool:
    return bool(_SSH_TRANSIENT.search(stderr))


def zfs_error(argv: Sequence[str], exit_code: int, stderr: str, host: str = "local") -> CommandFailed:
    """Turn a failed zfs command into its named exception."""
    if exit_code == 255 and host != "local" or (host != "local" and is_transient_text(stderr)):
        return ConnectionLost(argv, exit_code, stderr, host)
    for pattern, cls in _ZFS_PATTERNS:
        if pattern.search(stderr):
            return cls(argv, exit_code, stderr, host)
    return ZfsError(argv, exit_code, stderr, host)


class DuplicateDelivery(HosterTasksError):
    """A second delivery of a chain link whose lock another delivery holds: it must run nothing."""


class InvalidRequest(InvalidName, ConfigError):
    """A task's arguments failed its request model (hoster_tasks.requests): nothing ran.

    Both an InvalidName and a ConfigError, the two errors callers caught for bad arguments before there were
    request models. `fields` names the arguments at fault. Both travel in `args`, so the error survives
    Celery's JSON result round trip (the client rebuilds it as `InvalidRequest(message, fields)`).
    """

    def __init__(self, message: str, fields: Sequence[str] = ()) -> None:
        self.fields = list(fields)
        super().__init__(message, self.fields)

    def __str__(self) -> str:
        return str(self.args[0])


class ProbeFailed(CommandFailed, Permanent):
    """`zfs` on a host did not answer with its usage text (not installed, wrong `zfs_command`, a shell
    that printed something else): what the host supports is unknown, so nothing is assumed."""

    def __str__(self) -> str:
        return f"cannot probe ZFS on {self.host}: {super().__str__()}"


class EncryptedSendRefused(Permanent):
    """An encrypted dataset would leave its host decrypted (no raw send on both sides) and the endpoint
    does not allow it (`send_decrypted`)."""


class JobLost(HosterTasksError):
    """The worker running a job died or froze; the job was re-queued (the message names the new id)."""


class ReadOnlyCopy(Permanent):
    """The dataset is a backup copy of another node's VM: no task changes it on this node."""


class ReceiveInProgress(Busy):
    """A `zfs receive` into the target dataset is running on the target (a transfer that outlived its worker's
    lease, or another tool's): retried later, never taken for a diverged copy."""


class VmControlError(Permanent):
    """A VM could not be stopped or started (or not confirmed stopped in time)."""


class RollbackRefused(Permanent):
    """A rollback that would do more than the user agreed to (a running VM, a replication base, a changed
    list of snapshots to destroy): nothing was changed."""
