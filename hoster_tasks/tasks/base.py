"""What every task shares: settings, Redis, the local shell, ZFS capabilities, running-job tracking."""

from __future__ import annotations

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
from hoster_tasks.settings import Settings, get_settings
from hoster_tasks.zfs.probe import Capabilities, probe
from hoster_tasks.zfs.shell import Shell, shell_for


class NodeTask(Task):
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
