"""`hoster-tasks status`: per node and VM, last snapshot, last replication, lag, running jobs, locks, errors.

Every key read is named from the live nodes' VMs and the state indexes (observability.state): no scan of the
keyspace, so the cost follows the number of VMs, not the number of keys (Celery's results share the Redis).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from hoster_tasks import keys
from hoster_tasks.cli.table import render
from hoster_tasks.jobs import running_jobs
from hoster_tasks.nodes import NodeInfo, known_nodes, live_nodes
from hoster_tasks.observability import state
from hoster_tasks.redis_conn import client_from_url
from hoster_tasks.settings import Endpoint, Settings


def _hash(client: redis.Redis, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(key).items()}  # type: ignore[union-attr]


def _age(ts: str | None, now: float) -> str:
    if not ts:
        return "never"
    secs = max(int(now - float(ts)), 0)  # another host's clock may run ahead: not "-1m55s ago"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m ago" if secs >= 3600 else f"{secs // 60}m{secs % 60:02d}s ago"


_COMMAND_ERROR = re.compile(r" exited -?\d+: (?P<stderr>.*)", re.DOTALL)
_STAGES = re.compile(r"\s*\[stages: [^\]]*\]\s*$")


def error_summary(text: str | None, width: int = 60) -> str:
    """What a failed run's error says, in `width` characters: for a failed command, the first line of its
    stderr (the recorded text starts with the whole ssh/zfs argv, which says nothing in a table)."""
    if not text:
        return ""
    match = _COMMAND_ERROR.search(text)
    body = _STAGES.sub("", match["stderr"]) if match else text
    line = next((ln.strip() for ln in body.splitlines() if ln.strip()), "") or text.strip()
    return line if len(line) <= width else line[: width - 1] + "…"


def collect_status(settings: Settings, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    with client_from_url(settings.redis_url, socket_connect_timeout=5) as client:
        return _collect(client, now, settings.targets)


def _collect(client: redis.Redis, now: float, endpoints: Sequence[Endpoint] = ()) -> dict[str, Any]:
    live = {n.name: n for n in live_nodes(client)}
    vms, running = [], []
    for node in live.values():
        snapshots = state.dataset_states(client, node.name, [vm.dataset for vm in node.vms])
        by_dataset: dict[str, dict[str, dict[str, str]]] = {}
        for (dataset, target), repl in state.replication_states(client, node.name).items():
            by_dataset.setdefault(dataset, {})[target] = repl
        for vm in node.vms:
            snap = snapshots.get(vm.dataset, {})
            vms.append({"node": node.name, "vm": vm.name, "dataset": vm.dataset, "parent": vm.parent,
                        "last_snapshot": snap.get("last_snapshot"),
                        "last_snapshot_time": snap.get("last_snapshot_time"),
                        "replication": by_dataset.get(vm.dataset, {})})
        # only jobs whose lease is alive: one lost with its worker is not "running" (jobs.py re-queues it)
        running += [{"node": node.name, **job} for job in running_jobs(client, node.name)]
    nodes = [{"node": n, "up": n in live, "last_seen": live[n].last_seen if n in live else None}
             for n in known_nodes(client)]
    locks = held_locks(client, lock_keys(live.values(), endpoints))
    return {"now": now, "nodes": nodes, "vms": vms, "running": running, "locks": locks}


def lock_keys(nodes: Iterable[NodeInfo], endpoints: Sequence[Endpoint]) -> list[str]:
    """The locks a job can hold: every VM dataset (and copy) of a live node, and each target copy of a VM
    this node owns, named as the endpoints configured here name it (a target need not run hoster-tasks)."""
    out: dict[str, None] = {}
    for node in nodes:
        for vm in node.vms:
            out[keys.dataset_lock(node.name, vm.dataset)] = None
            if vm.parent == node.name:
                for ep in endpoints:
                    out[keys.dataset_lock(ep.name, ep.target_dataset(vm.dataset))] = None
    return list(out)


def held_locks(client: redis.Redis, names: Sequence[str]) -> dict[str, float]:
    """Lock key -> seconds left on its lease, for those of `names` that are held (one round trip)."""
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.pttl(name)
    ttls = pipe.execute()
    return {name: max(int(ttl), 0) / 1000 for name, ttl in zip(names, ttls, strict=True) if int(ttl) != -2}


def render_status(status: dict[str, Any]) -> str:
    now = status["now"]
    parts = [render("Hoster Nodes", ("Node", "Up", "Last Heartbeat"),
                    [(n["node"], "yes" if n["up"] else "NO", _age(n["last_seen"], now)) for n in status["nodes"]])]
    rows = []
    for v in status["vms"]:
        copy = "" if v["parent"] == v["node"] else f" (copy of {v['parent']})"
        targets = v["replication"] or {"-": {}}
        for target, r in targets.items():
            lag = _age(r.get("target_newest_creation"), now) if r.get("target_newest_creation") else "-"
            err = error_summary(r.get("last_error")) if r.get("error") == "1" else ""
            rows.append((v["node"], v["vm"] + copy, _age(v["last_snapshot_time"], now), target,
                         _age(r.get("last_success"), now) if r else "-", lag, err))
    parts.append(render("Hoster VMs", ("Node", "VM", "Last Snapshot", "Target", "Last Replication", "Lag",
                                       "Last Error"), rows))
    jobs = [(j["node"], j["name"], ", ".join(map(str, j.get("args", []))), _age(str(j["started"]), now))
            for j in status["running"]]
    parts.append(render("Running Jobs", ("Node", "Task", "Args", "Started"), jobs or [("-", "-", "-", "-")]))
    locks = [(k.split(":", 3)[2], k.split(":", 3)[3], f"{ttl:.0f}s") for k, ttl in status["locks"].items()]
    parts.append(render("Held Locks", ("Node", "Dataset", "Lease Left"), locks or [("-", "-", "-")]))
    return "\n".join(parts)
