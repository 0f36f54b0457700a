"""Exact argv lists of every zfs command (hoster_tasks/zfs/commands.py) and the SSH boundary (zfs/shell.py)."""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from hoster_tasks.errors import InvalidName
from hoster_tasks.settings import Endpoint
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs.commands import ARGV_BUDGET, SendOptions
from hoster_tasks.zfs.shell import LocalShell, remote_command_line, ssh_argv, ssh_options

DS = "zroot/vm-encrypted/web1"
SNAP = f"{DS}@hourly_2024-01-01_02-33-00"
BASE = f"{DS}@hourly_2024-01-01_01-33-00"

HOSTILE_DATASETS = [
    "zroot/a;rm -rf /",
    "zroot/$(x)",
    "zroot/`id`",
    "zroot/../etc",
    "zroot/..",
    "zroot/a b",
    "-zroot",
    "zroot/-F",
    "",
    "zroot/" + "x" * 300,
    "zroot/vm@snap",
    "zroot/vm#bm",
    "zroot/a\nb",
]
HOSTILE_SNAPSHOTS = [
    "zroot/vm",
    "zroot/vm@",
    "zroot/vm@a;b",
    "zroot/vm@$(x)",
    "zroot/vm@`x`",
    "zroot/vm@-F",
    "zroot/vm@a b",
    "zroot/vm@..",
    "zroot/a;b@s",
    "-zroot/vm@s",
    "zroot/vm@a@b",
    "zroot/vm@a\nb",
]
HOSTILE_SHORT = ["", "a;b", "$(x)", "`x`", "-r", "..", "a b", "a/b", "a@b", "a\nb", "x" * 201]


# -- snapshot ------------------------------------------------------------------------------------------


def test_snapshot_many_datasets_one_call() -> None:
    calls = cmd.snapshot(["zroot/vm-encrypted/a", "zroot/vm-encrypted/b", "tank/c"], "hourly_2024-01-01_00-33-00")
    assert calls == [
        [
            "zfs",
            "snapshot",
            "zroot/vm-encrypted/a@hourly_2024-01-01_00-33-00",
            "zroot/vm-encrypted/b@hourly_2024-01-01_00-33-00",
            "tank/c@hourly_2024-01-01_00-33-00",
        ]
    ]


def test_snapshot_single_and_custom_zfs_path() -> None:
    assert cmd.snapshot([DS], "custom_x", zfs="/sbin/zfs") == [["/sbin/zfs", "snapshot", f"{DS}@custom_x"]]


def test_snapshot_no_datasets_no_calls() -> None:
    assert cmd.snapshot([], "custom_x") == []


def _argv_bytes(argv: list[str]) -> int:
    """What execve counts for argv: every string plus its NUL."""
    return sum(len(a.encode()) + 1 for a in argv)


def test_snapshot_split_when_argv_exceeds_budget() -> None:
    short = "hourly_2024-01-01_00-33-00"
    datasets = [f"zroot/vm-encrypted/{i:05d}-" + "v" * 190 for i in range(2000)]
    total = sum(len(f"{d}@{short}") + 1 for d in datasets)
    assert total > 3 * ARGV_BUDGET  # the input really needs several calls

    calls = cmd.snapshot(datasets, short)

    assert len(calls) >= 4
    seen = Counter(arg for call in calls for arg in call[2:])
    assert seen == Counter(f"{d}@{short}" for d in datasets)  # each exactly once
    assert [arg for call in calls for arg in call[2:]] == [f"{d}@{short}" for d in datasets]  # order kept
    for call in calls:
        assert call[:2] == ["zfs", "snapshot"]
        assert len(call) > 2
        assert _argv_bytes(call[2:]) <= ARGV_BUDGET
    # calls are filled: nothing would have fitted into the previous call
    for prev, nxt in zip(calls, calls[1:], strict=False):
        assert _argv_bytes(prev[2:]) + len(nxt[2]) + 1 > ARGV_BUDGET


@pytest.mark.parametrize("bad", HOSTILE_DATASETS)
def test_snapshot_refuses_hostile_dataset(bad: str) -> None:
    with pytest.raises(InvalidName):
        cmd.snapshot([DS, bad], "custom_x")


