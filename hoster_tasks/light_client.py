"""The CLI's light path for a task that only answers (`snapshot list`): publish the task message Celery
would publish, with redis-py alone, and wait for the result the worker stores.

Why: importing Celery with kombu's Redis transport and pydantic-settings costs ~0.45 s of CPU before any of
our code runs, more than the whole round trip of a listing should take (bench/README.md, bar 2). The worker
side is unchanged: it receives an ordinary Celery message (protocol 2, kombu's Redis transport: a JSON
envelope pushed onto the queue's list), validates its request model and stores its result as always.
tests/unit/test_light_client.py compares the message with the one Celery itself builds for the same call.

Only for tasks that change nothing: a lost listing is simply asked again, so none of the CLI's following
of re-queued jobs is needed here. What this path leaves out: Celery's `task-sent` event (Flower shows the
task from its `received` event on).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from hoster_tasks import keys
from hoster_tasks.config_file import DEFAULT_REDIS_URL, config_file_values
from hoster_tasks.errors import ConfigError, HosterTasksError
from hoster_tasks.redis_conn import check_url, client_from_url

LIST_TASK = "hoster.snapshot.list"  # requests.ListRequest.task_name (a unit test keeps them equal)
RESULT_KEY_PREFIX = "celery-task-meta-"  # Celery's Redis result backend: the key, and the channel it publishes on
READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
LIST_TIMEOUT = 60.0  # seconds a listing may wait for a free worker process


class TaskFailed(HosterTasksError):
    """The task failed on the worker; the message is the worker's error text, as the Celery path shows it."""


@dataclass(frozen=True)
class LightSettings:
    """The one setting this path needs, resolved as `settings.Settings` resolves it (environment, then the
    HOSTER_CONFIG file, then the default) without loading pydantic."""

    redis_url: str

    @classmethod
    def from_env(cls) -> LightSettings:
        env = os.environ.get("HOSTER_REDIS_URL")
        url = env if env is not None else config_file_values().get("redis_url", DEFAULT_REDIS_URL)
        try:
            return cls(check_url(str(url)))
        except ValueError as exc:
            raise ConfigError(f"invalid settings: redis_url: {exc}") from None


def task_message(name: str, args: list[Any], kwargs: dict[str, Any], queue: str, task_id: str) -> dict[str, Any]:
    """The envelope kombu's Redis transport pushes for Celery's `send_task(name, args, kwargs, queue=queue)`."""
    body = [args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
            "parent_id": None, "argsrepr": repr(args), "kwargsrepr": repr(kwargs),
            "origin": f"light{os.getpid()}@{socket.gethostname()}", "ignore_result": None,
            "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        },
        "properties": {
            "correlation_id": task_id, "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0, "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }  # fmt: skip


class LightClient:
    def __init__(self, settings: LightSettings) -> None:
        self.settings = settings
        self.redis = client_from_url(settings.redis_url, socket_connect_timeout=5)

    def send(self, name: str, args: list[Any], queue: str) -> str:
        task_id = str(uuid.uuid4())
        # the default exchange routes by queue name: the message goes straight onto the queue's list, where
        # the node's worker pops it (kombu's priority 0 is the list named after the queue)
        self.redis.lpush(queue, json.dumps(task_message(name, args, {}, queue, task_id)))
        return task_id

    def result(self, task_id: str, timeout: float) -> Any:
        """The task's return value once the worker stores it; TaskFailed with its error; TimeoutError."""
        key = RESULT_KEY_PREFIX + task_id
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(key)  # before the first read: a result stored in between is published, not missed
        try:
            deadline = time.monotonic() + timeout
            raw = self.redis.get(key)
            while raw is None or json.loads(raw).get("status") not in READY:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out waiting for the task (see `hoster-tasks status`)")
                message = pubsub.get_message(timeout=min(left, 1.0))
                raw = message["data"] if message else self.redis.get(key)  # get(): pub/sub may drop a message
            return _outcome(json.loads(raw))
        finally:
            pubsub.close()

    def list_snapshots(self, vm: str | None) -> list[dict[str, Any]]:
        from hoster_tasks.nodes import locate_vm, require_live

        if vm is not None:
            node, _ = locate_vm(self.redis, vm)  # validates the name first
            queues = [keys.node_queue(node.name)]
        else:
            queues = [n.queue for n in require_live(self.redis)]
        sent = [self.send(LIST_TASK, [vm] if vm is not None else [], q) for q in queues]
        return [row for task_id in sent for row in self.result(task_id, LIST_TIMEOUT)]

    def close(self) -> None:
        self.redis.close()


def _outcome(meta: dict[str, Any]) -> Any:
    """The result, or TaskFailed worded as the Celery path words it (cli/main.py describe_error): our own
    errors by their message alone, any other as `Type: message`."""
    if meta.get("status") == "SUCCESS":
        return meta.get("result")
    error = meta.get("result")
    if not isinstance(error, dict):
        raise TaskFailed(f"the task ended {meta.get('status')}: {error}")
    words = error.get("exc_message")
    text = words[0] if isinstance(words, list) and words and isinstance(words[0], str) else str(words)
    if not str(error.get("exc_module", "")).startswith("hoster_tasks"):
        text = f"{error.get('exc_type', 'Error')}: {text}"
    raise TaskFailed(text)
