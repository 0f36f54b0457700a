"""hoster.replication.replicate / step / finish: one dataset's replication as a chain of links.

`replicate` plans nothing itself: it replaces itself with a chain whose links each plan when they run (a
plan made at queue time breaks when pruning runs first). A `step` sends its plan's first step (the full send
when the target is absent, else the incremental up to the newest snapshot) and, only when its plan had more,
puts one more `step` after itself; `finish` records the base and prunes the target. The links hand the
dataset's lock on to each other, so it stays locked from the first link to the last.

The same chain serves `replicate_all` (tasks/replicate_all.py): there a link's final failure is recorded in
the job (not raised), and a finished chain takes the job's next dataset in its lane.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from celery import chain
from celery.canvas import Signature
from celery.exceptions import Ignore, TaskPredicate

from hoster_tasks import keys
from hoster_tasks.celery_app import app
from hoster_tasks.errors import DuplicateDelivery, HosterTasksError, Transient
from hoster_tasks.jobs import Rerun
from hoster_tasks.locks import DatasetLock
from hoster_tasks.names import vm_of
from hoster_tasks.observability.crons import fanout_headers
from hoster_tasks.observability.errorfile import error_name, update_errors
from hoster_tasks.observability.sentry import report_context
from hoster_tasks.policy.planner import Action
from hoster_tasks.replication.lifecycle import advance, complete, new_progress
from hoster_tasks.replication.replicator import Replicator
from hoster_tasks.requests import ChainFailedRequest, FinishRequest, ReplicateAllRequest, ReplicateRequest, StepRequest
from hoster_tasks.settings import get_settings
from hoster_tasks.snapshots import NodeContext
from hoster_tasks.tasks.base import NodeTask, PublicTask
from hoster_tasks.zfs.probe import Capabilities
from hoster_tasks.zfs.shell import kept_ssh

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
        """A Replicator for this run; the target's SSH connection and probed capabilities are kept per worker
        process (one connection and one probe per endpoint, across links and runs; reopened when lost)."""
        ctx = NodeContext(self.settings, self.shell, self.caps, self.redis)
        ep = self.settings.endpoint(endpoint)
        return Replicator(ctx, ep, speed_limit, self._progress(report_to), target_shell=kept_ssh(ep),
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
        params = dict(zip(("prev", "dataset", "endpoint", "speed_limit", "chain", "report_to", "diverged", "job"),
                          args, strict=False))
        if self.name == finish.name:
            params = dict(zip(("prev", "dataset", "endpoint", "chain", "report_to", "job"), args, strict=False))
        params.update(kwargs)
        job = params.get("job")
        if isinstance(job, dict):  # a job's link: the whole job runs again (what is in sync costs a listing)
            return Rerun(ReplicateAllRequest.task_name, [params["endpoint"]],
                         {"vms": job.get("vms"), "speed_limit": job.get("speed_limit"),
                          "script_name": job.get("script_name")},
                         keys.node_queue(self.settings.node_name), str(job["id"]), fanout_headers(job.get("fanout")))
        prev = params.get("prev") or {}
        vm = vm_of(str(params["dataset"]), self.settings.datasets) or str(params["dataset"])
        speed = params.get("speed_limit", prev.get("speed_limit") if isinstance(prev, dict) else None)
        rerun_kwargs = {"speed_limit": speed, "diverged": params.get("diverged")}
        return Rerun(replicate.name, [vm, params["endpoint"]], rerun_kwargs,
                     keys.node_queue(self.settings.node_name), params.get("report_to") or self.request.id,
                     self.rerun_headers())


def _fail(task: ReplicationTask, rep: Replicator, dataset: str, exc: BaseException, job: dict[str, Any] | None) -> None:
    """A chain link failed: context for Sentry now; state and the ERROR_ file only once it is final (a job's
    ERROR_ file is written by its chord callback)."""
    endpoint = rep.endpoint.name
    report_context(dataset=dataset, node=task.settings.node_name, target=endpoint,
                   stderr=getattr(exc, "stderr", ""), argv=getattr(exc, "argv", None))
    if task.will_retry(exc):
        return  # will be retried: only a final failure is recorded
    rep.record_failure(dataset, str(exc))
    if job is None:
        update_errors(task.settings.error_dir, error_name(endpoint, None), {dataset: str(exc)}, [])


def dataset_chain(
    dataset: str, endpoint: str, speed_limit: float | None, report_to: str | None, queue: str,
    diverged: str | None = None, job: dict[str, Any] | None = None,
) -> Any:
    """One dataset's replication: `step | finish` (a step adds a step after itself while its plan has more).
    `vm replicate` runs it on its own; a replicate-all job runs it per dataset that needs work."""
    chain_id = uuid.uuid4().hex
    return chain(
        step.si(None, dataset, endpoint, speed_limit, chain_id, report_to, diverged, job).set(queue=queue),
        finish.s(dataset, endpoint, chain_id, report_to, job).set(queue=queue),
    )


def _record_in_job(task: ReplicationTask, job: dict[str, Any], dataset: str, outcome: dict[str, Any]) -> None:
    key = keys.job_results(str(job["id"]))
    pipe = task.redis.pipeline()
    pipe.hset(key, dataset, json.dumps(outcome, default=str))
    pipe.expire(key, keys.JOB_TTL_SECONDS)
    pipe.execute()


def _job_failure(
    task: ReplicationTask, job: dict[str, Any], dataset: str, exc: Exception, acc: dict[str, Any] | None
) -> dict[str, Any]:
    """A job's link failed for good: recorded in the job for its callback, and passed down the chain."""
    if not isinstance(exc, HosterTasksError):  # an unexpected error stops this dataset only, but is logged
        log.exception("%s of %s failed", task.name, dataset)
    _record_in_job(task, job, dataset, {"dataset": dataset, "error": str(exc) or type(exc).__name__,
                                        "transient": isinstance(exc, Transient)})
    progress = {k: v for k, v in (acc or {}).items() if k != "handoff"}
    return {**progress, "dataset": dataset, "failed": True}


