"""Node registry: each worker publishes what it holds under a key that expires when its heartbeat stops.

Beat's fan-out and the CLI find nodes and VMs here, so no node list is kept by hand.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import redis
from redis.typing import EncodableT, FieldT

from hoster_tasks import __version__, keys
from hoster_tasks.errors import NoLiveNode, ReadOnlyCopy, UnknownVM, zfs_error
from hoster_tasks.hoster_config import is_this_host, parent_host
from hoster_tasks.names import validate_vm, vm_of
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs import ops
from hoster_tasks.zfs.parse import parse_get
from hoster_tasks.zfs.probe import Capabilities, probe
from hoster_tasks.zfs.shell import Shell

if TYPE_CHECKING:  # annotations only: the CLI's light path imports this module without pydantic
    from hoster_tasks.settings import Settings


@dataclass(frozen=True)
class VmInfo:
    name: str
    dataset: str
    parent: str  # the node that owns the VM; differs from the node it is on for a backup copy


@dataclass(frozen=True)
class NodeInfo:
    name: str
    queue: str
    last_seen: float
    vms: tuple[VmInfo, ...] = field(default_factory=tuple)
    endpoints: tuple[str, ...] = field(default_factory=tuple)  # target names and hosts

    def local_vms(self) -> list[VmInfo]:
        return [v for v in self.vms if v.parent == self.name]


PARTLY_RECEIVED = "(partly received)"  # the parent of an unmarked copy whose receive was cut: no node's VM


def inventory(shell: Shell, settings: Settings, caps: Capabilities) -> list[VmInfo]:
    """The VM datasets under the configured roots, with their parent node (one walk of each root reads names
    and properties together): `hoster-tasks:parent`, else Hoster's `parent_host` in the VM's vm_config.json,
    else this node."""
    props = ops.children_props(shell, settings.datasets, _vm_props(caps), settings.zfs_command)
    return [VmInfo(vm, ds, _parent(found, settings.node_name))
            for ds, found in props.items() if (vm := vm_of(ds, settings.datasets)) is not None]


def vms_among(shell: Shell, settings: Settings, caps: Capabilities, datasets: Sequence[str]) -> list[VmInfo]:
    """`inventory`, for the given datasets only: one property read of exactly these, not a listing of every
    VM root (what a task that already knows its dataset needs). A dataset that does not exist, or is not a
    VM (a direct child of a root), is left out."""
    wanted = [ds for ds in dict.fromkeys(datasets) if vm_of(ds, settings.datasets) is not None]
    if not wanted:
        return []
    argv = cmd.get_props(wanted, _vm_props(caps), False, settings.zfs_command)
    result = shell.run(argv, check=False)
    errors = [line for line in result.stderr.splitlines() if line.strip() and "does not exist" not in line]
    if result.exit_code != 0 and errors:
        raise zfs_error(argv, result.exit_code, "\n".join(errors), shell.host)
    props = parse_get(result.stdout)
    return [VmInfo(vm, ds, _parent(found, settings.node_name))
            for ds in wanted if (found := props.get(ds)) is not None and (vm := vm_of(ds, settings.datasets))]


def _vm_props(caps: Capabilities) -> list[str]:
    """What tells a VM's parent; the resume token only where the ZFS has it (zfs-fuse refuses the name)."""
    props = [ops.PARENT_PROPERTY, "mountpoint"]
    return [*props, ops.RESUME_TOKEN] if caps.resumable else props


def _parent(found: dict[str, str], node_name: str) -> str:
    recorded = found.get(ops.PARENT_PROPERTY, "-")
    if recorded not in ("-", ""):
        return recorded
    if found.get(ops.RESUME_TOKEN, "-") not in ("-", ""):
        return PARTLY_RECEIVED  # a copy another tool's receive left cut (ours are marked as they start)
    hoster_parent = parent_host(found.get("mountpoint", "-"))
    if hoster_parent is None or is_this_host(hoster_parent, node_name):
        return node_name
    return hoster_parent


def publish(client: redis.Redis, settings: Settings, vms: list[VmInfo], now: float) -> None:
    key = keys.node(settings.node_name)
    ttl = max(int(settings.heartbeat_seconds * keys.NODE_TTL_FACTOR), 2)
    payload: dict[FieldT, EncodableT] = {
        "queue": keys.node_queue(settings.node_name),
        "last_seen": str(now),
        "vms": json.dumps([v.__dict__ for v in vms]),
        "datasets": json.dumps(settings.datasets),
        "endpoints": json.dumps(sorted({x for t in settings.targets for x in (t.name, t.host)})),
        "targets": json.dumps([t.name for t in settings.targets]),
        "version": __version__,
    }
    pipe = client.pipeline()
    pipe.hset(key, mapping=payload)
    pipe.expire(key, ttl)
    pipe.sadd(keys.NODES_SET, settings.node_name)
    pipe.zadd(keys.NODES_SEEN, {settings.node_name: now})  # "last seen" outlives the node key (`node list`)
    pipe.execute()


