"""zfs and ssh error text to named exceptions (hoster_tasks/errors.py)."""

from __future__ import annotations

import json

import pytest

from hoster_tasks.errors import (
    CommandFailed,
    ConnectionLost,
    DatasetBusy,
    DatasetNotFound,
    HosterTasksError,
    NoSpace,
    Permanent,
    PipelinePermanent,
    SnapshotExists,
    SnapshotHeld,
    TargetModified,
    Transient,
    ZfsError,
    is_transient_text,
    zfs_error,
)

ARGV = ["zfs", "receive", "-u", "backup/vm-encrypted/web1"]

# Real stderr texts of zfs (OpenZFS 2.x and zfs-fuse) for each named error.
ZFS_TEXTS: list[tuple[str, type[ZfsError]]] = [
    ("cannot open 'zroot/vm-encrypted/nope': dataset does not exist", DatasetNotFound),
    ("cannot open 'nopool/x': no such pool", DatasetNotFound),
    ("could not find any snapshots to destroy; check snapshot names.", DatasetNotFound),
    ("cannot receive incremental stream: destination 'backup/web1' does not exist", DatasetNotFound),
    ("cannot create snapshot 'zroot/vm@hourly_2024-01-01_00-33-00': dataset already exists", SnapshotExists),
    ("cannot receive new filesystem stream: out of space", NoSpace),
    ("cannot receive: out of space", NoSpace),
    ("cannot create snapshot 'tank/x@s': out of space", NoSpace),
    ("cannot set property for 'tank/x': size is less than current used or reserved space\nquota exceeded", NoSpace),
    ("cannot destroy snapshot zroot/vm@s: dataset is busy", DatasetBusy),
    ("cannot destroy 'zroot/vm@s': snapshot has dependent clones\nuse '-R' to destroy the following datasets:\n"
     "zroot/vm-clone", DatasetBusy),
    ("cannot unmount '/zroot/vm': pool or dataset is busy", DatasetBusy),
    ("cannot receive incremental stream: destination tank/x has been modified since most recent snapshot",
     TargetModified),
    ("cannot receive incremental stream: destination backup/web1 has been modified\nsince most recent snapshot",
     TargetModified),
    ("cannot receive new filesystem stream: destination 'backup/web1' exists\nmust specify -F to overwrite it",
     TargetModified),
    ("cannot receive new filesystem stream: destination has snapshots (eg. backup/web1@a)\n"
     "must destroy them to overwrite it", TargetModified),
]


@pytest.mark.parametrize("stderr, cls", ZFS_TEXTS)
def test_zfs_error_names_the_error(stderr: str, cls: type[ZfsError]) -> None:
    exc = zfs_error(ARGV, 1, stderr)
    assert type(exc) is cls
    assert isinstance(exc, Permanent)
    assert not isinstance(exc, Transient)
    assert exc.argv == ARGV
    assert exc.exit_code == 1
    assert exc.stderr == stderr.strip()
    assert exc.host == "local"


@pytest.mark.parametrize("stderr, cls", ZFS_TEXTS)
def test_zfs_error_same_text_from_remote_host_is_same_error(stderr: str, cls: type[ZfsError]) -> None:
    exc = zfs_error(ARGV, 1, stderr, host="hoster01")
    assert type(exc) is cls
    assert exc.host == "hoster01"


def test_duplicate_hold_tag_is_snapshot_held() -> None:
    exc = zfs_error(["zfs", "hold", "hoster-base", "zroot/vm@s"], 1,
                    "cannot hold snapshot 'zroot/vm@s': tag already exists on this dataset")
    assert type(exc) is SnapshotHeld


def test_unrecognised_text_is_generic_zfs_error() -> None:
    exc = zfs_error(ARGV, 1, "cannot receive: invalid backup stream")
    assert type(exc) is ZfsError
    assert isinstance(exc, Permanent)


def test_target_modified_is_not_mistaken_for_not_found() -> None:
    text = "cannot receive incremental stream: most recent snapshot of backup/web1 does not\nmatch incremental source"
    assert not isinstance(zfs_error(ARGV, 1, text), DatasetNotFound)