def _in_job(task: ReplicationTask, job: dict[str, Any] | None, dataset: str, acc: dict[str, Any] | None,
            body: Any) -> Any:
    """Run a link's body; in a job, a final failure (no retry left) becomes a recorded outcome."""
    try:
        return body()
    except TaskPredicate:  # Ignore (a duplicate, a replaced link), Retry
        raise
    except Exception as exc:
        if job is None or task.will_retry(exc):
            raise
        return _job_failure(task, job, dataset, exc, acc)


@app.task(name="hoster.replication.replicate", base=ReplicationTask, bind=True, request_model=ReplicateRequest)
def replicate(
    self: ReplicationTask, vm: str, endpoint: str, speed_limit: float | None = None, diverged: str | None = None
) -> Any:
    """Full then incremental, automatically: replaced by the chain step | ... | finish on this node.
    `diverged` ("discard" | "keep"): what to do with a copy that went its own way (the way back)."""
    info = self.own_vm(vm)
    name = self.settings.endpoint(endpoint).name  # a bad endpoint fails here; the links use its name
    queue = keys.node_queue(self.settings.node_name)
    report_to = self.request.id
    links = dataset_chain(info.dataset, name, speed_limit, report_to, queue, diverged)
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
    job: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Plan now and run the plan's first step (a full send, or an incremental to the newest); when the plan
    had more, one more `step` runs next. `diverged` (first link only): settle a diverged copy first, as the
    user chose."""
    if prev and (prev.get("complete") or prev.get("failed")):  # nothing left here (and chains queued before
        return dict(prev)  # steps were added only when needed: step | step | finish)
    return _in_job(self, job, dataset, prev, lambda: _step(self, prev, dataset, endpoint, speed_limit, chain,
                                                           report_to, diverged, job))


def _step(
    task: LinkTask, prev: dict[str, Any] | None, dataset: str, endpoint: str, speed_limit: float | None,
    chain_id: str, report_to: str | None, diverged: str | None, job: dict[str, Any] | None,
) -> dict[str, Any]:
    task.owned_dataset(dataset)
    rep = task.replicator(endpoint, speed_limit, report_to)
    rep.on_diverged = diverged
    if job is not None:  # a failure is recorded with the file it goes to: a later success clears it
        rep.error_name = error_name(rep.endpoint.name, job.get("script_name"))
    acc = dict(prev) if prev else {**new_progress(rep.endpoint, dataset), "speed_limit": speed_limit}
    src_lock, tgt_lock = rep.locks(dataset, chain_id)
    try:
        _claim(src_lock, tgt_lock, acc)
        advance(rep, dataset, acc, max_steps=1)
        if rep.settled:
            acc["settled"] = rep.settled
        acc["handoff"] = {"source": src_lock.hand_off(), "target": tgt_lock.hand_off()}
        if not acc["complete"]:  # the plan has more steps: one more link, before the rest of the chain
            _run_next(task, step.s(dataset, endpoint, speed_limit, chain_id, report_to, None, job))
        return acc
    except DuplicateDelivery as exc:
        raise task.duplicate(exc) from None
    except BaseException as exc:
        src_lock.release()  # a compare-and-delete: never someone else's lock
        tgt_lock.release()
        if isinstance(exc, HosterTasksError) or (job is not None and isinstance(exc, Exception)):
            _fail(task, rep, dataset, exc, job)
        raise
    finally:
        rep.close()


def _run_next(task: LinkTask, sig: Signature) -> None:
    """Put `sig` right after the running link in its chain (Celery sends the chain's last entry next), with
    the chain's error callbacks. A link sent on its own, outside a chain, stays one link."""
    if not task.request.chain:
        return
    sig = sig.set(queue=keys.node_queue(task.settings.node_name))
    for errback in task.request.errbacks or []:
        sig.link_error(errback)
    task.request.chain.append(sig)


@app.task(name="hoster.replication.finish", base=LinkTask, bind=True, request_model=FinishRequest)
def finish(
    self: LinkTask, acc: dict[str, Any], dataset: str, endpoint: str, chain: str, report_to: str | None = None,
    job: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Record the base, prune the target, run deferred prunes. In a job, the outcome goes to the job and the
    lane goes on with the job's next dataset (None at the lane's end)."""
    if not acc.get("failed"):
        result = _in_job(self, job, dataset, acc, lambda: _finish(self, acc, dataset, endpoint, chain, job))
        if job is None:
            return result
        if not result.get("failed"):
            _record_in_job(self, job, dataset, result)
    elif job is None:  # (only a job's link passes a failure down the chain)
        return dict(acc)
    assert job is not None
    _next_in_lane(self, endpoint, job)
    return None


def _finish(
    task: LinkTask, acc: dict[str, Any], dataset: str, endpoint: str, chain_id: str, job: dict[str, Any] | None
) -> dict[str, Any]:
    task.owned_dataset(dataset)
    rep = task.replicator(endpoint, None)
    if job is not None:
        rep.error_name = error_name(rep.endpoint.name, job.get("script_name"))
    acc = dict(acc)
    src_lock, tgt_lock = rep.locks(dataset, chain_id)
    try:
        _claim(src_lock, tgt_lock, acc)
        sides = rep.list_sides([dataset])
        plan = rep.plan(dataset, sides)
        done = complete(rep, dataset, src_lock, sides)
        if done["base"] is not None:
            rep.record_success(dataset, acc["bytes"], acc["seconds"], done["target_newest_creation"])
        if job is None:
            update_errors(task.settings.error_dir, error_name(rep.endpoint.name, None), {}, [dataset])
        return {**acc, **done, "remaining": plan.action.value if plan.action is not Action.NOTHING else None}
    except DuplicateDelivery as exc:
        raise task.duplicate(exc) from None
    except Exception as exc:
        if isinstance(exc, HosterTasksError) or job is not None:
            _fail(task, rep, dataset, exc, job)
        raise
    finally:
        src_lock.release()
        tgt_lock.release()
        rep.close()


def _next_in_lane(task: LinkTask, endpoint: str, job: dict[str, Any]) -> None:
    """The job's next dataset not yet taken by a lane runs in this lane (this link is replaced by its chain,
    which inherits the lane's place in the chord); returns when none is left: the lane ends."""
    raw = task.redis.lpop(keys.job_queue(str(job["id"])))
    if raw is None:
        return
    dataset = raw.decode() if isinstance(raw, bytes) else str(raw)
    queue = keys.node_queue(task.settings.node_name)
    raise task.replace(dataset_chain(dataset, endpoint, job.get("speed_limit"), str(job["id"]), queue, job=job))
