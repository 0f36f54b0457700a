"""`hoster-tasks metrics --serve`: /metrics answers what collect_metrics reads; a Redis it cannot reach fails
the scrape instead of serving an empty page (which would read as "no nodes")."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import redis

from hoster_tasks.observability import metrics
from hoster_tasks.settings import Settings


@pytest.fixture
def served(clean_env: None) -> Iterator[str]:
    server = metrics.metrics_server(Settings.from_env(), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as res:
            return res.status, res.headers["Content-Type"], res.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_metrics_page(served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "collect_metrics", lambda settings: "hoster_tasks_node_up{node=\"n1\"} 1\n")
    status, kind, body = _get(served + "/metrics")
    assert status == 200 and kind == metrics.CONTENT_TYPE and body == 'hoster_tasks_node_up{node="n1"} 1\n'
    assert _get(served + "/")[0] == 404


def test_redis_down_fails_the_scrape(served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(settings: Settings) -> str:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(metrics, "collect_metrics", down)
    status, _kind, body = _get(served + "/metrics")
    assert status == 503 and "Connection refused" in body