@pytest.mark.parametrize("bad", HOSTILE_SHORT)
def test_snapshot_refuses_hostile_name(bad: str) -> None:
    with pytest.raises(InvalidName):
        cmd.snapshot([DS], bad)


# -- destroy, get, list --------------------------------------------------------------------------------


def test_snapshot_recursive() -> None:
    assert cmd.snapshot_recursive("zroot/vm-encrypted", "hourly_2024-01-01_00-33-00") == [
        "zfs", "snapshot", "-r", "zroot/vm-encrypted@hourly_2024-01-01_00-33-00"]  # fmt: skip


@pytest.mark.parametrize(("root", "short"), [("-r", "x"), ("zroot/vm@a", "x"), ("zroot/vm", "a b"), ("zroot/vm", "-x")])
def test_snapshot_recursive_refuses(root: str, short: str) -> None:
    with pytest.raises(InvalidName):
        cmd.snapshot_recursive(root, short)


def test_get_snapshot_props() -> None:
    assert cmd.get_snapshot_props(["tank/a@s", "tank/b@s"], ["createtxg"]) == [
        "zfs", "get", "-Hp", "-o", "name,property,value", "createtxg", "tank/a@s", "tank/b@s"]  # fmt: skip
    with pytest.raises(InvalidName):
        cmd.get_snapshot_props(["tank/a"], ["createtxg"])  # a dataset, not a snapshot


def test_destroy_snapshot() -> None:
    assert cmd.destroy_snapshot(SNAP) == ["zfs", "destroy", SNAP]


@pytest.mark.parametrize("bad", [*HOSTILE_SNAPSHOTS, "zroot/vm@a,b", "zroot/vm@a%b"])
def test_destroy_refuses(bad: str) -> None:
    with pytest.raises(InvalidName):
        cmd.destroy_snapshot(bad)


def test_destroy_refuses_a_whole_dataset() -> None:
    with pytest.raises(InvalidName):
        cmd.destroy_snapshot(DS)


def test_get_props_recursive() -> None:
    assert cmd.get_props([DS, "tank/b"], ["guid", "createtxg"]) == [
        "zfs", "get", "-Hp", "-r", "-o", "name,property,value", "guid,createtxg", DS, "tank/b",
    ]


def test_get_props_not_recursive() -> None:
    assert cmd.get_props([DS], cmd.SNAPSHOT_PROPS, recursive=False, zfs="/usr/sbin/zfs") == [
        "/usr/sbin/zfs", "get", "-Hp", "-o", "name,property,value",
        "guid,createtxg,creation,used,referenced,userrefs", DS,
    ]


@pytest.mark.parametrize("bad", HOSTILE_DATASETS)
def test_get_props_refuses(bad: str) -> None:
    with pytest.raises(InvalidName):
        cmd.get_props([DS, bad], ["guid"])


@pytest.mark.parametrize("props", [["-r"], ["-o"], [""], []])
def test_get_props_refuses_bad_property_lists(props: list[str]) -> None:
    with pytest.raises((InvalidName, ValueError)):
        cmd.get_props([DS], props)


def test_list_children() -> None:
    assert cmd.list_children(["zroot/vm-encrypted", "zroot/vm-unencrypted"]) == [
        "zfs", "list", "-H", "-o", "name", "-r", "zroot/vm-encrypted", "zroot/vm-unencrypted",
    ]


@pytest.mark.parametrize("bad", HOSTILE_DATASETS)
def test_list_children_refuses(bad: str) -> None:
    with pytest.raises(InvalidName):
        cmd.list_children([bad])


# -- send / receive ------------------------------------------------------------------------------------


def test_send_full() -> None:
    assert cmd.send(SNAP) == ["zfs", "send", SNAP]


def test_send_incremental_I() -> None:
    assert cmd.send(SNAP, BASE) == ["zfs", "send", "-I", BASE, SNAP]


