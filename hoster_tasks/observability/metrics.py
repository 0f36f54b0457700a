"""Prometheus metrics from the state the tasks keep in Redis: text exposition / node_exporter textfile.

The state is found through the per-node indexes (observability.state), never by scanning the keyspace:
workers render this after every task, and Celery's result keys share the Redis.
"""

from __future__ import annotations

import http.server
import logging
import math
import os
import tempfile
import time
from typing import Any

import redis

from hoster_tasks import keys
from hoster_tasks.nodes import known_nodes
from hoster_tasks.observability import progress, state
from hoster_tasks.redis_conn import client_from_url
from hoster_tasks.settings import Settings

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HELP = {
    "hoster_tasks_last_snapshot_timestamp_seconds": ("gauge", "Time of the newest snapshot taken by hoster-tasks"),
    "hoster_tasks_last_replication_success_timestamp_seconds": ("gauge", "Time of the last successful replication"),
    "hoster_tasks_replication_bytes_total": ("counter", "Bytes sent by replications"),
    "hoster_tasks_last_replication_duration_seconds": ("gauge", "Duration of the last successful replication"),
    "hoster_tasks_replication_failures_total": ("counter", "Failed replication attempts"),
    "hoster_tasks_replication_lag_seconds": ("gauge", "Age of the newest snapshot on the target"),
    "hoster_tasks_replication_bytes_remaining": (
        "gauge", "Bytes the running transfer still has to send, from the size estimate (0 when idle)"),
    "hoster_tasks_replication_error": ("gauge", "1 while the last replication run failed"),
    "hoster_tasks_node_last_heartbeat_timestamp_seconds": ("gauge", "Last heartbeat of a node's worker"),
    "hoster_tasks_node_up": ("gauge", "1 while the node's heartbeat is fresh"),
}


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    """Exact: `%g` keeps 6 digits, which moved timestamps by up to 500 s and rounded byte counters."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)  # the shortest form that reads back as the same float


def _line(name: str, labels: dict[str, str], value: float) -> str:
    inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {format_value(value)}"


def samples(client: redis.Redis, now: float) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name in HELP}
    nodes = known_nodes(client)
    for node in nodes:
        _snapshot_samples(out, node, state.dataset_states(client, node))
        _replication_samples(out, node, state.replication_states(client, node), now)
    _node_samples(out, client, nodes)
    return out


def _snapshot_samples(out: dict[str, list[str]], node: str, states: dict[str, dict[str, str]]) -> None:
    for dataset, data in states.items():
        if "last_snapshot_time" in data:
            out["hoster_tasks_last_snapshot_timestamp_seconds"].append(
                _line("hoster_tasks_last_snapshot_timestamp_seconds", {"node": node, "dataset": dataset},
                      float(data["last_snapshot_time"])))


def _replication_samples(
    out: dict[str, list[str]], node: str, states: dict[tuple[str, str], dict[str, str]], now: float
) -> None:
    for (dataset, target), data in states.items():
        labels = {"node": node, "dataset": dataset, "target": target}
        values = {
            "hoster_tasks_last_replication_success_timestamp_seconds": data.get("last_success"),
            "hoster_tasks_replication_bytes_total": data.get("bytes_total", "0"),
            "hoster_tasks_last_replication_duration_seconds": data.get("duration"),
            "hoster_tasks_replication_failures_total": data.get("failures", "0"),
            "hoster_tasks_replication_error": data.get("error", "0"),
        }
        newest = float(data.get("target_newest_creation") or 0)
        if newest:
            values["hoster_tasks_replication_lag_seconds"] = str(max(now - newest, 0))
        remaining = progress.remaining_of(data, now)
        if remaining is not None:  # unknown while a resumed send (no size estimate) runs
            values["hoster_tasks_replication_bytes_remaining"] = str(remaining)
        for name, value in values.items():
            if value not in (None, ""):
                out[name].append(_line(name, labels, float(value)))  # type: ignore[arg-type]


def _node_samples(out: dict[str, list[str]], client: redis.Redis, nodes: list[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for node in nodes:
        pipe.hget(keys.node(node), "last_seen")
    for node, seen in zip(nodes, pipe.execute(), strict=True):
        out["hoster_tasks_node_up"].append(_line("hoster_tasks_node_up", {"node": node}, 1 if seen else 0))
        if seen:
            out["hoster_tasks_node_last_heartbeat_timestamp_seconds"].append(
                _line("hoster_tasks_node_last_heartbeat_timestamp_seconds", {"node": node}, float(seen)))


def collect_metrics(settings: Settings, now: float | None = None) -> str:
    # closed at once: workers call this after every task and from the heartbeat thread
    with client_from_url(settings.redis_url, socket_connect_timeout=5) as client:
        return render_metrics(samples(client, time.time() if now is None else now))


def render_metrics(by_name: dict[str, list[str]]) -> str:
    lines = []
    for name, rows in by_name.items():
        kind, text = HELP[name]
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *rows]
    return "\n".join(lines) + "\n"


def write_textfile(path: str | os.PathLike[str], text: str) -> None:
    """Atomic, as node_exporter's textfile collector requires (it may read at any moment)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".hoster_tasks.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# -- the HTTP exporter (`hoster-tasks metrics --serve PORT`) -----------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /metrics reads Redis on every scrape: the series are as fresh as the scrape, and a worker that
    stopped shows as `node_up 0` once its heartbeat key expired (a textfile the worker wrote would freeze)."""

    settings: Settings  # set on the subclass serve_metrics makes

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, "text/plain", b"see /metrics\n")
            return
        try:
            body = collect_metrics(self.settings).encode()
        except redis.RedisError as exc:
            # a failed scrape (up == 0), not an empty one: absent() rules then say the metrics are missing
            log.warning("metrics: Redis unavailable: %s", exc)
            self._reply(503, "text/plain", f"redis unavailable: {exc}\n".encode())
            return
        self._reply(200, CONTENT_TYPE, body)

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug(format, *args)  # one line per scrape would flood the journal


def metrics_server(settings: Settings, address: str, port: int) -> http.server.ThreadingHTTPServer:
    handler = type("MetricsHandler", (_Handler,), {"settings": settings})
    return http.server.ThreadingHTTPServer((address, port), handler)


def serve_metrics(settings: Settings, address: str, port: int) -> int:
    """Serve /metrics until interrupted. Run it on one host (or a few: the alert rules deduplicate)."""
    server = metrics_server(settings, address, port)
    print(f"serving hoster-tasks metrics on http://{address}:{server.server_address[1]}/metrics", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
