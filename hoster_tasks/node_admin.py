"""Node lifecycle: `node list` (every node that ever registered) and `node forget NAME` (retire one).

A node's registry key expires with its heartbeat, but its name stays in `hoster:nodes`, and its state
hashes and indexes stay until their TTL (30 days): `status` and `metrics` keep showing a retired node as
down (and `hoster_tasks_node_up 0` keeps an alert firing). `forget` removes all of that at once, found
through the node's own indexes (no scan), and only while the node is down: WATCH on its registry key makes a
heartbeat that arrives meanwhile abort the removal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import redis

from hoster_tasks import keys
from hoster_tasks.cli.table import render
from hoster_tasks.errors import Permanent
from hoster_tasks.names import validate_node_name


class NodeIsUp(Permanent):
    """`node forget` of a node whose heartbeat is fresh: stop its worker first."""


class UnknownNode(Permanent):
    pass


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _all_names(client: redis.Redis) -> list[str]:
    names = {_text(n) for n in cast("set[bytes]", client.smembers(keys.NODES_SET))}
    names |= {_text(n) for n in cast("list[bytes]", client.zrange(keys.NODES_SEEN, 0, -1))}
    return sorted(names)


def _row(name: str, data: Mapping[str, str], seen: float | None) -> dict[str, Any]:
    if not data:  # down: its registry key expired with its heartbeat
        return {"node": name, "up": False, "last_seen": seen, "vms": None, "copies": None, "targets": None,
                "version": None}
    vms = json.loads(data.get("vms", "[]"))
    own = sum(1 for v in vms if v.get("parent") == name)
    return {"node": name, "up": True, "last_seen": float(data["last_seen"]), "vms": own, "copies": len(vms) - own,
            "targets": json.loads(data.get("targets", "[]")), "version": data.get("version")}


def list_nodes(client: redis.Redis) -> list[dict[str, Any]]:
    names = _all_names(client)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.node(name))
        pipe.zscore(keys.NODES_SEEN, name)
    answers = pipe.execute()
    rows = []
    for i, name in enumerate(names):
        raw, seen = answers[2 * i], answers[2 * i + 1]
        rows.append(_row(name, {_text(k): _text(v) for k, v in raw.items()}, float(seen) if seen else None))
    return rows


def _age(ts: float | None, now: float) -> str:
    if ts is None:
        return "unknown"
    secs = max(int(now - ts), 0)
    if secs >= 86400:
        return f"{secs // 86400}d{secs % 86400 // 3600:02d}h ago"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m ago" if secs >= 3600 else f"{secs // 60}m{secs % 60:02d}s ago"


def render_nodes(rows: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    now = time.time() if now is None else now
    body = [(r["node"], "yes" if r["up"] else "NO", _age(r["last_seen"], now),
             "-" if r["vms"] is None else f"{r['vms']}" + (f" (+{r['copies']} copies)" if r["copies"] else ""),
             "-" if r["targets"] is None else (", ".join(r["targets"]) or "none"), r["version"] or "-")
            for r in rows]
    return render("Hoster Nodes", ("Node", "Up", "Last Seen", "VMs", "Targets", "Version"),
                  body or [("-", "-", "-", "-", "-", "-")])


def _state_keys(client: redis.Redis, name: str) -> list[str]:
    """The node's state hashes as its indexes name them (an expired index names nothing: nothing is left)."""
    datasets = [_text(m) for m in cast("list[bytes]", client.zrange(keys.dataset_state_index(name), 0, -1))]
    pairs = [keys.parse_replication_member(_text(m))
             for m in cast("list[bytes]", client.zrange(keys.replication_state_index(name), 0, -1))]
    out = [keys.dataset_state(name, ds) for ds in datasets]
    out += [keys.deferred_prunes(name, ds) for ds in datasets]
    out += [keys.replication_state(name, ds, target) for ds, target in pairs]
    return out


def forget_node(client: redis.Redis, name: str) -> dict[str, Any]:
    """Remove a down node's registry entry and state. Refused (NodeIsUp) while its heartbeat is fresh."""
    validate_node_name(name)
    if name not in _all_names(client):
        raise UnknownNode(f"unknown node {name!r}: it never registered (see `hoster-tasks node list`)")
    with client.pipeline() as pipe:
        try:
            pipe.watch(keys.node(name))  # a heartbeat from here on aborts the MULTI below
            if pipe.exists(keys.node(name)):
                raise NodeIsUp(f"node {name!r} is up (its heartbeat is fresh): stop its worker first, then "
                               "forget it once `node list` shows it down")
            doomed = keys.node_keys(name) + _state_keys(cast("redis.Redis", pipe), name)
            pipe.multi()
            pipe.srem(keys.NODES_SET, name)
            pipe.zrem(keys.NODES_SEEN, name)
            pipe.delete(*doomed)
            removed = pipe.execute()[-1]
        except redis.WatchError:
            raise NodeIsUp(f"node {name!r} came up while it was being forgotten: nothing was removed") from None
    return {"node": name, "removed_keys": int(removed)}
