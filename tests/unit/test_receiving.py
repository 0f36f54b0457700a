"""Recognising a `zfs receive` in progress from the target's `ps -A -o args=` (replication/receiving.py)."""

from __future__ import annotations

from hoster_tasks.replication.receiving import receive_in_progress
from hoster_tasks.zfs.commands import process_args

TARGET = "tank/vm/web-01"
PS = """\
/sbin/init
sshd: root@notty
{line}
-bash
ps -ww -A -o args=
"""


def busy(line: str) -> bool:
    return receive_in_progress(PS.format(line=line), TARGET)


def test_the_argv_reads_every_command_line_uncut() -> None:
    assert process_args() == ["ps", "-ww", "-A", "-o", "args="]


def test_our_own_receive_and_other_spellings_are_busy() -> None:
    assert busy(f"zfs receive -u {TARGET}")
    assert busy(f"zfs receive -u -s {TARGET}")
    assert busy(f"/sbin/zfs recv -s -u {TARGET}")  # FreeBSD's path, the short verb
    assert busy(f"sudo zfs receive -F {TARGET}")
    assert busy(f"sh -c mbuffer -q -s 128k -m 16M | zfs receive -s -F '{TARGET}'")  # syncoid through a shell


def test_a_receive_into_an_ancestor_with_d_or_e_is_busy() -> None:
    assert busy("zfs receive -u -d tank")
    assert busy("zfs recv -ue tank/vm")
    assert not busy("zfs receive -u tank/vm")  # without -d/-e that one writes tank/vm itself


def test_other_datasets_and_other_commands_are_not_busy() -> None:
    assert not busy("zfs receive -u tank/vm/web-010")  # a longer name sharing the prefix
    assert not busy("zfs receive -u tank/vm/web-01/disk0")
    assert not busy(f"zfs send -I {TARGET}@a {TARGET}@b")
    assert not busy(f"zfs list -H {TARGET}")
    assert not busy("[zfs] <defunct>")
    assert not busy("zfs receive")
    assert not busy("")


def test_nothing_running_is_not_busy() -> None:
    assert not receive_in_progress("", TARGET)
