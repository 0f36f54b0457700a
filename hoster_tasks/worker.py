"""Starting a node's worker: its own queue plus the control queue, events on, the node heartbeat running."""

from __future__ import annotations

import redis
from celery import signals

from hoster_tasks import keys
from hoster_tasks.nodes import Heartbeat
from hoster_tasks.settings import get_settings
from hoster_tasks.zfs.shell import shell_for

_heartbeat: Heartbeat | None = None


@signals.worker_ready.connect
def _register(**_: object) -> None:
    global _heartbeat
    settings = get_settings()
    _heartbeat = Heartbeat(redis.Redis.from_url(settings.redis_url), settings, shell_for(None))
    _heartbeat.start()


@signals.worker_shutdown.connect
def _unregister(**_: object) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


def worker_argv(concurrency: int, loglevel: str = "INFO") -> list[str]:
    settings = get_settings()
    return [
        "worker",
        "-n", f"{settings.node_name}@%h",
        "-Q", f"{keys.node_queue(settings.node_name)},{keys.CONTROL_QUEUE}",
        "-E",
        "-c", str(concurrency),
        "-l", loglevel,
    ]


def run_worker(concurrency: int = 4, loglevel: str = "INFO") -> None:
    from hoster_tasks.celery_app import app

    app.worker_main(worker_argv(concurrency, loglevel))
