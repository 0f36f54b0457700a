"""hoster.replication.*: replicate one VM as a chain (step | step | finish), replicate_all, fanout.

`replicate` plans nothing itself: it replaces itself with a chain whose links each plan when they run (a
plan made at queue time breaks when pruning runs first). The first link does the full send when the target
is absent, the second the incremental up to the newest snapshot, the last records the base and prunes the
target. The chain's links share one lock token, so the dataset stays locked from the first link to the last.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import chain

from hoster_tasks import keys
from hoster_tasks.celery_app import app
from hoster_tasks.errors import HosterTasksError, NoLiveNode, Permanent, Transient
from hoster_tasks.nodes import VmInfo, inventory, live_nodes
from hoster_tasks.observability.errorfile import clear_error_file, write_error_file
from hoster_tasks.observability.sentry import report_context
from hoster_tasks.policy.planner import Action
from hoster_tasks.replication.replicator import Replicator
from hoster_tasks.requests import ReplicateAllRequest, ReplicateRequest, ReplicationFanoutRequest
from hoster_tasks.settings import get_settings
from hoster_tasks.snapshots import NodeContext
from hoster_tasks.tasks.base import NodeTask, PublicTask
from hoster_tasks.zfs.probe import Capabilities


class ReplicationTask(NodeTask):
    abstract = True
    # transient failures (connection lost, timeout, lock busy) retry with exponential backoff and jitter
    autoretry_for = (Transient,)
    retry_backoff = True
    retry_jitter = True
    max_retries = get_settings().retry_max
    target_caps_cache: dict[str, Capabilities] = {}  # per worker process, shared by the replication tasks
    retry_backoff_max = get_settings().retry_backoff_max_seconds

    def replicator(self, endpoint: str, speed_limit: float | None, report_to: str | None = None) -> Replicator:
        """A Replicator for this run; the target's probed capabilities are kept per worker process."""
        ctx = NodeContext(self.settings, self.shell, self.caps, self.redis)
        return Replicator(ctx, self.settings.endpoint(endpoint), speed_limit, self._progress(report_to),
                          caps_cache=self.target_caps_cache)

    def _progress(self, report_to: str | None) -> Any:
        # Captured now: `report` runs in the pipeline's pv reader thread, where the task request is empty.
        own_id, hostname = self.request.id, self.request.hostname
        last = [0.0]

        def report(meta: dict[str, Any]) -> None:
            now = time.monotonic()
            if now - last[0] < 0.5 and not meta.get("done"):
                return
            last[0] = now
            if own_id:  # Flower shows the task as PROGRESS
                with self.app.events.default_dispatcher(hostname=hostname) as dispatcher:
                    dispatcher.send("task-progress", uuid=own_id, **meta)
            for task_id in {own_id, report_to} - {None}:
                self.update_state(task_id=task_id, state="PROGRESS", meta=meta)  # the CLI's bar

        return report

    def source_vm(self, vm: str) -> VmInfo:
        info = self.find_vm(vm)
        if info.parent != self.settings.node_name:
            raise Permanent(
                f"{info.dataset} is a backup copy of node {info.parent!r}'s VM: not replicating it (back) from here"
            )
        return info


def _error_name(endpoint: str, script_name: str | None) -> str:
    return script_name or f"to_{endpoint}"


def _fail(task: ReplicationTask, rep: Replicator, dataset: str, exc: BaseException) -> None:
    """A chain link failed: context for Sentry now; state and the ERROR_ file only once it is final."""
    endpoint = rep.endpoint.name
    report_context(dataset=dataset, node=task.settings.node_name, target=endpoint,
                   stderr=getattr(exc, "stderr", ""), argv=getattr(exc, "argv", None))
    if isinstance(exc, Transient) and task.request.retries < task.max_retries:
        return  # will be retried: only a final failure is recorded
    rep.record_failure(dataset, str(exc))
    write_error_file(task.settings.error_dir, _error_name(endpoint, None), f"{dataset}: {exc}")


@app.task(name="hoster.replication.replicate", base=ReplicationTask, bind=True, request_model=ReplicateRequest)
def replicate(self: ReplicationTask, vm: str, endpoint: str, speed_limit: float | None = None) -> Any:
    """Full then incremental, automatically: replaced by the chain step | step | finish on this node."""
    info = self.source_vm(vm)
    self.settings.endpoint(endpoint)  # a bad endpoint fails here, before anything is queued
    queue = keys.node_queue(self.settings.node_name)
    token = uuid.uuid4().hex
    report_to = self.request.id
    links = chain(
        step.si(None, info.dataset, endpoint, speed_limit, token, report_to).set(queue=queue),
        step.s(info.dataset, endpoint, speed_limit, token, report_to).set(queue=queue),
        finish.s(info.dataset, endpoint, token).set(queue=queue),
    )
    links.on_error(chain_failed.si(report_to, info.dataset, endpoint).set(queue=queue))
    raise self.replace(links)


@app.task(name="hoster.replication.chain_failed", bind=True)
def chain_failed(self: Any, task_id: str, dataset: str, endpoint: str) -> None:
    """Errback of a replicate chain: `replicate` was replaced, so no event would ever end its row in
    Flower; this one does (the result backend already holds the link's FAILURE for that id)."""
    with self.app.events.default_dispatcher(hostname=self.request.hostname) as dispatcher:
        dispatcher.send("task-failed", uuid=task_id, exception=f"replication of {dataset} to {endpoint} failed "
                        "(see the failed hoster.replication.step)", traceback="")


