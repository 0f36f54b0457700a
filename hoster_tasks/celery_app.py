"""The Celery app and its settings, chosen for jobs that can run for hours.

The delivery model (see also README, "Key choices"):
- Early ack (`task_acks_late=False`). With late ack a job still running after `visibility_timeout` is
  delivered again and would run twice. A job lost with a dying worker is found by its job lease instead
  (`tasks/jobs.py`) and re-queued once; replication converges, so a re-run is safe.
- No prefetch (`worker_disable_prefetch`): a worker takes a message only when a process is free to start
  it. A reserved-but-unstarted message is unacked, and Redis would restore and deliver it a second time
  after `visibility_timeout` (a snapshot fan-out reserved behind a long replication ran an hour late, twice).
- Every countdown stays below `visibility_timeout` (settings refuse otherwise): an ETA'd retry is held
  unacked by the worker until it is due.
- Whatever still arrives twice is made harmless by the per-dataset locks (`locks.py`): a chain link's
  second delivery finds its chain's lock taken and runs nothing.
- JSON only, never pickle.
"""

from __future__ import annotations

from celery import Celery, signals

from hoster_tasks import keys
from hoster_tasks.redis_conn import celery_urls
from hoster_tasks.settings import Settings, get_settings

TASK_MODULES = [
    "hoster_tasks.tasks.snapshot", "hoster_tasks.tasks.chain", "hoster_tasks.tasks.replicate_all",
    "hoster_tasks.tasks.restore",
]


def make_app() -> Celery:
    settings = get_settings()
    # A sentinel:// redis_url: broker and backend use kombu's Sentinel transport on the same master that
    # redis_conn resolves for the locks, the registry and the state.
    redis = celery_urls(settings.redis_url)
    transport = {"visibility_timeout": settings.visibility_timeout_seconds, **redis.transport_options}
    app = Celery("hoster_tasks", broker=redis.url, backend=redis.url, include=TASK_MODULES)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
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
        **beat_config(settings),  # RedBeat: one firing beat, a standby may wait (hoster_tasks/beat.py)
    )
    try:
        from beat_schedule import build_beat_schedule

        app.conf.beat_schedule = build_beat_schedule(settings)
    except ImportError:  # a worker-only install may omit the schedule module
        pass
    return app


BEAT_SCHEDULER = "hoster_tasks.beat:HosterScheduler"  # by name: only beat imports celery-redbeat


def beat_config(settings: Settings) -> dict[str, object]:
    """RedBeat's settings: its lock, its keys and its Redis, all from our settings."""
    return {
        "beat_scheduler": BEAT_SCHEDULER,
        "beat_max_loop_interval": settings.beat_max_loop_seconds,
        "redbeat_redis_url": settings.redis_url,  # explicit: RedBeat's fallback to broker_url is deprecated
        "redbeat_redis_options": {"retry_period": settings.beat_redis_retry_seconds},
        "redbeat_key_prefix": keys.BEAT_KEY_PREFIX,
        "redbeat_lock_key": settings.beat_lock_key,
        "redbeat_lock_timeout": int(settings.beat_lock_timeout_seconds),
    }


app = make_app()


@signals.celeryd_init.connect
def _init_worker(**_: object) -> None:
    from hoster_tasks.observability.sentry import init_sentry

    init_sentry(get_settings(), component="worker")


@signals.beat_init.connect
def _init_beat(**_: object) -> None:
    from hoster_tasks.observability.sentry import init_sentry

    init_sentry(get_settings(), component="beat")
