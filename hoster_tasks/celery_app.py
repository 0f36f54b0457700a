"""The Celery app and its settings, chosen for jobs that can run for hours.

Choices (see ../shared notes on the Redis broker):
- Early ack (`task_acks_late=False`). With late ack a job still running after `visibility_timeout` is
  delivered again and would run twice; replication converges (the next run sends whatever is missing) and
  snapshots are re-run by the schedule, so losing a job when a worker dies is the smaller harm. The
  per-dataset lock still makes any duplicate delivery wait or fail as busy instead of overlapping.
- `visibility_timeout` stays above every retry countdown (`retry_backoff_max` <= 600 s): ETA'd retries are
  held unacked by the worker and would otherwise be redelivered.
- Prefetch 1: a long job must not sit on messages that another worker process could run.
- JSON only, never pickle.
"""

from __future__ import annotations

from celery import Celery, signals

from hoster_tasks import keys
from hoster_tasks.settings import get_settings

TASK_MODULES = ["hoster_tasks.tasks.snapshot", "hoster_tasks.tasks.replication"]


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("hoster_tasks", broker=settings.redis_url, backend=settings.redis_url, include=TASK_MODULES)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": 3600},
        result_backend_transport_options={"visibility_timeout": 3600},
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_default_queue=keys.CONTROL_QUEUE,
        result_expires=7 * 24 * 3600,
        result_extended=True,  # task name and args stay readable in results (Flower, status)
        timezone="UTC",
        enable_utc=True,
        worker_hijack_root_logger=False,
        # A warm shutdown (SIGTERM) waits for running replications, however long: the service units allow
        # for it. A cold shutdown (SIGINT/SIGQUIT) gets this much grace; cut transfers converge on re-run.
        worker_soft_shutdown_timeout=30.0,
    )
    try:
        from beat_schedule import build_beat_schedule

        app.conf.beat_schedule = build_beat_schedule(settings)
    except ImportError:  # a worker-only install may omit the schedule module
        pass
    return app


app = make_app()


@signals.celeryd_init.connect
def _init_worker(**_: object) -> None:
    from hoster_tasks.observability.sentry import init_sentry

    init_sentry(get_settings(), component="worker")


@signals.beat_init.connect
def _init_beat(**_: object) -> None:
    from hoster_tasks.observability.sentry import init_sentry

    init_sentry(get_settings(), component="beat")
