"""Failover rules that need no second node: who may take a VM over, and the encrypted copy's key (an OpenZFS
path zfs-fuse cannot run, tested by the exact argv against a scripted host)."""

from __future__ import annotations

from pathlib import Path

import pytest
from zfs_script import Host

from hoster_tasks.failover import FailoverRefused, check_can_take_over, load_key_if_needed
from hoster_tasks.nodes import NodeInfo, VmInfo
from hoster_tasks.settings import Settings
from hoster_tasks.snapshots import NodeContext
from hoster_tasks.vmctl import FileControl
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs.probe import probe

COPY = VmInfo("vm1", "backup/vm/vm1", "old")


def _node(name: str, *vms: VmInfo) -> NodeInfo:
    return NodeInfo(name, f"hoster.node.{name}", 0.0, vms)


def test_no_take_over_while_the_vm_runs_here_or_its_parent_still_owns_it(tmp_path: Path) -> None:
    ctl = FileControl(tmp_path / "vms.json")
    check_can_take_over(COPY, "new", ctl, [_node("new", COPY)])  # the parent is gone: allowed
    with pytest.raises(FailoverRefused, match="is up and still owns it"):
        check_can_take_over(COPY, "new", ctl, [_node("old", VmInfo("vm1", "tank/vm/vm1", "old"))])
    ctl.start("vm1")
    with pytest.raises(FailoverRefused, match="running here"):
        check_can_take_over(COPY, "new", ctl, [])


def _ctx(clean_env: None, host: Host, **settings: object) -> NodeContext:
    return NodeContext(Settings.from_env(node_name="new", **settings), host, probe(host), None)  # type: ignore[arg-type]


def test_an_encrypted_copy_gets_its_key_from_the_configured_place(clean_env: None) -> None:
    host = Host("new")
    host.dataset(COPY.dataset, encryption="aes-256-gcm", keystatus="unavailable")
    host.answers[("zfs", "load-key")] = (0, "", "")
    ctx = _ctx(clean_env, host, vm_key_location="file:///root/keys/{vm}.key")
    assert load_key_if_needed(ctx, COPY) is True
    assert host.zfs_calls()[-1] == ["zfs", "load-key", "-L", "file:///root/keys/vm1.key", COPY.dataset]


def test_an_encrypted_copy_without_a_key_location_stops_before_anything_changes(clean_env: None) -> None:
    host = Host("new")
    host.dataset(COPY.dataset, encryption="aes-256-gcm", keystatus="unavailable")
    with pytest.raises(FailoverRefused, match="set vm_key_location"):
        load_key_if_needed(_ctx(clean_env, host), COPY)
    assert all(c[1] in ("get",) for c in host.zfs_calls()[1:])  # after the probe: a read, nothing else


def test_a_loaded_key_or_a_plain_copy_needs_nothing(clean_env: None) -> None:
    host = Host("new")
    host.dataset(COPY.dataset, encryption="aes-256-gcm", keystatus="available")
    assert load_key_if_needed(_ctx(clean_env, host), COPY) is False
    host.dataset(COPY.dataset, encryption="off")
    assert load_key_if_needed(_ctx(clean_env, host), COPY) is False


@pytest.mark.parametrize("location", ["/root/k", "file:///root/$(id)", "file:///a/../etc/shadow", "file:///a b"])
def test_a_hostile_key_location_is_refused(location: str) -> None:
    with pytest.raises(ValueError):
        cmd.load_key("backup/vm/vm1", location)