def test_send_raw_incremental() -> None:
    assert cmd.send(SNAP, BASE, SendOptions(raw=True)) == ["zfs", "send", "-w", "-I", BASE, SNAP]


def test_send_dry_run_estimate() -> None:
    assert cmd.send(SNAP, None, SendOptions(dry_run=True)) == ["zfs", "send", "-nP", SNAP]
    assert cmd.send(SNAP, BASE, SendOptions(raw=True, dry_run=True)) == [
        "zfs", "send", "-nP", "-w", "-I", BASE, SNAP,
    ]


def test_send_resume_token() -> None:
    token = "1-e604ea4bf-e0-789c63a2a8b5a8c4"
    assert cmd.send("", None, SendOptions(resume_token=token)) == ["zfs", "send", "-t", token]
    assert cmd.send(SNAP, None, SendOptions(resume_token=token, dry_run=True)) == ["zfs", "send", "-nP", "-t", token]


@pytest.mark.parametrize("token", ["", "1-abc;rm", "1-abc def", "$(x)", "1-abc\n", "1_abc", "a/b"])
def test_send_resume_token_refuses_odd_characters(token: str) -> None:
    with pytest.raises(ValueError):
        cmd.send("", None, SendOptions(resume_token=token))


def test_send_base_from_another_dataset_refused() -> None:
    with pytest.raises(ValueError, match="not a snapshot of"):
        cmd.send(SNAP, "zroot/vm-encrypted/web2@hourly_2024-01-01_01-33-00")


@pytest.mark.parametrize("bad", HOSTILE_SNAPSHOTS)
def test_send_refuses_hostile_snapshot(bad: str) -> None:
    with pytest.raises(InvalidName):
        cmd.send(bad)


@pytest.mark.parametrize("bad", HOSTILE_SNAPSHOTS)
def test_send_refuses_hostile_base(bad: str) -> None:
    with pytest.raises(InvalidName):
        cmd.send(SNAP, bad)


def test_receive_unmounted_never_force() -> None:
    assert cmd.receive("backup/web1") == ["zfs", "receive", "-u", "backup/web1"]
    assert cmd.receive("backup/web1", resumable=True) == ["zfs", "receive", "-u", "-s", "backup/web1"]
    for resumable in (False, True):
        assert "-F" not in cmd.receive("backup/web1", resumable=resumable)


def test_receive_sets_the_copy_marks_as_it_creates() -> None:
    marks = {"hoster-tasks:parent": "node1", "readonly": "on"}
    assert cmd.receive("backup/web1", True, props=marks) == [
        "zfs", "receive", "-u", "-s", "-o", "hoster-tasks:parent=node1", "-o", "readonly=on", "backup/web1",
    ]


@pytest.mark.parametrize("prop, value", [
    ("mountpoint", "/"),  # a native property other than readonly
    ("hoster-tasks:parent", "a\nb"),
    ("bad prop:x", "v"),
    ("-F", "x"),
])
def test_receive_refuses_other_properties(prop: str, value: str) -> None:
    with pytest.raises(ValueError):
        cmd.receive("backup/web1", props={prop: value})


def test_receive_abort() -> None:
    assert cmd.receive_abort("backup/web1") == ["zfs", "receive", "-A", "backup/web1"]


@pytest.mark.parametrize("bad", HOSTILE_DATASETS)
@pytest.mark.parametrize("builder", [cmd.receive, cmd.receive_abort])
def test_receive_refuses(builder: Callable[[str], list[str]], bad: str) -> None:
    with pytest.raises(InvalidName):
        builder(bad)


# -- hold / release / properties -----------------------------------------------------------------------


def test_hold_and_release() -> None:
    assert cmd.hold("hoster-base-hoster01", SNAP) == ["zfs", "hold", "hoster-base-hoster01", SNAP]
    assert cmd.release("hoster-base-hoster01", SNAP) == ["zfs", "release", "hoster-base-hoster01", SNAP]


@pytest.mark.parametrize("builder", [cmd.hold, cmd.release])
@pytest.mark.parametrize("tag", HOSTILE_SHORT)
def test_hold_release_refuse_hostile_tag(builder: Callable[[str, str], list[str]], tag: str) -> None:
    with pytest.raises(InvalidName):
        builder(tag, SNAP)


