"""Encrypted datasets are never sent decrypted unless the endpoint says so, and a probe that fails says so.

The decisions of hoster_tasks/replication/replicator.py (`_raw`, `target_caps`) and hoster_tasks/zfs/probe.py,
by the exact argv lists they lead to, on scripted hosts (tests/unit/zfs_script.py): OpenZFS 2.2 or zfs-fuse
usage text for the probe, `zfs get` from a model. The pipeline is captured, not run.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
from zfs_script import OPENZFS_USAGE, ZFS_FUSE_USAGE, CapturedPipeline, Host

from hoster_tasks.errors import ConnectionLost, EncryptedSendRefused, Permanent, ProbeFailed, Transient
from hoster_tasks.replication import replicator as replicator_module
from hoster_tasks.replication.replicator import Replicator
from hoster_tasks.settings import Endpoint, Settings
from hoster_tasks.snapshots import NodeContext
from hoster_tasks.zfs.probe import OPENZFS2, Capabilities, probe
from hoster_tasks.zfs.shell import LocalShell

NODE, TARGET = "node1", "backup1"
ROOT, T_ROOT = "zroot/vm-encrypted", "tank/backup/vm-encrypted"
VM, T_VM = f"{ROOT}/vm1", f"{T_ROOT}/vm1"
H1, H2 = "hourly_2024-05-06_10-33-00", "hourly_2024-05-06_11-33-00"
GET = ["zfs", "get", "-Hp", "-r", "-o", "name,property,value"]
SNAP_PROPS = "guid,createtxg,creation,used,referenced,userrefs"
SRC_PROPS_OPENZFS = f"{SNAP_PROPS},clones,hoster-tasks:base.{TARGET},encryption"
TGT_PROPS_FUSE = f"{SNAP_PROPS},hoster-tasks:parent"
# OpenZFS 2.2 without `send -w` (and without -w in its other send lines): encryption but no raw send
NO_RAW_USAGE = OPENZFS_USAGE.replace("[-DLPbcehnpsVvw]", "[-DLPbcehnpsVv]").replace("[-DnVvPLecw]", "[-DnVvPLec]")


class RedisMustNotBeTouched:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis was used ({name})")


def endpoint(**overrides: Any) -> Endpoint:
    return Endpoint(name=TARGET, host="192.0.2.10", port=2222, key_file=Path("/etc/hoster-tasks/id_ed25519"),
                    known_hosts=Path("/etc/hoster-tasks/known_hosts"), root_map={ROOT: T_ROOT}, **overrides)


def source(usage: str = OPENZFS_USAGE, encryption: str | None = "aes-256-gcm") -> Host:
    src = Host("local", usage)
    props = {} if encryption is None else {"encryption": encryption}
    src.dataset(VM, **props)
    src.snapshot(f"{VM}@{H1}", guid=101, txg=1200, **props)
    src.snapshot(f"{VM}@{H2}", guid=102, txg=1300, **props)
    src.answers[("zfs", "send", "-nP")] = (0, "size\t1000\n", "")
    return src


def target(usage: str = OPENZFS_USAGE, ep: Endpoint | None = None) -> Host:
    tgt = Host(TARGET, usage, ep or endpoint())
    tgt.dataset(T_ROOT)  # the copy vm1 does not exist yet: a full send, then an incremental
    return tgt


@pytest.fixture
def pipeline(monkeypatch: pytest.MonkeyPatch) -> CapturedPipeline:
    captured = CapturedPipeline()
    monkeypatch.setattr(replicator_module, "run_pipeline", captured)
    return captured


def replicator(src: Host, tgt: Host, ep: Endpoint | None = None,
               cache: dict[str, Capabilities] | None = None) -> Replicator:
    ep = ep or endpoint()
    settings = Settings(node_name=NODE, datasets=[ROOT], targets=[ep])
    ctx = NodeContext(settings, src, probe(src), RedisMustNotBeTouched())  # type: ignore[arg-type]
    return Replicator(ctx, ep, target_shell=tgt, caps_cache=cache)


def send_all(rep: Replicator) -> None:
    sides = rep.list_sides([VM])
    for step in rep.plan(VM, sides).steps:
        rep.send_step(VM, step, sides)


def remote(receive_stage: list[str]) -> list[str]:
    assert receive_stage[0] == "ssh" and receive_stage[-3] == "--", receive_stage
    return shlex.split(receive_stage[-1])


def sends(src: Host) -> list[list[str]]:
    return [c for c in src.calls if c[:2] == ["zfs", "send"]]


# -- what is sent ----------------------------------------------------------------------------------------------


def test_encrypted_with_raw_send_on_both_sides_goes_raw(pipeline: CapturedPipeline) -> None:
    src, tgt = source(), target()
    send_all(replicator(src, tgt))

    assert [s for s, _ in pipeline.transfers] == [
        ["zfs", "send", "-w", f"{VM}@{H1}"],
        ["zfs", "send", "-w", "-I", f"{VM}@{H1}", f"{VM}@{H2}"],
    ]
    # the receive marks the copy as it creates it: a read-only backup of this node
    marks = ["-o", f"hoster-tasks:parent={NODE}", "-o", "readonly=on"]
    assert [remote(r) for _, r in pipeline.transfers] == [["zfs", "receive", "-u", "-s", *marks, T_VM]] * 2
    assert src.zfs_calls()[:2] == [["zfs"], [*GET, SRC_PROPS_OPENZFS, VM]]  # one listing, no extra read


def test_encrypted_to_a_target_without_raw_send_is_refused_before_anything_is_sent(
    pipeline: CapturedPipeline,
) -> None:
    src, tgt = source(), target(ZFS_FUSE_USAGE)
    rep = replicator(src, tgt)

    with pytest.raises(EncryptedSendRefused, match=r"vm1 is encrypted \(aes-256-gcm\).*backup1.*send_decrypted"):
        send_all(rep)

    assert pipeline.transfers == []
    assert sends(src) == []  # not even a size estimate
    assert tgt.zfs_calls() == [["zfs"], [*GET, TGT_PROPS_FUSE, T_VM]]  # the probe and the listing: nothing else
    assert issubclass(EncryptedSendRefused, Permanent) and not issubclass(EncryptedSendRefused, Transient)


def test_send_decrypted_allows_a_plain_send(pipeline: CapturedPipeline) -> None:
    ep = endpoint(send_decrypted=True)
    src, tgt = source(), target(ZFS_FUSE_USAGE, ep)
    send_all(replicator(src, tgt, ep))

    assert [s for s, _ in pipeline.transfers] == [
        ["zfs", "send", f"{VM}@{H1}"],
        ["zfs", "send", "-I", f"{VM}@{H1}", f"{VM}@{H2}"],
    ]
    assert [remote(r) for _, r in pipeline.transfers] == [["zfs", "receive", "-u", T_VM]] * 2


def test_send_decrypted_is_off_unless_set() -> None:
    assert endpoint().send_decrypted is False
    assert Settings(node_name=NODE, targets=[{"name": TARGET, "host": "h", "send_decrypted": True}]
                    ).targets[0].send_decrypted is True


def test_unencrypted_to_a_target_without_raw_send_is_sent_plain(pipeline: CapturedPipeline) -> None:
    src, tgt = source(encryption="off"), target(ZFS_FUSE_USAGE)
    send_all(replicator(src, tgt))
    assert [s for s, _ in pipeline.transfers] == [
        ["zfs", "send", f"{VM}@{H1}"],
        ["zfs", "send", "-I", f"{VM}@{H1}", f"{VM}@{H2}"],
    ]


def test_a_source_with_encryption_but_no_raw_send_reads_the_property_and_refuses(
    pipeline: CapturedPipeline,
) -> None:
    src, tgt = source(NO_RAW_USAGE), target()
    rep = replicator(src, tgt)
    assert rep.ctx.caps.encryption and not rep.ctx.caps.raw_send

    with pytest.raises(EncryptedSendRefused, match="ZFS on this node has no raw send"):
        send_all(rep)

    assert src.zfs_calls() == [
        ["zfs"],
        [*GET, f"{SNAP_PROPS},clones,hoster-tasks:base.{TARGET}", VM],  # the listing (raw send: no)
        ["zfs", "get", "-Hp", "-o", "name,property,value", "encryption", VM],  # read anyway
    ]
    assert pipeline.transfers == []


def test_a_source_without_encryption_support_never_reads_the_property(pipeline: CapturedPipeline) -> None:
    """zfs-fuse has no `encryption` property (asking for it fails the whole `zfs get`): nothing to refuse."""
    src, tgt = source(ZFS_FUSE_USAGE, encryption=None), target()
    send_all(replicator(src, tgt))

    assert [c for c in src.zfs_calls() if c[1:2] == ["get"]] == [[*GET, f"{SNAP_PROPS},hoster-tasks:base.{TARGET}", VM]]
    assert [s for s, _ in pipeline.transfers] == [
        ["zfs", "send", f"{VM}@{H1}"],
        ["zfs", "send", "-I", f"{VM}@{H1}", f"{VM}@{H2}"],
    ]


# -- a probe that fails ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [
    (255, "", "ssh: connect to host 192.0.2.10 port 2222: Connection refused\r\n"),
    (255, "", "Connection closed by 192.0.2.10 port 2222\r\n"),
    (1, "", "ssh: connect to host 192.0.2.10 port 2222: No route to host\r\n"),
])
def test_a_probe_that_cannot_reach_the_host_raises_connection_lost(answer: tuple[int, str, str]) -> None:
    tgt = target()
    tgt.answers[("zfs",)] = answer
    with pytest.raises(ConnectionLost):
        probe(tgt)


@pytest.mark.parametrize("answer, words", [
    ((127, "", "sh: 1: zfs: not found\n"), "zfs: not found"),
    ((0, "Welcome to FreeBSD!\n", ""), "Welcome to FreeBSD!"),
    ((0, "", ""), "(no output)"),
])
def test_a_probe_without_usage_text_raises_probe_failed(answer: tuple[int, str, str], words: str) -> None:
    tgt = target()
    tgt.answers[("zfs",)] = answer
    with pytest.raises(ProbeFailed) as err:
        probe(tgt)
    assert str(err.value).startswith(f"cannot probe ZFS on {TARGET}: ") and words in str(err.value)
    assert isinstance(err.value, Permanent)


def test_a_probe_of_a_missing_local_binary_raises_probe_failed(tmp_path: Path) -> None:
    with pytest.raises(ProbeFailed, match="cannot probe ZFS on local"):
        probe(LocalShell(), zfs=str(tmp_path / "no-such-zfs"))


def test_a_failed_target_probe_is_not_cached_and_the_next_run_probes_again(pipeline: CapturedPipeline) -> None:
    """A worker's cache (tasks/chain.py) must never keep "nothing supported" for a host that was down."""
    src, tgt = source(), target()
    cache: dict[str, Capabilities] = {}
    tgt.answers[("zfs",)] = (255, "", "ssh: connect to host 192.0.2.10 port 2222: Connection refused\r\n")

    with pytest.raises(ConnectionLost):
        replicator(src, tgt, cache=cache).list_sides([VM])  # loud, before any listing of the target
    assert cache == {}
    assert tgt.zfs_calls() == [["zfs"]]

    tgt.answers[("zfs",)] = (2, "", OPENZFS_USAGE)  # the host is back
    send_all(replicator(src, tgt, cache=cache))
    assert cache == {TARGET: OPENZFS2}
    assert [s for s, _ in pipeline.transfers][0] == ["zfs", "send", "-w", f"{VM}@{H1}"]  # raw: probed for real

    replicator(src, tgt, cache=cache).list_sides([VM])
    assert tgt.zfs_calls().count(["zfs"]) == 2  # probed again after the failure, then cached