@app.task(name="hoster.replication.step", base=ReplicationTask, bind=True)
def step(
    self: ReplicationTask, prev: dict[str, Any] | None, dataset: str, endpoint: str,
    speed_limit: float | None, token: str, report_to: str | None = None,
) -> dict[str, Any]:
    """Plan now and run the plan's first step (a full send, or an incremental to the newest)."""
    acc: dict[str, Any] = dict(prev or {"dataset": dataset, "target": endpoint, "sent": [], "bytes": 0,
                                        "seconds": 0.0, "action": "nothing"})
    if acc.get("complete"):  # the first link's plan had one step and it ran: nothing left for this one
        return acc
    rep = self.replicator(endpoint, speed_limit, report_to)
    src_lock, tgt_lock = rep.locks(dataset, token)
    acc["target"] = rep.endpoint.target_dataset(dataset)
    acc["target_host"] = rep.endpoint.name
    try:
        src_lock.acquire()
        tgt_lock.acquire()
        sides, plan, resumed = rep.prepare(dataset)
        acc["bytes"] += resumed
        if plan.steps:
            first = plan.steps[0]
            src_lock.check()
            result = rep.send_step(dataset, first, sides)
            acc["sent"].append(first.snapshot.name)
            acc["bytes"] += result.bytes
            acc["seconds"] += result.seconds
            if acc["action"] == "nothing":
                acc["action"] = plan.action.value
        acc["complete"] = len(plan.steps) <= 1
        src_lock.stop_heartbeat()
        tgt_lock.stop_heartbeat()  # the lease carries the lock to the next link
        return acc
    except BaseException as exc:
        src_lock.release()
        tgt_lock.release()
        if isinstance(exc, HosterTasksError):
            _fail(self, rep, dataset, exc)
        raise
    finally:
        rep.close()


@app.task(name="hoster.replication.finish", base=ReplicationTask, bind=True)
def finish(self: ReplicationTask, acc: dict[str, Any], dataset: str, endpoint: str, token: str) -> dict[str, Any]:
    rep = self.replicator(endpoint, None)
    src_lock, tgt_lock = rep.locks(dataset, token)
    try:
        src_lock.acquire()
        tgt_lock.acquire()
        sides = rep.list_sides([dataset])
        plan = rep.plan(dataset, sides)
        done = rep.finish(dataset, sides, sides)
        rep.record_success(dataset, acc["bytes"], acc["seconds"], done["target_newest_creation"])
        clear_error_file(self.settings.error_dir, _error_name(endpoint, None))
        return {**acc, **done, "remaining": plan.action.value if plan.action is not Action.NOTHING else None}
    except HosterTasksError as exc:
        _fail(self, rep, dataset, exc)
        raise
    finally:
        src_lock.release()
        tgt_lock.release()
        rep.close()


@app.task(
    name="hoster.replication.replicate_all", base=ReplicationTask, bind=True, request_model=ReplicateAllRequest
)
def replicate_all(
    self: ReplicationTask, endpoint: str, vms: list[str] | None = None, speed_limit: float | None = None,
    script_name: str | None = None,
) -> dict[str, Any]:
    """Every VM this node owns (copies skipped), one listing per host, full + incremental in one run."""
    from hoster_tasks.replication.run_all import replicate_many

    owned: list[VmInfo] = []
    skipped: list[VmInfo] = []
    for info in inventory(self.shell, self.settings):
        if vms and info.name not in vms:
            continue
        (owned if info.parent == self.settings.node_name else skipped).append(info)
    rep = self.replicator(endpoint, speed_limit, self.request.id)
    try:
        outcome = replicate_many(rep, [v.dataset for v in owned])
    finally:
        rep.close()
    outcome["skipped"] = [f"{v.dataset} (backup copy of {v.parent})" for v in skipped]
    name = _error_name(endpoint, script_name)
    if outcome["failed"]:
        report_context(node=self.settings.node_name, target=endpoint, dataset=",".join(outcome["failed_datasets"]))
        write_error_file(self.settings.error_dir, name, "\n".join(outcome["failed"]))
        if outcome["transient"] and self.request.retries < self.max_retries:
            raise self.retry(countdown=min(2 ** self.request.retries, self.retry_backoff_max))
        raise Permanent("replication failed: " + "; ".join(outcome["failed"]))
    clear_error_file(self.settings.error_dir, name)
    return outcome


@app.task(name="hoster.replication.fanout", base=PublicTask, bind=True, request_model=ReplicationFanoutRequest)
def fanout(
    self: Any, endpoint: str, speed_limit: float | None = None, script_name: str | None = None
) -> dict[str, str]:
    """Beat's entry point: replicate_all on every live node that has this endpoint as a target."""
    import redis

    from hoster_tasks.settings import get_settings

    client = redis.Redis.from_url(get_settings().redis_url)
    nodes = [n for n in live_nodes(client) if endpoint in n.endpoints]
    if not nodes:
        raise NoLiveNode(f"no live node has endpoint {endpoint!r} configured")
    return {
        n.name: replicate_all.apply_async(
            args=[endpoint], kwargs={"speed_limit": speed_limit, "script_name": script_name},
            queue=keys.node_queue(n.name),
        ).id
        for n in nodes
    }
