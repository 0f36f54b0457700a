"""The CLI waits on the result backend's notification (hoster_tasks/cli/progress.py wait_with_progress): a real
Celery Redis backend on a private redis-server, the "worker" storing states from a thread. The bar is drawn from
the PROGRESS messages, the result is returned once stored (no 0.5 s polling: `ready()` is asked at most once
per look for a lost job), a failure is raised, and a lost job is followed to its re-run."""

from __future__ import annotations

import io
import threading
import time
import uuid
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult

from hoster_tasks.cli.progress import wait_with_progress


@pytest.fixture
def app(private_redis: Any) -> Any:
    app = Celery("wait-test", broker=private_redis.url, backend=private_redis.url)
    app.conf.update(result_serializer="json", accept_content=["json"], result_accept_content=["json"])
    yield app
    app.close()


class Counting(AsyncResult):
    readies = 0

    def ready(self) -> bool:
        type(self).readies += 1
        return super().ready()


def later(app: Any, seconds: float, *steps: tuple[str, str, Any]) -> threading.Thread:
    """Store (task id, state, result) in order, `seconds` apart, as a worker would."""

    def run() -> None:
        for task_id, state, value in steps:
            time.sleep(seconds)
            app.backend.store_result(task_id, value, state)

    return threading.Thread(target=run, daemon=True)


def test_result_and_progress_arrive_by_notification(app: Any) -> None:
    task_id = str(uuid.uuid4())
    result = Counting(task_id, app=app)
    Counting.readies = 0
    follows: list[str] = []
    out = io.StringIO()
    worker = later(app, 0.3, (task_id, "PROGRESS", {"dataset": "tank/vm/a", "bytes": 1 << 20, "total": 4 << 20}),
                   (task_id, "PROGRESS", {"dataset": "tank/vm/a", "bytes": 4 << 20, "total": 4 << 20}),
                   (task_id, "SUCCESS", {"taken": ["tank/vm/a@x"]}))  # fmt: skip
    worker.start()

    got = wait_with_progress(result, timeout=30, out=out, poll=20, follow=lambda i: follows.append(i) or None)

    worker.join()
    assert got == {"taken": ["tank/vm/a@x"]}
    lines = out.getvalue().splitlines()
    assert any("tank/vm/a" in line and "25.0%" in line for line in lines), lines
    assert any("100.0%" in line for line in lines), lines
    assert Counting.readies <= 3  # one look before waiting, one after: never a poll loop
    assert follows == []  # a job that succeeded is never looked up as lost


def test_a_failure_is_raised_after_one_look_for_a_rerun(app: Any) -> None:
    task_id = str(uuid.uuid4())
    follows: list[str] = []
    worker = later(app, 0.2, (task_id, "FAILURE", ValueError("boom")))
    worker.start()
    with pytest.raises(Exception, match="boom"):
        wait_with_progress(AsyncResult(task_id, app=app), timeout=30, out=io.StringIO(), poll=20,
                           follow=lambda i: follows.append(i) or None)  # fmt: skip
    assert follows == [task_id]


def test_a_lost_job_is_followed_to_its_rerun(app: Any) -> None:
    """No result for the first job (its worker died): the follower is asked every `poll` seconds, and the
    re-run's result is returned."""
    lost, rerun = str(uuid.uuid4()), str(uuid.uuid4())
    asked: list[str] = []

    def follow(task_id: str) -> str | None:
        asked.append(task_id)
        return rerun if task_id == lost and len(asked) >= 2 else None

    worker = later(app, 0.2, (rerun, "SUCCESS", {"ok": True}))
    worker.start()
    out = io.StringIO()
    got = wait_with_progress(AsyncResult(lost, app=app), timeout=30, out=out, poll=0.2, follow=follow)
    assert got == {"ok": True}
    assert asked[:2] == [lost, lost]
    assert f"re-queued as {rerun}" in out.getvalue()