@pytest.mark.parametrize("builder", [cmd.hold, cmd.release])
@pytest.mark.parametrize("bad", HOSTILE_SNAPSHOTS)
def test_hold_release_refuse_hostile_snapshot(builder: Callable[[str, str], list[str]], bad: str) -> None:
    with pytest.raises(InvalidName):
        builder("tag", bad)


def test_set_user_property() -> None:
    assert cmd.set_user_property(DS, "hoster:parent_host", "hoster02") == [
        "zfs", "set", "hoster:parent_host=hoster02", DS,
    ]
    assert cmd.set_user_property(DS, "hoster:base.hoster-01", "1234") == [
        "zfs", "set", "hoster:base.hoster-01=1234", DS,
    ]


def test_set_user_property_value_with_shell_characters_stays_one_argument() -> None:
    argv = cmd.set_user_property(DS, "hoster:note", "a b; $(x) `y`")
    assert argv == ["zfs", "set", "hoster:note=a b; $(x) `y`", DS]


@pytest.mark.parametrize(
    "prop", ["readonly", "mountpoint", "quota", "", "hoster:a b", "hoster:a;b", "hoster:$(x)", "a=b:c", "hoster:a/b"]
)
def test_set_user_property_refuses_non_user_names(prop: str) -> None:
    with pytest.raises(ValueError):
        cmd.set_user_property(DS, prop, "x")


@pytest.mark.parametrize("prop", ["-o:x", "-:x", "--:x"])
def test_set_user_property_refuses_option_like_names(prop: str) -> None:
    with pytest.raises(ValueError):
        cmd.set_user_property(DS, prop, "1")


@pytest.mark.parametrize("value", ["a\nb", "\n", "a\0b"])
def test_set_user_property_refuses_newlines(value: str) -> None:
    with pytest.raises(ValueError):
        cmd.set_user_property(DS, "hoster:x", value)


@pytest.mark.parametrize("bad", HOSTILE_DATASETS)
def test_set_user_property_refuses_hostile_dataset(bad: str) -> None:
    with pytest.raises(InvalidName):
        cmd.set_user_property(bad, "hoster:x", "1")


# -- the SSH boundary (zfs/shell.py) -------------------------------------------------------------------

ROUND_TRIP = [
    ["zfs", "receive", "-u", "backup/web1"],
    ["echo", "a;rm -rf /"],
    ["echo", "$(id)", "`id`", "${HOME}"],
    ["echo", "it's", 'say "hi"', "back\\slash"],
    ["echo", "", " ", "\t"],
    ["echo", "a\nb", "*", "?", "~", "!", "#x", "&", "|", ">", "<"],
    ["zfs", "set", "hoster:note=a b; $(x) `y`", "zroot/vm"],
]


@pytest.mark.parametrize("argv", ROUND_TRIP)
def test_remote_command_line_round_trips(argv: list[str]) -> None:
    line = remote_command_line(argv)
    assert isinstance(line, str)
    assert shlex.split(line) == argv


def test_remote_command_line_plain_words_unquoted() -> None:
    assert remote_command_line(["zfs", "receive", "-u", "backup/web1"]) == "zfs receive -u backup/web1"


def test_remote_command_line_runs_hostile_strings_as_data(tmp_path: Path) -> None:
    """Through a real POSIX shell: the hostile text is printed, never run."""
    marker = tmp_path / "pwned"
    hostile = [f"a; touch {marker}", f"$(touch {marker})", f"`touch {marker}`", "it's"]
    result = LocalShell().run(["sh", "-c", remote_command_line(["printf", "%s\\n", *hostile])])
    assert result.stdout.splitlines() == hostile
    assert not marker.exists()


def _endpoint(**kw: object) -> Endpoint:
    return Endpoint(name="hoster01", host="10.5.199.85", **kw)  # type: ignore[arg-type]


