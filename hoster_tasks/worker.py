"""Starting a node's worker: its own queue plus the control queue, events on, the node heartbeat running,
and the reaper that re-queues jobs whose worker died (jobs.py) on any node."""

from __future__ import annotations

import logging
import threading

import redis
from celery import signals

from hoster_tasks import keys
from hoster_tasks.jobs import reap_lost_jobs
from hoster_tasks.nodes import Heartbeat, known_nodes
from hoster_tasks.redis_conn import client_from_url
from hoster_tasks.settings import Settings, get_settings
from hoster_tasks.zfs.shell import shell_for

log = logging.getLogger(__name__)
_heartbeat: Heartbeat | None = None
_reaper_stop = threading.Event()


@signals.worker_ready.connect
def _register(**_: object) -> None:
    global _heartbeat
    settings = get_settings()
    client = client_from_url(settings.redis_url)
    _heartbeat = Heartbeat(client, settings, shell_for(None))
    _heartbeat.start()
    threading.Thread(target=_reap, args=(client, settings), name="job-reaper", daemon=True).start()


def _reap(client: redis.Redis, settings: Settings) -> None:
    from hoster_tasks.celery_app import app

    while not _reaper_stop.wait(settings.heartbeat_seconds):
        try:
            for job in reap_lost_jobs(client, app, known_nodes(client)):
                log.warning("job %s (%s) on %s was lost with its worker; re-queued as %s",
                            job.task_id, job.name, job.node, job.requeued_as)
        except Exception:  # noqa: BLE001 - the next beat tries again; a reaper must not die
            log.exception("reaping lost jobs failed")


@signals.worker_shutdown.connect
def _unregister(**_: object) -> None:
    _reaper_stop.set()
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