@pytest.mark.parametrize(
    "stderr",
    [
        "",
        "ssh: connect to host 10.5.199.85 port 22: Connection refused",
        "Connection to 10.5.199.85 closed by remote host.",
        "client_loop: send disconnect: Broken pipe",
        "kex_exchange_identification: read: Connection reset by peer",
        # even a zfs-looking text: exit 255 from ssh means the connection, not zfs
        "cannot open 'backup/web1': dataset does not exist",
    ],
)
def test_ssh_exit_255_from_remote_host_is_connection_lost(stderr: str) -> None:
    exc = zfs_error(["ssh", "--", "10.5.199.85", "zfs receive -u backup/web1"], 255, stderr, host="hoster01")
    assert type(exc) is ConnectionLost
    assert isinstance(exc, Transient)
    assert not isinstance(exc, Permanent)
    assert exc.exit_code == 255
    assert exc.host == "hoster01"


@pytest.mark.parametrize(
    "stderr",
    [
        "ssh: connect to host 10.5.199.85 port 22: Connection timed out",
        "ssh: connect to host 10.5.199.85 port 22: No route to host",
        "Timeout, server 10.5.199.85 not responding.",
        "ssh: Could not resolve hostname hoster01: Name or service not known",
    ],
)
def test_transient_ssh_text_from_remote_host_is_connection_lost(stderr: str) -> None:
    assert type(zfs_error(ARGV, 1, stderr, host="hoster01")) is ConnectionLost
    assert is_transient_text(stderr)


def test_exit_255_locally_is_not_a_connection() -> None:
    exc = zfs_error(ARGV, 255, "internal error: unable to open /dev/zfs")
    assert not isinstance(exc, ConnectionLost)
    assert isinstance(exc, Permanent)


@pytest.mark.parametrize("stderr", ["cannot receive: invalid backup stream", "dataset does not exist", ""])
def test_is_transient_text_false_for_zfs_texts(stderr: str) -> None:
    assert not is_transient_text(stderr)


# -- CommandFailed carries everything and survives Celery's rebuild from args ---------------------------

ALL_COMMAND_ERRORS = [
    CommandFailed, ZfsError, DatasetNotFound, SnapshotExists, DatasetBusy, NoSpace, SnapshotHeld,
    TargetModified, ConnectionLost, PipelinePermanent,
]


@pytest.mark.parametrize("cls", ALL_COMMAND_ERRORS)
def test_round_trip_through_args(cls: type[CommandFailed]) -> None:
    exc = cls(ARGV, 3, "  cannot receive: out of space\n", "hoster01")
    rebuilt = type(exc)(*exc.args)
    assert type(rebuilt) is cls
    assert (rebuilt.argv, rebuilt.exit_code, rebuilt.stderr, rebuilt.host) == (
        ARGV, 3, "cannot receive: out of space", "hoster01",
    )
    assert str(rebuilt) == str(exc)
    assert rebuilt.args == exc.args


@pytest.mark.parametrize("cls", ALL_COMMAND_ERRORS)
def test_round_trip_through_json_args(cls: type[CommandFailed]) -> None:
    """Celery's JSON result backend stores exc.args as a JSON list and calls cls(*args)."""
    exc = zfs_error(ARGV, 1, "cannot receive: out of space") if cls is NoSpace else cls(ARGV, 1, "x", "n1")
    rebuilt = type(exc)(*json.loads(json.dumps(exc.args)))
    assert (rebuilt.argv, rebuilt.exit_code, rebuilt.stderr, rebuilt.host) == (
        exc.argv, exc.exit_code, exc.stderr, exc.host,
    )


def test_command_failed_fields_and_message() -> None:
    exc = CommandFailed(("zfs", "destroy", "tank/x@s"), 1, "\ncannot destroy: dataset is busy\n", "hoster01")
    assert exc.argv == ["zfs", "destroy", "tank/x@s"]
    assert exc.exit_code == 1
    assert exc.stderr == "cannot destroy: dataset is busy"
    assert exc.host == "hoster01"
    assert str(exc) == "[hoster01] zfs destroy tank/x@s exited 1: cannot destroy: dataset is busy"
    assert isinstance(exc, HosterTasksError)


def test_command_failed_without_stderr() -> None:
    assert str(CommandFailed(["zfs"], 2, "")) == "[local] zfs exited 2: (no stderr)"


def test_hierarchy_transient_or_permanent() -> None:
    assert issubclass(ConnectionLost, Transient) and not issubclass(ConnectionLost, Permanent)
    assert issubclass(PipelinePermanent, Permanent)
    for cls in (ZfsError, DatasetNotFound, SnapshotExists, DatasetBusy, NoSpace, SnapshotHeld, TargetModified):
        assert issubclass(cls, Permanent) and not issubclass(cls, Transient)