def _option_values(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"]


def test_ssh_argv_minimal() -> None:
    argv = ssh_argv(_endpoint(), ["zfs", "receive", "-u", "backup/web1"])
    assert argv[0] == "ssh"
    opts = _option_values(argv)
    assert "StrictHostKeyChecking=yes" in opts
    assert "BatchMode=yes" in opts
    assert "ConnectTimeout=10" in opts
    assert "ServerAliveInterval=5" in opts
    assert not any(o.startswith("UserKnownHostsFile=") for o in opts)
    assert "-i" not in argv
    assert argv[-3:] == ["--", "10.5.199.85", "zfs receive -u backup/web1"]
    assert argv[argv.index("-p") + 1] == "22"
    assert argv[argv.index("-l") + 1] == "root"


def test_ssh_argv_with_key_and_known_hosts() -> None:
    ep = _endpoint(
        port=2222,
        user="backup",
        key_file=Path("/etc/hoster-tasks/ssh/id_ed25519"),
        known_hosts=Path("/etc/hoster-tasks/ssh/known_hosts"),
        connect_timeout=3,
        keepalive_seconds=2,
    )
    argv = ssh_argv(ep, ["zfs", "receive", "-u", "-s", "backup/web1"])
    opts = _option_values(argv)
    assert "UserKnownHostsFile=/etc/hoster-tasks/ssh/known_hosts" in opts
    assert "StrictHostKeyChecking=yes" in opts
    assert "BatchMode=yes" in opts
    assert "IdentitiesOnly=yes" in opts
    assert "ConnectTimeout=3" in opts
    assert "ServerAliveInterval=2" in opts
    assert argv[argv.index("-i") + 1] == "/etc/hoster-tasks/ssh/id_ed25519"
    assert argv[argv.index("-p") + 1] == "2222"
    assert argv[argv.index("-l") + 1] == "backup"
    assert argv[-3:] == ["--", "10.5.199.85", "zfs receive -u -s backup/web1"]
    # every option comes before `--`
    assert argv.index("--") == len(argv) - 3
    assert argv[1:-3] == ssh_options(ep)


def test_ssh_argv_one_command_string_at_the_end() -> None:
    remote = ["zfs", "set", "hoster:note=a b; $(x)", "zroot/vm"]
    argv = ssh_argv(_endpoint(), remote)
    assert argv.count("--") == 1
    assert argv[-2] == "10.5.199.85"
    assert shlex.split(argv[-1]) == remote


def test_ssh_argv_host_after_double_dash_even_if_option_like() -> None:
    ep = Endpoint(name="evil", host="-oProxyCommand=touch /tmp/x")
    argv = ssh_argv(ep, ["true"])
    assert argv[-3:] == ["--", "-oProxyCommand=touch /tmp/x", "true"]
    assert argv.index("-oProxyCommand=touch /tmp/x") > argv.index("--")


def test_send_from_a_bookmark_is_dash_i() -> None:
    assert cmd.send("p/vm/a@s2", "p/vm/a#m1") == ["zfs", "send", "-i", "p/vm/a#m1", "p/vm/a@s2"]
    assert cmd.send("p/vm/a@s2", "p/vm/a#m1", cmd.SendOptions(raw=True)) == [
        "zfs", "send", "-w", "-i", "p/vm/a#m1", "p/vm/a@s2"]
    with pytest.raises(ValueError):
        cmd.send("p/vm/a@s2", "p/vm/b#m1")
    with pytest.raises(InvalidName):
        cmd.send("p/vm/a@s2", "p/vm/a#m1#m2")


def test_bookmark_argv() -> None:
    assert cmd.bookmark("p/vm/a@s1", "p/vm/a#hoster-tasks:dst:s1") == [
        "zfs", "bookmark", "p/vm/a@s1", "p/vm/a#hoster-tasks:dst:s1"]
    assert cmd.destroy_bookmark("p/vm/a#m") == ["zfs", "destroy", "p/vm/a#m"]
    for bad in ("p/vm/a@m", "p/vm/a", "p/vm/a#-m", "p/vm/a#m;rm -rf /"):
        with pytest.raises(InvalidName):
            cmd.destroy_bookmark(bad)
