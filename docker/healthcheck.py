"""Container healthchecks: `healthcheck.py worker|beat|flower [flower-url]`; exit 0 healthy, 1 not.

worker: the node's own Celery worker answers a ping (it runs tasks in pool processes, so it answers
        while replications run).
beat:   the broker answers, and the schedule file was synced recently (beat writes it every few
        minutes while its loop is alive; a hung beat stops writing).
flower: Flower's /healthcheck (open without auth) says OK.
"""

from __future__ import annotations

import glob
import os
import socket
import sys
import time
import urllib.request

BEAT_SCHEDULE_MAX_AGE = 15 * 60


def worker() -> bool:
    from hoster_tasks.celery_app import app
    from hoster_tasks.settings import get_settings

    name = f"{get_settings().node_name}@{socket.gethostname()}"
    return bool(app.control.ping(destination=[name], timeout=10))


def beat() -> bool:
    import redis

    from hoster_tasks.settings import get_settings

    redis.Redis.from_url(get_settings().redis_url, socket_connect_timeout=5, socket_timeout=5).ping()
    files = glob.glob(os.path.join(os.getcwd(), "celerybeat-schedule*"))
    return bool(files) and time.time() - max(os.path.getmtime(f) for f in files) < BEAT_SCHEDULE_MAX_AGE


def flower(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - fixed local URL
        return resp.status == 200 and resp.read().strip() == b"OK"


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else ""
    try:
        if what == "worker":
            ok = worker()
        elif what == "beat":
            ok = beat()
        elif what == "flower":
            ok = flower(argv[2] if len(argv) > 2 else "http://127.0.0.1:5555/healthcheck")
        else:
            print("usage: healthcheck.py worker|beat|flower [url]", file=sys.stderr)
            return 2
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy; say why in `docker inspect`
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {what} check failed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