def _text(value: bytes | str) -> str:
    """redis-py answers bytes, or str for a client made with decode_responses=True."""
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def live_nodes(client: redis.Redis) -> list[NodeInfo]:
    out = []
    for raw_name in sorted(client.smembers(keys.NODES_SET)):
        name = _text(raw_name)
        data = _decode(client.hgetall(keys.node(name)))  # type: ignore[arg-type]
        if not data:
            continue
        vms = tuple(VmInfo(**v) for v in json.loads(data.get("vms", "[]")))
        endpoints = tuple(json.loads(data.get("endpoints", "[]")))
        out.append(NodeInfo(name, data["queue"], float(data["last_seen"]), vms, endpoints))
    return out


def require_live(client: redis.Redis) -> list[NodeInfo]:
    """The live nodes; NoLiveNode when there is none (nothing can run a task)."""
    nodes = live_nodes(client)
    if not nodes:
        raise NoLiveNode("no live worker node is registered in Redis: start `hoster-tasks worker` on a node")
    return nodes


def known_nodes(client: redis.Redis) -> list[str]:
    return sorted(_text(n) for n in client.smembers(keys.NODES_SET))


def locate_vm(client: redis.Redis, vm: str) -> tuple[NodeInfo, VmInfo]:
    """The live node that owns `vm` (a backup copy elsewhere does not count)."""
    validate_vm(vm)
    nodes = require_live(client)
    for node in nodes:
        for info in node.vms:
            if info.name == vm and info.parent == node.name:
                return node, info
    for node in nodes:
        for info in node.vms:
            if info.name == vm:
                raise ReadOnlyCopy(f"VM {vm} on {node.name} is a backup copy of node {info.parent!r}'s VM; "
                                   f"node {info.parent} is not live here: nothing changes a copy")
    raise UnknownVM(f"unknown VM {vm!r}: no live node holds it (nodes: {', '.join(n.name for n in nodes)})")


def record_owner(client: redis.Redis, vm_name: str, parent: str, previous: str) -> None:
    client.hset(keys.vm_owner(vm_name), mapping={"parent": parent, "previous": previous, "at": str(time.time())})


def superseded(client: redis.Redis, node_name: str, vms: Sequence[VmInfo]) -> dict[str, str]:
    """This node's own VMs that another node took over (a failover while this node was away): VM -> its new
    parent. Matched by the record the new parent wrote naming this node as the previous one."""
    own = [v for v in vms if v.parent == node_name]
    if not own:
        return {}
    pipe = client.pipeline()
    for v in own:
        pipe.hmget(keys.vm_owner(v.name), ["parent", "previous"])
    out = {}
    for v, (parent, previous) in zip(own, pipe.execute(), strict=True):
        if parent and previous and previous.decode() == node_name and parent.decode() != node_name:
            out[v.name] = parent.decode()
    return out


class Heartbeat:
    """Re-publishes this node every `heartbeat_seconds` from a daemon thread."""

    def __init__(self, client: redis.Redis, settings: Settings, shell: Shell) -> None:
        self.client, self.settings, self.shell = client, settings, shell
        self._caps: Capabilities | None = None  # probed at the first beat (a failed probe is tried again)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-heartbeat", daemon=True)

    def beat_once(self) -> None:
        if self._caps is None:
            self._caps = probe(self.shell, self.settings.zfs_command)
        vms = inventory(self.shell, self.settings, self._caps)
        stale = superseded(self.client, self.settings.node_name, vms)  # taken over while this node was away
        vms = [replace(v, parent=stale[v.name]) if v.name in stale else v for v in vms]
        publish(self.client, self.settings, vms, time.time())
        if self.settings.metrics_textfile is not None:  # keeps lag and node_up fresh between jobs
            from hoster_tasks.observability.metrics import collect_metrics, write_textfile

            write_textfile(self.settings.metrics_textfile, collect_metrics(self.settings))

    def start(self) -> None:
        self.beat_once()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self.beat_once()
            except Exception:  # noqa: BLE001 - a failed beat must not kill the thread; the key expires
                pass

    def stop(self) -> None:
        self._stop.set()
        self.client.delete(keys.node(self.settings.node_name))
