"""hoster.replication.replicate_all / replicate_all_done / fanout / retry_failed: many datasets at once.

`replicate_all` lists both sides once for all its VMs and gives each VM that needs work the chain of
tasks/chain.py, run in `parallel` lanes (a setting per target) and joined by a chord whose callback,
`replicate_all_done`, writes the job's result and its ERROR_ file. In a job, a link's final failure is
recorded in the job (not raised): the other datasets go on, and the callback reports every failure at once.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import chord

from hoster_tasks import keys
from hoster_tasks.celery_app import app
from hoster_tasks.errors import HosterTasksError, NoLiveNode, Permanent, Transient, UnknownVM
from hoster_tasks.nodes import inventory, live_nodes
from hoster_tasks.observability.crons import fanout_headers, fanout_of
from hoster_tasks.observability.errorfile import JOB_LINE, error_name, update_errors
from hoster_tasks.observability.sentry import report_context
from hoster_tasks.redis_conn import client_from_url
from hoster_tasks.replication.lifecycle import new_progress
from hoster_tasks.requests import (
    ReplicateAllDoneRequest,
    ReplicateAllRequest,
    ReplicationFanoutRequest,
    RetryFailedRequest,
)
from hoster_tasks.settings import get_settings
from hoster_tasks.tasks.base import PublicTask
from hoster_tasks.tasks.chain import ReplicationTask, dataset_chain

log = logging.getLogger(__name__)


@app.task(
    name="hoster.replication.replicate_all", base=ReplicationTask, bind=True, request_model=ReplicateAllRequest
)
def replicate_all(
    self: ReplicationTask, endpoint: str, vms: list[str] | None = None, speed_limit: float | None = None,
    script_name: str | None = None,
) -> dict[str, Any]:
    """Every VM this node owns (copies skipped), one listing per host; each VM with work gets its own chain
    (full + incremental in one run), `parallel` of them at a time, joined by `replicate_all_done`."""
    from hoster_tasks.replication.run_all import survey

    ep = self.settings.endpoint(endpoint)  # endpoint and script name were checked at the boundary (requests.py)
    name = error_name(ep.name, script_name)
    job: dict[str, Any] = {"id": self.request.id, "vms": vms, "speed_limit": speed_limit,
                           "script_name": script_name, "fanout": fanout_of(self.request)}
    try:
        found = inventory(self.shell, self.settings, self.caps)
        unknown = sorted(set(vms or []) - {v.name for v in found})
        if unknown:
            raise UnknownVM(f"unknown VM(s) on node {self.settings.node_name}: {', '.join(unknown)}")
        chosen = [v for v in found if not vms or v.name in vms]
        owned, stale = self.owned_vms(chosen)
        datasets = [v.dataset for v in owned]
        skipped = [f"{v.dataset} (backup copy of {v.parent})" for v in chosen if v.parent != self.settings.node_name]
        rep = self.replicator(ep.name, speed_limit, self.request.id)
        rep.error_name = name  # a failure is recorded with the file it goes to: a retry's success clears it
        try:
            found_work = survey(rep, datasets)
        finally:
            rep.close()
    except HosterTasksError as exc:
        if not self.will_retry(exc):
            update_errors(self.settings.error_dir, name, {JOB_LINE: str(exc)}, [])
        raise
    if found_work.listing_error is not None:  # every dataset failed with it: recorded, retried as a whole
        error = found_work.listing_error
        for ds in datasets:
            rep.record_failure(ds, str(error))
        transient = isinstance(error, Transient)
        failures = {ds: {"dataset": ds, "error": str(error), "transient": transient} for ds in datasets}
        final = not (transient and self.request.retries < self.max_retries)
        return _conclude(self, ep.name, job, datasets, failures, skipped, stale, final=final)
    if not found_work.work:
        return _conclude(self, ep.name, job, datasets, {}, skipped, stale)
    # Parallelism by the shape of the work, not a semaphore: `parallel` lanes start, and each lane takes the
    # job's next dataset from a Redis list when its last one is done (finish replaces itself with the next
    # dataset's chain, keeping its place in the chord). No link ever waits for a slot holding a worker
    # process, nothing polls or retries for one, a killed worker leaks none, and the order stays the job's.
    # The price: the bound is per job (two jobs to one target at once may send 2 x parallel); the worker's
    # concurrency bounds everything together.
    queue = keys.node_queue(self.settings.node_name)
    lanes = found_work.work[: ep.parallel]
    waiting = found_work.work[ep.parallel :]
    if waiting:
        pipe = self.redis.pipeline()
        pipe.delete(keys.job_queue(self.request.id))  # a retried job starts its queue over
        pipe.rpush(keys.job_queue(self.request.id), *waiting)
        pipe.expire(keys.job_queue(self.request.id), keys.JOB_TTL_SECONDS)
        pipe.execute()
    done = replicate_all_done.s(ep.name, job, datasets, found_work.work, skipped, stale).set(
        queue=queue, headers=fanout_headers(job["fanout"]))  # the callback ends the job: it reports to the fan-out
    raise self.replace(chord([dataset_chain(ds, ep.name, speed_limit, self.request.id, queue, job=job)
                              for ds in lanes], done))


@app.task(name="hoster.replication.replicate_all_done", base=ReplicationTask, bind=True,
          request_model=ReplicateAllDoneRequest)
def replicate_all_done(
    self: ReplicationTask, parts: list[None], endpoint: str, job: dict[str, Any], datasets: list[str],
    work: list[str], skipped: list[str] | None = None, superseded: list[str] | None = None,
) -> dict[str, Any]:
    """The chord callback of a replicate-all job (it runs under the job's id): the result, the ERROR_ file."""
    key = keys.job_results(str(job["id"]))
    recorded = {(k.decode() if isinstance(k, bytes) else k): json.loads(v)
                for k, v in self.redis.hgetall(key).items()}  # type: ignore[union-attr]
    outcomes = {ds: recorded.get(ds) or {"dataset": ds, "error": "its chain ended without an outcome (lost)",
                                         "transient": True} for ds in work}
    outcome = _conclude(self, endpoint, job, datasets, outcomes, skipped or [], superseded or [])
    self.redis.delete(key, keys.job_queue(str(job["id"])))
    return outcome


def _conclude(
    task: ReplicationTask, endpoint: str, job: dict[str, Any], datasets: list[str], outcomes: dict[str, Any],
    skipped: list[str], superseded: list[str], final: bool = True,
) -> dict[str, Any]:
    """The job's result from each dataset's outcome (in sync when it has none), its ERROR_ file; raises
    when a dataset failed (retried first when the job is not final)."""
    ep = task.settings.endpoint(endpoint)
    name = error_name(ep.name, job.get("script_name"))
    out: dict[str, Any] = {"results": [], "failed": [], "failed_datasets": [], "errors": {}, "transient": False}
    for ds in datasets:
        got = outcomes.get(ds)
        if got is None:
            out["results"].append({**new_progress(ep, ds), "complete": True})
        elif "error" in got:
            out["failed"].append(f"{ds}: {got['error']}")
            out["failed_datasets"].append(ds)
            out["errors"][ds] = got["error"]
            out["transient"] |= bool(got.get("transient"))
        else:
            out["results"].append(got)
    out["skipped"] = skipped
    out["superseded"] = superseded
    done = [r["dataset"] for r in out["results"]] + [JOB_LINE]
    update_errors(task.settings.error_dir, name, out["errors"] if final else {}, done)
    if out["failed"]:
        report_context(node=task.settings.node_name, target=ep.name, dataset=",".join(out["failed_datasets"]))
        if not final:
            raise task.retry(countdown=min(2 ** task.request.retries, task.retry_backoff_max))
        raise Permanent("replication failed: " + "; ".join(out["failed"]))
    return out


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
