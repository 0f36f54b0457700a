"""What every task shares: settings, Redis, the local shell, ZFS capabilities, running-job tracking."""

from __future__ import annotations

import inspect
from functools import cached_property
from typing import Any

import redis
from celery import Task, signals

from hoster_tasks import keys
from hoster_tasks.errors import ReadOnlyCopy, UnknownVM
from hoster_tasks.failover import stale_message
from hoster_tasks.jobs import JobLease, Rerun
from hoster_tasks.names import validate_vm
from hoster_tasks.nodes import PARTLY_RECEIVED, VmInfo, superseded, vms_among
from hoster_tasks.observability.crons import fanout_headers, fanout_of, job_finished
from hoster_tasks.redis_conn import client_from_url
from hoster_tasks.requests import TaskRequest
from hoster_tasks.settings import Settings, get_settings
from hoster_tasks.zfs.probe import Capabilities, probe
from hoster_tasks.zfs.shell import Shell, shell_for


class PublicTask(Task):
    """A task anything on the broker may send by name (beat, the client, Flower's API): its arguments are
    checked against its `request_model` before the body runs, so invalid input runs nothing (no zfs, no
    inventory) and the task fails with one `InvalidRequest` naming every bad argument.

    A task declares its model in its decorator: `@app.task(name=..., base=..., request_model=TakeRequest)`.
    Every public task has one (tests/unit/test_requests.py checks it); a task without one is not checked.
    """

    abstract = True
    request_model: type[TaskRequest] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.validate_request(args, kwargs)
        return super().__call__(*args, **kwargs)

    def validate_request(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskRequest | None:
        if self.request_model is None:
            return None
        request = self.request_model.from_call(args, kwargs, self.parameter_names)
        request.check_settings(get_settings())  # e.g. the endpoint is one of this worker's targets
        return request

    @cached_property
    def parameter_names(self) -> tuple[str, ...]:
        """The body's parameters in order (after `self` for bound tasks): how positional arguments bind."""
        params = inspect.signature(self.run).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)


class NodeTask(PublicTask):
    """A task that runs on a node against its local ZFS."""

    abstract = True

    @cached_property
    def settings(self) -> Settings:
        return get_settings()

    @cached_property
    def redis(self) -> redis.Redis:
        return client_from_url(self.settings.redis_url)

    @cached_property
    def shell(self) -> Shell:
        return shell_for(None)  # this node's own ZFS

    @cached_property
    def caps(self) -> Capabilities:
        return probe(self.shell, self.settings.zfs_command)

    def find_vm(self, vm: str) -> VmInfo:
        validate_vm(vm)  # then read only the datasets it can be (one per root), not every VM of the node
        candidates = [f"{root}/{vm}" for root in self.settings.datasets]
        for info in vms_among(self.shell, self.settings, self.caps, candidates):
            return info
        raise UnknownVM(f"unknown VM {vm!r} on node {self.settings.node_name}")

    def own_vm(self, vm: str) -> VmInfo:
        """A VM this node owns: every task that changes a dataset refuses a backup copy (read-only here), and
        a VM another node took over while this one was away (its stale copy)."""
        info = self.find_vm(vm)
        self.check_owned(info)
        if (new_parent := superseded(self.redis, self.settings.node_name, [info]).get(info.name)) is not None:
            raise ReadOnlyCopy(stale_message(info, new_parent))
        return info

    def owned_vms(self, vms: list[VmInfo]) -> tuple[list[VmInfo], list[str]]:
        """Of `vms`, those this node owns, and a line for each stale one another node took over."""
        own = [v for v in vms if v.parent == self.settings.node_name]
        stale = superseded(self.redis, self.settings.node_name, own)
        return [v for v in own if v.name not in stale], [stale_message(v, p) for v, p in
                                                           ((v, stale[v.name]) for v in own if v.name in stale)]

    def check_owned(self, info: VmInfo) -> None:
        if info.parent == PARTLY_RECEIVED:
            raise ReadOnlyCopy(f"{info.dataset} on {self.settings.node_name} is a partly received copy (its zfs "
                               f"receive was cut, and no node is recorded as its parent): it is read-only here")
        if info.parent != self.settings.node_name:
            raise ReadOnlyCopy(f"{info.dataset} on {self.settings.node_name} is a backup copy of node "
                               f"{info.parent!r}'s VM {info.name}: it is read-only here")

    def owned_dataset(self, dataset: str) -> VmInfo:
        for info in vms_among(self.shell, self.settings, self.caps, [dataset]):
            self.check_owned(info)
            return info
        raise UnknownVM(f"{dataset!r} is not a VM dataset on node {self.settings.node_name}")

    def rerun(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Rerun:
        """The request that re-runs this job if its worker dies (see jobs.py): by default, itself."""
        return Rerun(self.name, list(args), dict(kwargs), keys.node_queue(self.settings.node_name),
                     self.request.id, self.rerun_headers())

    def rerun_headers(self) -> dict[str, str]:
        """What a re-run must carry on: the beat fan-out it reports to (its Crons check-in)."""
        return fanout_headers(fanout_of(self.request))

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:  # Celery calls this before __call__: invalid input must not reach Redis either
            self.validate_request(args, kwargs)
        except Exception:  # noqa: BLE001 - __call__ raises the same error as the task's result
            return
        lease = JobLease(self.redis, self.settings.node_name, task_id, self.name, list(args),
                         self.rerun(args, kwargs), self.settings.lock_lease_seconds)
        if lease.start():
            _leases[task_id] = lease

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_finished(self, status, retval)  # first: a failing metrics write must not leave a check-in open
        if self.settings.metrics_textfile is not None:
            from hoster_tasks.observability.metrics import collect_metrics, write_textfile

            write_textfile(self.settings.metrics_textfile, collect_metrics(self.settings))


_leases: dict[str, JobLease] = {}  # task id -> the lease of the job running in this process


@signals.task_postrun.connect
def _end_lease(task_id: str | None = None, **_: Any) -> None:
    """Every way a job ends (success, failure, retry, ignore, replace): after_return misses the last three."""
    lease = _leases.pop(task_id or "", None)
    if lease is not None:
        lease.stop()
