"""Trigger hoster-tasks from other systems: tasks are sent by their public names, arguments validated first.

    from hoster_tasks.client import Client
    c = Client()                       # settings from HOSTER_* / HOSTER_CONFIG
    r = c.snapshot("vm1", stype="custom", keep=5)
    print(r.get(timeout=60))           # {'taken': [...], 'destroyed': [...], 'spared': [...]}
    c.replicate("vm1", endpoint="hoster01", speed_limit=90).get()

Public task names (stable): hoster.snapshot.take, .take_all, .fanout, .list, .destroy;
hoster.replication.replicate, .replicate_all, .fanout, .retry_failed. Arguments are checked first by the task's request
model (hoster_tasks.requests), the same one the worker checks them with. Each runs on the queue
`hoster.node.<node>` of the node that holds the VM; the client finds that node in the node registry in Redis.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.result import AsyncResult

from hoster_tasks import keys
from hoster_tasks.errors import HosterTasksError, NoLiveNode, ReadOnlyCopy, UnknownVM
from hoster_tasks.failed import FailedReplication, Retry, failed_replications
from hoster_tasks.names import validate_node_name
from hoster_tasks.nodes import NodeInfo, locate_vm, require_live
from hoster_tasks.redis_conn import client_from_url
from hoster_tasks.requests import (
    ChangeParentRequest,
    CiresetRequest,
    DestroyRequest,
    ListRequest,
    MoveRequest,
    ReplicateAllRequest,
    ReplicateRequest,
    RetryFailedRequest,
    RollbackRequest,
    TakeAllRequest,
    TakeRequest,
)
from hoster_tasks.settings import Settings, get_settings

TAKE = TakeRequest.task_name
TAKE_ALL = TakeAllRequest.task_name
LIST = ListRequest.task_name
DESTROY = DestroyRequest.task_name
REPLICATE = ReplicateRequest.task_name
REPLICATE_ALL = ReplicateAllRequest.task_name
ROLLBACK = RollbackRequest.task_name
CHANGE_PARENT = ChangeParentRequest.task_name
CIRESET = CiresetRequest.task_name
MOVE = MoveRequest.task_name


class Client:
    """Each method builds the task's request model (hoster_tasks.requests) first: a bad argument raises the
    same `InvalidRequest` the worker would, and nothing is queued."""

    def __init__(self, settings: Settings | None = None, app: Celery | None = None) -> None:
        self.settings = settings or get_settings()
        if app is None:
            from hoster_tasks.celery_app import app as default_app

            app = default_app
        self.app = app
        self.redis = client_from_url(self.settings.redis_url, socket_connect_timeout=5)

    def _send(self, name: str, node: str, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.app.send_task(name, args=list(args), kwargs=kwargs, queue=keys.node_queue(node))

    def nodes(self) -> list[NodeInfo]:
        return require_live(self.redis)

    def snapshot(self, vm: str, stype: str = "custom", keep: int | None = None) -> AsyncResult:
        req = TakeRequest.of(vm=vm, stype=stype, keep=keep)
        node, _ = locate_vm(self.redis, req.vm)
        return self._send(TAKE, node.name, req.vm, req.stype, req.keep)

    def snapshot_all(self, stype: str, keep: int, node: str | None = None) -> dict[str, AsyncResult]:
        req = TakeAllRequest.of(stype=stype, keep=keep)
        names = [validate_node_name(node)] if node else [n.name for n in self.nodes()]
        return {n: self._send(TAKE_ALL, n, req.stype, req.keep) for n in names}

    def destroy(self, snapshot: str) -> AsyncResult:
        req = DestroyRequest.of(snapshot=snapshot)
        owner = owner_of_dataset(self.nodes(), req.snapshot.split("@")[0])
        return self._send(DESTROY, owner.name, req.snapshot)

    def change_parent(self, vm: str, node: str, start: bool = False, cireset: bool = False) -> AsyncResult:
        """Failover: the copy of `vm` on `node` becomes the VM (run where the copy is)."""
        req = ChangeParentRequest.of(vm=vm, start=start, cireset=cireset)
        holder = next((n for n in self.nodes() if n.name == validate_node_name(node)), None)
        if holder is None or not any(v.name == req.vm for v in holder.vms):
            raise UnknownVM(f"node {node} is not live or holds no copy of VM {req.vm}")
        return self._send(CHANGE_PARENT, holder.name, req.vm, start=req.start, cireset=req.cireset)

    def move(self, vm: str, to: str, start: bool = True) -> AsyncResult:
        """Planned failover of `vm` from its parent to node `to`; the result is the new parent's."""
        req = MoveRequest.of(vm=vm, to=to, start=start)
        node, _ = locate_vm(self.redis, req.vm)
        return self._send(MOVE, node.name, req.vm, req.to, start=req.start)

    def cireset(self, vm: str) -> AsyncResult:
        req = CiresetRequest.of(vm=vm)
        node, _ = locate_vm(self.redis, req.vm)
        return self._send(CIRESET, node.name, req.vm)

    def rollback(self, vm: str, snapshot: str, **flags: Any) -> AsyncResult:
        """Roll `vm` back to `snapshot`: flags force_stop, force_start, destroy_base, keep_newer, dry_run,
        expect_destroyed (the list a dry run showed and the user agreed to)."""
        req = RollbackRequest.of(vm=vm, snapshot=snapshot, **flags)
        node, _ = locate_vm(self.redis, req.vm)
        return self._send(ROLLBACK, node.name, **req.model_dump(exclude={"first_try"}))

    def replicate(
        self, vm: str, endpoint: str, speed_limit: float | None = None, diverged: str | None = None
    ) -> AsyncResult:
        """`diverged`: "discard" or "keep", for a copy that went its own way (the way back after a failover)."""
        req = ReplicateRequest.of(vm=vm, endpoint=endpoint, speed_limit=speed_limit, diverged=diverged)
        node, _ = locate_vm(self.redis, req.vm)
        if req.endpoint not in node.endpoints:  # the node publishes its targets' names and hosts
            known = ", ".join(node.endpoints) or "none configured"
            raise req.invalid([("endpoint", f"endpoint: unknown endpoint {req.endpoint!r} on node {node.name} "
                                            f"(known: {known})")])
        extra = {"diverged": req.diverged} if req.diverged else {}
        return self._send(REPLICATE, node.name, req.vm, req.endpoint, speed_limit=req.speed_limit, **extra)

    def replicate_all(
        self,
        endpoint: str,
        vms: list[str] | None = None,
        speed_limit: float | None = None,
        script_name: str | None = None,
        node: str | None = None,
    ) -> dict[str, AsyncResult]:
        req = ReplicateAllRequest.of(endpoint=endpoint, vms=vms, speed_limit=speed_limit, script_name=script_name)
        names = [validate_node_name(node)] if node else [n.name for n in self.nodes() if req.endpoint in n.endpoints]
        if not names:
            raise NoLiveNode(f"no live node has endpoint {req.endpoint!r} configured as a target")
        return {
            n: self._send(REPLICATE_ALL, n, req.endpoint, vms=req.vms, speed_limit=req.speed_limit,
                          script_name=req.script_name)
            for n in names
        }

    def failed_replications(self, endpoint: str | None = None, vm: str | None = None) -> list[FailedReplication]:
        """Every (node, VM, endpoint) whose last replication failed: error, since when, attempts."""
        req = RetryFailedRequest.of(endpoint=endpoint, vm=vm)
        return failed_replications(self.redis, req.endpoint, req.vm)

    def retry_failed(self, endpoint: str | None = None, vm: str | None = None) -> list[Retry]:
        """`replicate` again, on its owning node, for each failed replication; one whose node is down (or whose
        VM or endpoint is gone) is skipped with the reason, the others are still queued."""
        out = []
        for row in self.failed_replications(endpoint, vm):
            try:
                out.append(Retry(row, self.replicate(row.vm, row.endpoint)))
            except HosterTasksError as exc:
                out.append(Retry(row, None, str(exc)))
        return out


def owner_of_dataset(nodes: list[NodeInfo], dataset: str) -> NodeInfo:
    """The live node that owns `dataset`: a node holding only a backup copy of it never gets a change."""
    holders = [(n, v) for n in nodes for v in n.vms if v.dataset == dataset]
    for node, vm in holders:
        if vm.parent == node.name:
            return node
    if holders:
        node, vm = holders[0]
        raise ReadOnlyCopy(f"{dataset} on {node.name} is a backup copy of node {vm.parent!r}'s VM {vm.name}: "
                           "it is read-only there")
    raise UnknownVM(f"no live node holds dataset {dataset!r}")
