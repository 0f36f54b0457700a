"""The fan-out's take-over of beat's check-in (observability/crons.py), against sentry-sdk's own handlers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from celery.app.task import Context
from sentry_sdk.integrations.celery import beat as sentry_beat

from hoster_tasks.observability import crons

MONITOR = {
    "sentry-monitor-slug": "replicate-hoster02",
    "sentry-monitor-config": {"schedule": {"type": "crontab", "value": "50 * * * *"}, "timezone": "UTC"},
    "sentry-monitor-check-in-id": "c0ffee",
    "sentry-monitor-start-timestamp-s": "1700000000.5",
}


def beat_request() -> Context:
    """A request as a worker builds it from beat's message: sentry-sdk puts its headers at the top level
    and again under "headers" (celery#4875), which becomes `request.headers`."""
    return Context({"id": "fanout-1", "task": "hoster.replication.fanout", **MONITOR, "headers": dict(MONITOR)})


def sentry_closes(request: Context, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What sentry-sdk's own task_success handler would send for this request."""
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(sentry_beat, "capture_checkin", lambda **kw: sent.append(kw))
    sentry_beat.crons_task_success(SimpleNamespace(request=request))
    return sent


def test_take_over_leaves_sentry_sdk_nothing_to_close(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sentry_closes(beat_request(), monkeypatch)  # the contract: untouched, sentry-sdk closes it (OK)

    request = beat_request()
    checkin = crons.take_over(request)
    assert checkin == crons.CheckIn("replicate-hoster02", "c0ffee", 1700000000.5, MONITOR["sentry-monitor-config"])
    assert sentry_closes(request, monkeypatch) == []
    assert not [k for k in vars(request) if k.startswith("sentry-monitor-")]


def test_unmonitored_run_is_left_alone() -> None:
    request = Context({"id": "f", "headers": {"sentry-trace": "abc"}})
    assert crons.take_over(request) is None
    assert request.headers == {"sentry-trace": "abc"}


def test_missing_start_mark_counts_from_now() -> None:
    headers = {k: v for k, v in MONITOR.items() if k != "sentry-monitor-start-timestamp-s"}
    checkin = crons.take_over(Context({"id": "f", "headers": headers}))
    assert checkin is not None and checkin.started > 1700000000.5


@pytest.mark.parametrize("request_dict", [
    {"id": "j", "hoster-fanout": "f1"},  # no Sentry: Celery makes the custom headers `request.headers`
    {"id": "j", "hoster-fanout": "f1", "headers": {"sentry-trace": "x", "hoster-fanout": "f1"}},  # Sentry nests
])
def test_fanout_of_reads_the_header_however_celery_keeps_it(request_dict: dict[str, Any]) -> None:
    assert crons.fanout_of(Context(request_dict)) == "f1"


def test_fanout_headers() -> None:
    assert crons.fanout_headers("f1") == {crons.FANOUT_HEADER: "f1"}
    assert crons.fanout_headers(None) == {}
    assert crons.fanout_of(Context({"id": "j"})) is None


def test_what_counts_as_a_failed_job() -> None:
    assert crons.job_failed("FAILURE", RuntimeError("x"))
    assert crons.job_failed("SUCCESS", {"failed": ["pool/vm/a: boom"]})
    assert not crons.job_failed("SUCCESS", {"failed": [], "results": []})
    assert not crons.job_failed("SUCCESS", {"taken": ["pool/vm/a@x"]})


def test_record_round_trip_and_lua_reply_decoding() -> None:
    checkin = crons.CheckIn("snapshot-hourly", "id1", 1700000000.25, {"timezone": "UTC"})
    flat = [x for kv in checkin.to_record().items() for x in kv]
    reply = [v.encode() if isinstance(v, str) else v for v in flat]
    assert crons.CheckIn.from_record(crons._decode_pairs(reply)) == checkin
    assert checkin.max_runtime_seconds == 2 * 60 * 60  # snapshot-* entries (sentry.py)


class NoRedis:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis used: {name}")


@pytest.mark.parametrize("status", ["RETRY", "IGNORED", "REVOKED"])
def test_only_success_and_failure_end_a_job(status: str) -> None:
    task = SimpleNamespace(request=Context({"id": "j", "hoster-fanout": "f1"}), redis=NoRedis(),
                           settings=SimpleNamespace(node_name="n1"))
    crons.job_finished(task, status)  # type: ignore[arg-type]


def test_job_without_fanout_touches_nothing() -> None:
    task = SimpleNamespace(request=Context({"id": "j"}), redis=NoRedis(), settings=SimpleNamespace(node_name="n1"))
    crons.job_finished(task, "SUCCESS", {})  # type: ignore[arg-type]
