"""Capabilities read from `zfs` usage text (hoster_tasks/zfs/probe.py).

Fixtures: `zfs_fuse_usage.txt` is the real output of `zfs 2>&1` from zfs-fuse 0.7 (Debian 12);
`openzfs2_usage.txt` is OpenZFS 2.2's `zfs` usage, written from its `get_usage()` strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from hoster_tasks.zfs.probe import OPENZFS2, Capabilities, capabilities_from_usage, probe
from hoster_tasks.zfs.shell import DEFAULT_TIMEOUT, Result

FIXTURES = Path(__file__).parent / "fixtures"
ZFS_FUSE = (FIXTURES / "zfs_fuse_usage.txt").read_text()
OPENZFS_22 = (FIXTURES / "openzfs2_usage.txt").read_text()


def test_fixtures_are_usage_texts() -> None:
    for text in (ZFS_FUSE, OPENZFS_22):
        assert "usage: zfs command args ..." in text
        assert "\tsend [" in text
        assert "\treceive [" in text


def test_zfs_fuse_capabilities() -> None:
    caps = capabilities_from_usage(ZFS_FUSE)
    assert caps.multi_snapshot is False
    assert caps.holds is True
    assert caps.bookmarks is False
    assert caps.resumable is False
    assert caps.raw_send is False
    assert caps.send_estimate is False
    assert caps.list_parsable is False
    assert caps.clones_property is False  # zfs-fuse: "bad property list: invalid property 'clones'"
    assert caps.receive_unmounted is True
    assert caps.encryption is False  # no load-key: no dataset can be encrypted
    assert caps.destroy_list is False  # `destroy [-rRd] <snapshot>`: one snapshot per call
    assert caps.receive_props is False  # `receive [-vnF]`: no -o, the copy is marked after its receive


def test_openzfs2_capabilities_all_true() -> None:
    caps = capabilities_from_usage(OPENZFS_22)
    assert caps == Capabilities(
        multi_snapshot=True,
        holds=True,
        bookmarks=True,
        resumable=True,
        raw_send=True,
        send_estimate=True,
        list_parsable=True,
        clones_property=True,
        receive_unmounted=True,
        encryption=True,
        destroy_list=True,
        receive_props=True,
    )
    assert caps == OPENZFS2


def test_empty_usage_has_nothing() -> None:
    caps = capabilities_from_usage("")
    assert (caps.multi_snapshot, caps.holds, caps.bookmarks, caps.resumable, caps.raw_send) == (
        False, False, False, False, False,
    )
    assert (caps.send_estimate, caps.list_parsable, caps.clones_property) == (False, False, False)


def _without_line(text: str, startswith: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith(startswith))


@pytest.mark.parametrize(
    "drop, field",
    [
        ("receive -A", "resumable"),
        ("send [-nVvPe] -t", "resumable"),
        ("bookmark ", "bookmarks"),
        ("hold ", "holds"),
        ("snapshot ", "multi_snapshot"),
        ("load-key ", "encryption"),
        ("destroy [-dnpRrv]", "destroy_list"),
        ("receive [-vMnsFhu] [-o", "receive_props"),
    ],
)
def test_each_feature_depends_on_its_own_usage_line(drop: str, field: str) -> None:
    assert getattr(capabilities_from_usage(OPENZFS_22), field) is True
    assert getattr(capabilities_from_usage(_without_line(OPENZFS_22, drop)), field) is False


def test_receive_without_s_is_not_resumable() -> None:
    text = OPENZFS_22.replace("receive [-vMnsFhu]", "receive [-vMnFhu]")
    caps = capabilities_from_usage(text)
    assert caps.resumable is False
    assert caps.raw_send is True


def test_send_flags_from_other_commands_do_not_leak() -> None:
    # `-w` and `-n`/`-P` appear only on other commands here: send has none of them.
    text = "\tsend [-Rp] <snapshot>\n\tfoo [-wnP] <x>\n\treceive [-sA] <x>\n"
    caps = capabilities_from_usage(text)
    assert caps.raw_send is False
    assert caps.send_estimate is False


def test_openzfs_20_style_send_line() -> None:
    """OpenZFS 2.0/2.1 spell the first send line differently; the same features are found."""
    text = OPENZFS_22.replace(
        "\tsend [-DLPbcehnpsVvw] [-i|-I snapshot]\n\t     [-R [-X dataset[,dataset]...]]     <snapshot>",
        "\tsend [-DnPpRVvLecwhb] [-[i|I] snapshot] <snapshot>",
    )
    assert text != OPENZFS_22
    assert capabilities_from_usage(text) == OPENZFS2


class _FakeShell:
    """Returns canned output for `zfs` with no arguments; records what it was asked to run."""

    host = "local"

    def __init__(self, stdout: str, stderr: str, exit_code: int = 2) -> None:
        self.out, self.err, self.code = stdout, stderr, exit_code
        self.calls: list[tuple[list[str], bool]] = []

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Result:
        self.calls.append((list(argv), check))
        return Result(tuple(argv), self.code, self.out, self.err)

    def process_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def close(self) -> None:
        pass


def test_probe_reads_usage_from_stderr_without_failing_on_exit_2() -> None:
    shell = _FakeShell("", OPENZFS_22, exit_code=2)
    assert probe(shell, zfs="/sbin/zfs") == OPENZFS2
    assert shell.calls == [(["/sbin/zfs"], False)]


def test_probe_zfs_fuse() -> None:
    shell = _FakeShell("", ZFS_FUSE, exit_code=2)
    caps = probe(shell)
    assert caps == capabilities_from_usage(ZFS_FUSE)
    assert shell.calls == [(["zfs"], False)]
