"""The CLI's light path (hoster_tasks/light_client.py), against Celery itself on a private redis-server: the
message it pushes is the one Celery's `send_task` pushes for the same call (so a Celery upgrade that changes
the envelope fails here), the result arrives by notification, a failure is the worker's text, and the CLI
process it serves loads neither Celery nor pydantic. A real worker answering it: tests/integration
(every `snapshot list` there goes this way)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from hoster_tasks.errors import ConfigError, InvalidRequest, UnknownVM
from hoster_tasks.light_client import LIST_TASK, LightClient, LightSettings, TaskFailed
from hoster_tasks.requests import ListRequest

QUEUE = "hoster.node.n1"
VOLATILE_HEADERS = ("id", "root_id", "origin")
VOLATILE_PROPERTIES = ("correlation_id", "reply_to", "delivery_tag")


@pytest.fixture
def app(private_redis: Any) -> Any:
    app = Celery("light-test", broker=private_redis.url, backend=private_redis.url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    result_accept_content=["json"], result_extended=True)  # fmt: skip
    yield app
    app.close()


@pytest.fixture
def light(private_redis: Any) -> Any:
    client = LightClient(LightSettings(private_redis.url))
    yield client
    client.close()


def _pop(light: LightClient) -> dict[str, Any]:
    raw = light.redis.rpop(QUEUE)
    assert raw is not None, "nothing on the queue"
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    for name in VOLATILE_HEADERS:
        message["headers"].pop(name)
    for name in VOLATILE_PROPERTIES:
        message["properties"].pop(name)
    return dict(message)


def test_the_message_is_the_one_celery_sends(app: Any, light: LightClient) -> None:
    app.send_task(LIST_TASK, args=["vm1"], kwargs={}, queue=QUEUE)
    celerys = _pop(light)
    light.send(LIST_TASK, ["vm1"], QUEUE)
    assert _pop(light) == celerys


def test_the_task_name_is_the_request_models() -> None:
    assert ListRequest.task_name == LIST_TASK


def test_the_result_arrives_by_notification(app: Any, light: LightClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stored after the client began waiting, it comes by pub/sub: here every read of the key after the first
    answers nothing, so only the notification can deliver it."""
    task_id = str(uuid.uuid4())
    reads: list[str] = []
    real_get = light.redis.get
    monkeypatch.setattr(light.redis, "get", lambda key: None if reads.append(key) or len(reads) > 1 else real_get(key))
    threading.Timer(0.3, app.backend.store_result, (task_id, [{"vm": "vm1"}], "SUCCESS")).start()
    assert light.result(task_id, timeout=10) == [{"vm": "vm1"}]


@pytest.mark.parametrize("error, text", [
    (UnknownVM("unknown VM 'x' on node n1"), "unknown VM 'x' on node n1"),
    (InvalidRequest("invalid request for hoster.snapshot.list: vm: bad", ["vm"]),
     "invalid request for hoster.snapshot.list: vm: bad"),
    (ValueError("boom"), "ValueError: boom"),
])
def test_a_failure_is_worded_as_the_celery_path_words_it(app: Any, light: LightClient, error: Exception,
                                                          text: str) -> None:
    task_id = str(uuid.uuid4())
    threading.Timer(0.2, app.backend.store_result, (task_id, error, "FAILURE")).start()
    with pytest.raises(TaskFailed) as info:
        light.result(task_id, timeout=30)
    assert str(info.value) == text


def test_no_result_in_time_is_a_timeout(light: LightClient) -> None:
    with pytest.raises(TimeoutError):
        light.result(str(uuid.uuid4()), timeout=0.5)


def test_settings_resolve_as_the_typed_settings_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hoster_tasks.settings import Settings

    monkeypatch.delenv("HOSTER_REDIS_URL", raising=False)
    monkeypatch.delenv("HOSTER_CONFIG", raising=False)
    assert LightSettings.from_env().redis_url == Settings.from_env().redis_url  # the default
    config = tmp_path / "hoster-tasks.toml"
    config.write_text('redis_url = "redis://10.0.0.5:6380/2"\n')
    monkeypatch.setenv("HOSTER_CONFIG", str(config))
    assert LightSettings.from_env().redis_url == Settings.from_env().redis_url == "redis://10.0.0.5:6380/2"
    monkeypatch.setenv("HOSTER_REDIS_URL", "redis://10.0.0.6:6379/0")  # the environment wins
    assert LightSettings.from_env().redis_url == Settings.from_env().redis_url == "redis://10.0.0.6:6379/0"
    monkeypatch.setenv("HOSTER_REDIS_URL", "sentinel://")
    with pytest.raises(ConfigError, match="redis_url"):
        LightSettings.from_env()


def test_the_light_cli_path_loads_neither_celery_nor_pydantic(private_redis: Any) -> None:
    script = (
        "import sys\n"
        "from hoster_tasks.cli.main import main\n"
        "code = main(['snapshot', 'list', 'vm1'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'pydantic', 'pydantic_settings'))\n"
        "print(code, heavy)\n"
    )
    env = {"HOSTER_REDIS_URL": private_redis.url, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60,
                         cwd=Path(__file__).parents[2])  # fmt: skip
    assert out.stdout.strip() == "1 []", out.stdout + out.stderr  # 1: no live node registered, said in one line
    assert "no live worker node" in out.stderr
