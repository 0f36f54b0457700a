"""hoster.replication.*: replicate one VM as a chain (step | step | finish), replicate_all, fanout.

`replicate` plans nothing itself: it replaces itself with a chain whose links each plan when they run (a
plan made at queue time breaks when pruning runs first). The first link does the full send when the target
is absent, the second the incremental up to the newest snapshot, the last records the base and prunes the
target. The chain's links share one lock token, so the dataset stays locked from the first link to the last.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from celery import chain
from celery.exceptions import Ignore

from hoster_tasks import keys
from hoster_tasks.celery_app import app
from hoster_tasks.errors import DuplicateDelivery, HosterTasksError, NoLiveNode, Permanent, Transient, UnknownVM
from hoster_tasks.jobs import Rerun
from hoster_tasks.locks import DatasetLock
from hoster_tasks.names import vm_of
from hoster_tasks.nodes import inventory, live_nodes
from hoster_tasks.observability.errorfile import JOB_LINE, error_name, update_errors
from hoster_tasks.observability.sentry import report_context
from hoster_tasks.policy.planner import Action
from hoster_tasks.redis_conn import client_from_url
from hoster_tasks.replication.lifecycle import advance, complete, new_progress
from hoster_tasks.replication.replicator import Replicator
from hoster_tasks.requests import (
    ChainFailedRequest,
    FinishRequest,
    ReplicateAllRequest,
    ReplicateRequest,
    ReplicationFanoutRequest,
    RetryFailedRequest,
    StepRequest,
)
from hoster_tasks.settings import get_settings
from hoster_tasks.snapshots import NodeContext
from hoster_tasks.tasks.base import NodeTask, PublicTask
from hoster_tasks.zfs.probe import Capabilities

log = logging.getLogger(__name__)


class ReplicationTask(NodeTask):
    abstract = True
    # transient failures (connection lost, timeout, lock busy) retry with exponential backoff and jitter
    autoretry_for: tuple[type[Exception], ...] = (Transient,)
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

    def will_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, Transient) and self.request.retries < self.max_retries

    def duplicate(self, exc: DuplicateDelivery) -> Ignore:
        """A second delivery of a link another delivery is running: run nothing, and end the chain here
        (Ignore sends no next link; the running delivery sends it)."""
        log.warning("%s[%s]: %s; this delivery runs nothing", self.name, self.request.id, exc)
        return Ignore(str(exc))


class LinkTask(ReplicationTask):
    """A link of a replicate chain: if its worker dies, the whole request is re-run (replication converges)."""

    abstract = True

    def rerun(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Rerun:
        params = dict(zip(("prev", "dataset", "endpoint", "speed_limit", "chain", "report_to", "diverged"), args,
                          strict=False))
        if self.name == finish.name:
            params = dict(zip(("prev", "dataset", "endpoint", "chain", "report_to"), args, strict=False))
        params.update(kwargs)
        prev = params.get("prev") or {}
        vm = vm_of(str(params["dataset"]), self.settings.datasets) or str(params["dataset"])
        speed = params.get("speed_limit", prev.get("speed_limit") if isinstance(prev, dict) else None)
        rerun_kwargs = {"speed_limit": speed, "diverged": params.get("diverged")}
        return Rerun(replicate.name, [vm, params["endpoint"]], rerun_kwargs,
                     keys.node_queue(self.settings.node_name), params.get("report_to") or self.request.id,
                     self.rerun_headers())


def _fail(task: ReplicationTask, rep: Replicator, dataset: str, exc: BaseException) -> None:
    """A chain link failed: context for Sentry now; state and the ERROR_ file only once it is final."""
    endpoint = rep.endpoint.name
    report_context(dataset=dataset, node=task.settings.node_name, target=endpoint,
                   stderr=getattr(exc, "stderr", ""), argv=getattr(exc, "argv", None))
    if task.will_retry(exc):
        return  # will be retried: only a final failure is recorded
    rep.record_failure(dataset, str(exc))
    update_errors(task.settings.error_dir, error_name(endpoint, None), {dataset: str(exc)}, [])


@app.task(name="hoster.replication.replicate", base=ReplicationTask, bind=True, request_model=ReplicateRequest)
def replicate(
    self: ReplicationTask, vm: str, endpoint: str, speed_limit: float | None = None, diverged: str | None = None
) -> Any:
    """Full then incremental, automatically: replaced by the chain step | step | finish on this node.
    `diverged` ("discard" | "keep"): what to do with a copy that went its own way (the way back)."""
    info = self.own_vm(vm)
    name = self.settings.endpoint(endpoint).name  # a bad endpoint fails here; the links use its name
    queue = keys.node_queue(self.settings.node_name)
    chain_id = uuid.uuid4().hex
    report_to = self.request.id
    links = chain(
        step.si(None, info.dataset, name, speed_limit, chain_id, report_to, diverged).set(queue=queue),
        step.s(info.dataset, name, speed_limit, chain_id, report_to).set(queue=queue),
        finish.s(info.dataset, name, chain_id, report_to).set(queue=queue),
    )
    links.on_error(chain_failed.si(report_to, info.dataset, name).set(queue=queue))
    raise self.replace(links)


@app.task(name="hoster.replication.chain_failed", base=PublicTask, bind=True, request_model=ChainFailedRequest)
def chain_failed(self: Any, task_id: str, dataset: str, endpoint: str) -> None:
    """Errback of a replicate chain: `replicate` was replaced, so no event would ever end its row in
    Flower; this one does (the result backend already holds the link's FAILURE for that id)."""
    with self.app.events.default_dispatcher(hostname=self.request.hostname) as dispatcher:
        dispatcher.send("task-failed", uuid=task_id, exception=f"replication of {dataset} to {endpoint} failed "
                        "(see the failed hoster.replication.step)", traceback="")


def _claim(src: DatasetLock, tgt: DatasetLock, acc: dict[str, Any]) -> None:
    handoff = acc.pop("handoff", None) or {}
    src.claim(handoff.get("source"))
    tgt.claim(handoff.get("target"))


@app.task(name="hoster.replication.step", base=LinkTask, bind=True, request_model=StepRequest)
def step(
    self: LinkTask, prev: dict[str, Any] | None, dataset: str, endpoint: str,
    speed_limit: float | None, chain: str, report_to: str | None = None, diverged: str | None = None,
) -> dict[str, Any]:
    """Plan now and run the plan's first step (a full send, or an incremental to the newest). `diverged`
    (first link only): settle a diverged copy first, as the user chose."""
    self.owned_dataset(dataset)
    if prev and prev.get("complete"):  # the first link's plan had one step and it ran: nothing left here
        return prev
    rep = self.replicator(endpoint, speed_limit, report_to)
    rep.on_diverged = diverged
    acc = dict(prev) if prev else {**new_progress(rep, dataset), "speed_limit": speed_limit}
    src_lock, tgt_lock = rep.locks(dataset, chain)
    try:
        _claim(src_lock, tgt_lock, acc)
        advance(rep, dataset, acc, max_steps=1)
        if rep.settled:
            acc["settled"] = rep.settled
        acc["handoff"] = {"source": src_lock.hand_off(), "target": tgt_lock.hand_off()}
        return acc
    except DuplicateDelivery as exc:
        raise self.duplicate(exc) from None
    except BaseException as exc:
        src_lock.release()  # a compare-and-delete: never someone else's lock
        tgt_lock.release()
        if isinstance(exc, HosterTasksError):
            _fail(self, rep, dataset, exc)
        raise
    finally:
        rep.close()


@app.task(name="hoster.replication.finish", base=LinkTask, bind=True, request_model=FinishRequest)
def finish(
    self: LinkTask, acc: dict[str, Any], dataset: str, endpoint: str, chain: str, report_to: str | None = None
) -> dict[str, Any]:
    self.owned_dataset(dataset)
    rep = self.replicator(endpoint, None)
    acc = dict(acc)
    src_lock, tgt_lock = rep.locks(dataset, chain)
    try:
        _claim(src_lock, tgt_lock, acc)
        sides = rep.list_sides([dataset])
        plan = rep.plan(dataset, sides)
        done = complete(rep, dataset, src_lock, sides)
        if done["base"] is not None:
            rep.record_success(dataset, acc["bytes"], acc["seconds"], done["target_newest_creation"])
        update_errors(self.settings.error_dir, error_name(rep.endpoint.name, None), {}, [dataset])
        return {**acc, **done, "remaining": plan.action.value if plan.action is not Action.NOTHING else None}
    except DuplicateDelivery as exc:
        raise self.duplicate(exc) from None
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
    ep = self.settings.endpoint(endpoint)  # endpoint and script name were checked at the boundary (requests.py)
    name = error_name(ep.name, script_name)
    try:
        outcome = _replicate_all(self, ep.name, vms, speed_limit, name)
    except HosterTasksError as exc:
        if not self.will_retry(exc):
            update_errors(self.settings.error_dir, name, {JOB_LINE: str(exc)}, [])
        raise
    done = [r["dataset"] for r in outcome["results"]] + [JOB_LINE]
    final = not (outcome["transient"] and self.request.retries < self.max_retries)
    update_errors(self.settings.error_dir, name, outcome["errors"] if final else {}, done)
    if outcome["failed"]:
        report_context(node=self.settings.node_name, target=ep.name, dataset=",".join(outcome["failed_datasets"]))
        if not final:
            raise self.retry(countdown=min(2 ** self.request.retries, self.retry_backoff_max))
        raise Permanent("replication failed: " + "; ".join(outcome["failed"]))
    return outcome


def _replicate_all(
    task: ReplicationTask, endpoint: str, vms: list[str] | None, speed_limit: float | None, error_name: str
) -> dict[str, Any]:
    from hoster_tasks.replication.run_all import replicate_many

    found = inventory(task.shell, task.settings)
    unknown = sorted(set(vms or []) - {v.name for v in found})
    if unknown:
        raise UnknownVM(f"unknown VM(s) on node {task.settings.node_name}: {', '.join(unknown)}")
    chosen = [v for v in found if not vms or v.name in vms]
    owned, stale = task.owned_vms(chosen)
    rep = task.replicator(endpoint, speed_limit, task.request.id)
    rep.error_name = error_name  # a failure is recorded with the file it goes to: a retry's success clears it
    try:
        outcome = replicate_many(rep, [v.dataset for v in owned])
    finally:
        rep.close()
    outcome["skipped"] = [f"{v.dataset} (backup copy of {v.parent})" for v in chosen
                          if v.parent != task.settings.node_name]
    outcome["superseded"] = stale
    return outcome


@app.task(name="hoster.replication.fanout", base=PublicTask, bind=True, request_model=ReplicationFanoutRequest)
def fanout(
    self: Any, endpoint: str, speed_limit: float | None = None, script_name: str | None = None
) -> dict[str, str]:
    """Beat's entry point: replicate_all on every live node that has this endpoint as a target. Its Crons
    check-in closes when the last replicate_all ends, not when this returns (observability/crons.py)."""
    from hoster_tasks.observability.crons import FanoutCheckin
    from hoster_tasks.settings import get_settings

    client = client_from_url(get_settings().redis_url)
    with FanoutCheckin(self, client) as checkin:
        nodes = [n for n in live_nodes(client) if endpoint in n.endpoints]
        if not nodes:
            raise NoLiveNode(f"no live node has endpoint {endpoint!r} configured")
        headers = checkin.expect(n.name for n in nodes)
        return {
            n.name: replicate_all.apply_async(
                args=[endpoint], kwargs={"speed_limit": speed_limit, "script_name": script_name},
                queue=keys.node_queue(n.name), headers=headers,
            ).id
            for n in nodes
        }


@app.task(name="hoster.replication.retry_failed", base=PublicTask, bind=True, request_model=RetryFailedRequest)
def retry_failed(self: Any, endpoint: str | None = None, vm: str | None = None) -> dict[str, Any]:
    """Queue `replicate` again for every (node, VM, endpoint) whose last replication failed (filtered by
    endpoint name and VM), each on its owning node: Flower's API and other systems retry by this name. Runs
    on the control queue and returns at once with the ids it queued (and what it could not queue)."""
    from hoster_tasks.client import Client

    retries = Client(get_settings(), self.app).retry_failed(endpoint, vm)
    return {"queued": [r.as_dict() for r in retries if r.result is not None],
            "skipped": [r.as_dict() for r in retries if r.result is None]}
