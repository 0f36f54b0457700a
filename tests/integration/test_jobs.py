"""Job leases and the lost-job reaper against a real redis-server (the workers' side is in test_safety)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from hoster_tasks import keys
from hoster_tasks.jobs import JobLease, Rerun, reap_lost_jobs, requeued_as, running_jobs


@dataclass
class Sent:
    id: str


@dataclass
class RecordingApp:
    """Stands in for the Celery app: what the reaper sends and marks (the broker side is tested elsewhere)."""

    sent: list[tuple[str, list[Any], dict[str, Any]]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def send_task(self, name: str, args: list[Any], kwargs: dict[str, Any], **options: Any) -> Sent:
        self.sent.append((name, args, options))
        return Sent(f"new-{len(self.sent)}")

    @property
    def backend(self) -> RecordingApp:
        return self

    def mark_as_failure(self, task_id: str, exc: BaseException) -> None:
        self.failed.append(task_id)


@pytest.fixture
def client(redis_server) -> redis.Redis:  # type: ignore[no-untyped-def]
    c = redis.Redis.from_url(redis_server.url)
    c.flushall()
    return c


def lease(client: redis.Redis, task_id: str = "t1", seconds: float = 0.6) -> JobLease:
    rerun = Rerun("hoster.replication.replicate", ["vm1", "b1"], {}, "hoster.node.n1", "request-1")
    return JobLease(client, "n1", task_id, "hoster.replication.step", [], rerun, seconds)


def test_a_second_delivery_neither_tracks_nor_untracks_the_first(client: redis.Redis) -> None:
    first, second = lease(client, seconds=5), lease(client, seconds=5)
    assert first.start() and not second.start()
    second.stop()
    assert [j["task_id"] for j in running_jobs(client, "n1")] == ["t1"]
    first.stop()
    assert running_jobs(client, "n1") == [] and not client.exists(keys.running_jobs("n1"))


def test_a_job_whose_lease_ran_out_is_requeued_once(client: redis.Redis) -> None:
    job = lease(client)
    job.start()
    job._stop.set()  # its process died: nothing renews the lease
    app = RecordingApp()
    assert reap_lost_jobs(client, app, ["n1"]) == []  # still alive
    time.sleep(0.8)
    assert running_jobs(client, "n1") == []  # lost: not shown as running
    lost = reap_lost_jobs(client, app, ["n1"]) + reap_lost_jobs(client, app, ["n1"])
    assert [(j.task_id, j.requeued_as) for j in lost] == [("t1", "new-1")]  # the second reaper found nothing
    assert app.sent == [("hoster.replication.replicate", ["vm1", "b1"],
                         {"queue": "hoster.node.n1", "countdown": 2, "headers": {}})]
    assert requeued_as(client, "t1") == requeued_as(client, "request-1") == "new-1"
    assert app.failed == ["t1"]
    job.stop()  # the frozen process wakes up and ends: nothing of the re-run is touched
    assert requeued_as(client, "request-1") == "new-1"
