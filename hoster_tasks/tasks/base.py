"""What every task shares: settings, Redis, the local shell, ZFS capabilities, running-job tracking."""

from __future__ import annotations

import inspect
import json
import time
from functools import cached_property
from typing import Any

import redis
from celery import Task

from hoster_tasks import keys
from hoster_tasks.errors import UnknownVM
from hoster_tasks.names import validate_vm
from hoster_tasks.nodes import VmInfo, inventory
from hoster_tasks.requests import TaskRequest
from hoster_tasks.settings import Settings, get_settings
from hoster_tasks.zfs.probe import Capabilities, probe
from hoster_tasks.zfs.shell import Shell, shell_for


class PublicTask(Task):
    """A task anything on the broker may send by name (beat, the client, Flower's API): its arguments are
    checked against its `request_model` before the body runs, so invalid input runs nothing (no zfs, no
    inventory) and the task fails with one `InvalidRequest` naming every bad argument.

    A task declares its model in its decorator: `@app.task(name=..., base=..., request_model=TakeRequest)`.
    Without one (internal chain links not modelled yet) nothing is checked here.
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
        return redis.Redis.from_url(self.settings.redis_url)

    @cached_property
    def shell(self) -> Shell:
        return shell_for(None)  # this node's own ZFS

    @cached_property
    def caps(self) -> Capabilities:
        return probe(self.shell, self.settings.zfs_command)

    def find_vm(self, vm: str) -> VmInfo:
        validate_vm(vm)
        for info in inventory(self.shell, self.settings):
            if info.name == vm:
                return info
        raise UnknownVM(f"unknown VM {vm!r} on node {self.settings.node_name}")

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        entry = {"name": self.name, "args": list(args), "kwargs": kwargs, "started": time.time()}
        self.redis.hset(keys.running_jobs(self.settings.node_name), task_id, json.dumps(entry, default=str))

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        self.redis.hdel(keys.running_jobs(self.settings.node_name), task_id)
        if self.settings.metrics_textfile is not None:
            from hoster_tasks.observability.metrics import collect_metrics, write_textfile

            write_textfile(self.settings.metrics_textfile, collect_metrics(self.settings))
