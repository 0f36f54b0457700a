"""The typed request models of the public tasks (hoster_tasks/requests.py) and the task boundary that uses them."""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hoster_tasks.errors import ConfigError, InvalidName, InvalidRequest
from hoster_tasks.requests import (
    KEEP_MAX,
    PUBLIC_REQUESTS,
    SPEED_LIMIT_MAX,
    ChainFailedRequest,
    ChangeParentRequest,
    CiresetRequest,
    DestroyRequest,
    FinishRequest,
    ListRequest,
    MoveRequest,
    ReplicateAllDoneRequest,
    ReplicateAllRequest,
    ReplicateRequest,
    ReplicationFanoutRequest,
    RetryFailedRequest,
    RollbackRequest,
    SnapshotFanoutRequest,
    StepRequest,
    TakeAllRequest,
    TakeRequest,
    TaskRequest,
)
from hoster_tasks.settings import Endpoint, Settings, get_settings

BOMB = "1; " + "x" * 1_000_000  # the reported speed_limit: multiplied by 1e6 into a string before failing


def _short(value: Any) -> str:
    """Test ids: never a megabyte long."""
    text = repr(value)
    return text if len(text) <= 30 else f"{text[:20]}...({len(text)})"


HOSTILE = ["a;rm -rf /", "$(touch /tmp/pwned)", "`id`", "a b", "a\nb", "a'b", 'a"b', "-rf", "a|b", "", "x" * 300]


def refused(model: type[TaskRequest], *args: Any, **kwargs: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        model.from_call(args, kwargs)
    return info.value


def assert_clear(exc: InvalidRequest, field: str) -> None:
    """One line, short, starting with the task's name, naming the field."""
    text = str(exc)
    assert "\n" not in text and len(text) < 1500, text[:2000]
    assert text.startswith("invalid request for hoster."), text
    assert field in text and field in exc.fields, (field, text)


# -- the reported cases -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, args",
    [
        (TakeRequest, ["vm1", "hourly", True]),
        (TakeAllRequest, ["hourly", True]),
        (SnapshotFanoutRequest, ["hourly", True]),
        (TakeAllRequest, ["hourly", False]),
        (TakeAllRequest, ["hourly", 1.0]),
        (TakeAllRequest, ["hourly", "3"]),
    ],
)
def test_keep_is_an_integer_not_a_bool_float_or_string(model: type[TaskRequest], args: list[Any]) -> None:
    assert_clear(refused(model, *args), "keep")


@pytest.mark.parametrize("keep", [0, -1, KEEP_MAX + 1, 10**30])
def test_keep_is_bounded(keep: int) -> None:
    exc = refused(TakeAllRequest, "hourly", keep)
    assert_clear(exc, "keep")
    if keep < 1:
        assert "at least 1" in str(exc)  # the CLI's and retention's own wording


@pytest.mark.parametrize("model", [ReplicateRequest, ReplicateAllRequest, ReplicationFanoutRequest])
@pytest.mark.parametrize("speed", [BOMB, "90", True, 0, -1, 0.0, -0.5, math.nan, math.inf, -math.inf,
                                   SPEED_LIMIT_MAX * 2, [90]], ids=_short)
def test_speed_limit_is_a_finite_positive_number(model: type[TaskRequest], speed: Any) -> None:
    exc = refused(model, **{**_valid(model), "speed_limit": speed})
    assert_clear(exc, "speed_limit")
    assert "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in str(exc)  # never echoed whole


@pytest.mark.parametrize("vms", ["vm1", ["vm1", "a;b"], ["$(id)"], [1], ["ok", None], [], {"vm1": 1},
                                 ["vm"] * 5000], ids=_short)
def test_vms_is_a_nonempty_list_of_valid_names(vms: Any) -> None:
    assert_clear(refused(ReplicateAllRequest, "backup1", vms=vms), "vms")


@pytest.mark.parametrize("only", ["pool/vm/a", ["pool/vm/a;b"], [1], ["-pool"]])
def test_only_is_a_list_of_datasets(only: Any) -> None:
    assert_clear(refused(TakeAllRequest, "hourly", 3, only=only), "only")


@pytest.mark.parametrize("name", [*HOSTILE, "../../etc/x", 7, ["a"]], ids=_short)
def test_script_name_is_a_node_name(name: Any) -> None:
    assert_clear(refused(ReplicateAllRequest, "backup1", script_name=name), "script_name")
    assert_clear(refused(ReplicationFanoutRequest, "backup1", script_name=name), "script_name")


@pytest.mark.parametrize("endpoint", [*HOSTILE, "-oProxyCommand=sh", "host/x", "e" * 300, None, 5, ["h"]], ids=_short)
def test_endpoint_is_a_plain_name_or_host(endpoint: Any) -> None:
    for model in (ReplicateRequest, ReplicateAllRequest, ReplicationFanoutRequest):
        assert_clear(refused(model, **{**_valid(model), "endpoint": endpoint}), "endpoint")


@pytest.mark.parametrize("vm", [*HOSTILE, "a/b", None, 3, True], ids=_short)
def test_vm_names_are_validated(vm: Any) -> None:
    assert_clear(refused(TakeRequest, vm), "vm")
    assert_clear(refused(ReplicateRequest, vm, "backup1"), "vm")
    if vm is not None:  # list(None) lists every VM
        assert_clear(refused(ListRequest, vm), "vm")


@pytest.mark.parametrize("snapshot", ["no-at-sign", "p/d@a@b", "p/d@x;rm -rf /", "p/d@" + "x" * 10**6, 3], ids=_short)
def test_snapshot_is_dataset_at_name(snapshot: Any) -> None:
    assert_clear(refused(DestroyRequest, snapshot), "snapshot")


@pytest.mark.parametrize("first_try", [True, "now", math.nan, math.inf, -1.0, 0, time.time() + 86400])
def test_first_try_is_a_past_timestamp(first_try: Any) -> None:
    # a future first_try would make the busy wait retry forever
    assert_clear(refused(TakeRequest, "vm1", first_try=first_try), "first_try")
    assert_clear(refused(DestroyRequest, "p/d@s", first_try=first_try), "first_try")


# -- binding and the message --------------------------------------------------------------------------------


def test_positional_and_keyword_arguments_bind_like_a_call() -> None:
    assert TakeRequest.from_call(["vm1", "daily", 5]) == TakeRequest(vm="vm1", stype="daily", keep=5)
    assert TakeRequest.from_call(["vm1"], {"keep": 5}).keep == 5
    assert TakeRequest.from_call([], {"vm": "vm1"}) == TakeRequest(vm="vm1", stype="custom")
    assert ReplicateRequest.from_call(["vm1", "backup1", 90]).speed_limit == 90.0  # an int is a number
    assert ReplicateAllRequest.from_call(["backup1"], {"vms": ["a", "b"], "script_name": "to_b"}).vms == ["a", "b"]


def test_extra_positional_unknown_keyword_and_duplicate_are_each_reported() -> None:
    text = str(refused(TakeRequest, "vm1", "custom", 3, 1.0, "extra", vm="again", force=True))
    assert "1 extra positional argument" in text
    assert "vm: given both by position and by keyword" in text
    assert "force: unknown argument" in text


def test_every_problem_is_listed_on_one_line() -> None:
    exc = refused(ReplicateAllRequest, "-bad", vms="vm1", speed_limit=True, script_name="a b")
    assert set(exc.fields) == {"endpoint", "vms", "speed_limit", "script_name"}
    assert str(exc).count(";") >= 3 and "\n" not in str(exc)


def test_required_arguments_are_named() -> None:
    assert_clear(refused(TakeAllRequest), "stype")
    assert "keep: required" in str(refused(TakeAllRequest, "hourly"))


def test_hostile_keys_and_huge_values_are_shortened() -> None:
    exc = refused(TakeRequest, "vm1", **{"k\n" * 10_000: "v" * 10**6, "x": list(range(10**5))})
    assert "\n" not in str(exc) and len(str(exc)) < 1500
    assert "(20000 characters)" in str(exc) and "(100000 items)" in str(exc)


def test_many_problems_are_counted_not_listed() -> None:
    exc = refused(TakeRequest, "vm1", **{f"k{i}": i for i in range(100)})
    assert "and 90 more" in str(exc) and len(str(exc)) < 1500


def test_arguments_that_are_not_a_list_or_an_object() -> None:
    with pytest.raises(InvalidRequest, match="positional arguments must be a list"):
        TakeRequest.from_call("vm1")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="keyword arguments must be an object"):
        TakeRequest.from_call([], ["vm1"])  # type: ignore[arg-type]


def test_the_error_survives_celerys_json_result_round_trip() -> None:
    from celery import Celery

    backend = Celery("t", backend="cache+memory://", set_as_current=False).backend
    exc = refused(ReplicateRequest, "vm1", "backup1", BOMB)
    stored = json.loads(json.dumps(backend.prepare_exception(exc, "json")))
    back = backend.exception_to_python(stored)
    assert type(back) is InvalidRequest and str(back) == str(exc) and back.fields == ["speed_limit"]


def test_still_caught_as_the_errors_callers_caught_before() -> None:
    exc = refused(TakeRequest, "a;b")
    assert isinstance(exc, InvalidName) and isinstance(exc, ConfigError) and isinstance(exc, ValueError)


# -- valid requests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["backup1", "10.0.0.2", "fd00::2", "fe80::1%eth0", "[fd00::2]",
                                      "root@backup.example.org", "b-1.example_x"])
def test_endpoint_forms_accepted(endpoint: str) -> None:
    assert ReplicateRequest.of(vm="vm1", endpoint=endpoint).endpoint == endpoint


def test_valid_requests_of_every_task() -> None:
    for model in PUBLIC_REQUESTS.values():
        assert model.from_call((), _valid(model)) is not None
    assert TakeAllRequest.of(stype="hourly", keep=KEEP_MAX, only=[], first_try=time.time()).only == []
    assert ReplicateRequest.of(vm="web:01.prod_x-y", endpoint="b", speed_limit=0.001).speed_limit == 0.001


def test_models_are_frozen() -> None:
    req = TakeRequest.of(vm="vm1")
    with pytest.raises(ValueError):
        req.keep = 3  # type: ignore[misc]


# -- the worker-side check against settings -----------------------------------------------------------------


def test_the_endpoint_must_be_one_of_this_workers_targets(clean_env: None) -> None:
    s = Settings.from_env(targets=[Endpoint(name="backup1", host="fd00::9")])
    ReplicateRequest.of(vm="vm1", endpoint="backup1").check_settings(s)
    ReplicateAllRequest.of(endpoint="fd00::9").check_settings(s)  # by host too
    ReplicationFanoutRequest.of(endpoint="elsewhere").check_settings(s)  # checked against live nodes instead
    for model in (ReplicateRequest, ReplicateAllRequest):
        with pytest.raises(InvalidRequest) as info:
            model.from_call((), {**_valid(model), "endpoint": "elsewhere"}).check_settings(s)
        assert_clear(info.value, "endpoint")
        assert "unknown endpoint 'elsewhere' (known: backup1)" in str(info.value)
    # vm move names its target `to`: the error names that field (found by the boundary test's hypothesis)
    with pytest.raises(InvalidRequest) as info:
        MoveRequest.of(vm="vm1", to="elsewhere").check_settings(s)
    assert_clear(info.value, "to")


# -- the models match the tasks -----------------------------------------------------------------------------


def _registered_tasks() -> dict[str, Any]:
    import hoster_tasks.tasks.chain  # noqa: F401 - registers the tasks
    import hoster_tasks.tasks.replicate_all  # noqa: F401
    import hoster_tasks.tasks.restore  # noqa: F401
    import hoster_tasks.tasks.snapshot  # noqa: F401
    from hoster_tasks.celery_app import app

    return {name: task for name, task in app.tasks.items() if name.startswith("hoster.")}


def test_every_public_task_declares_its_model() -> None:
    tasks = _registered_tasks()
    for name, model in PUBLIC_REQUESTS.items():
        assert tasks[name].request_model is model, name


def test_each_model_has_its_tasks_parameters_in_order_with_the_same_defaults() -> None:
    for name, task in _registered_tasks().items():
        model = getattr(task, "request_model", None)
        if model is None:
            continue  # not modelled (yet)
        assert model.task_name == name
        params = [p for p in inspect.signature(task.run).parameters.values()]
        assert tuple(p.name for p in params) == task.parameter_names == tuple(model.model_fields), name
        for p in params:
            field = model.model_fields[p.name]
            assert field.is_required() == (p.default is inspect.Parameter.empty), (name, p.name)
            if not field.is_required():
                assert field.default == p.default, (name, p.name)


# -- the boundary: a task's body never runs for an invalid request -------------------------------------------


@pytest.fixture
def boundary_task(clean_env: None) -> Iterator[tuple[Any, list[tuple[Any, ...]]]]:
    """A PublicTask with TakeRequest on a private app whose body only records its calls."""
    from celery import Celery

    from hoster_tasks.tasks.base import PublicTask

    get_settings.cache_clear()
    app = Celery("boundary", set_as_current=False)
    app.conf.task_always_eager = True
    calls: list[tuple[Any, ...]] = []

    @app.task(name=TakeRequest.task_name, base=PublicTask, bind=True, request_model=TakeRequest)
    def take(self: Any, vm: str, stype: str = "custom", keep: int | None = None,
             first_try: float | None = None) -> str:
        calls.append((vm, stype, keep, first_try))
        return "ran"

    yield take, calls
    get_settings.cache_clear()


def test_the_body_runs_only_for_a_valid_request(boundary_task: tuple[Any, list[tuple[Any, ...]]]) -> None:
    take, calls = boundary_task
    with pytest.raises(InvalidRequest, match="keep"):
        take("vm1", "custom", True)
    res = take.apply(args=["vm1"], kwargs={"keep": True})
    assert res.state == "FAILURE" and isinstance(res.result, InvalidRequest)
    assert calls == []
    assert take.apply(args=["vm1", "daily", 2]).get() == "ran"
    assert calls == [("vm1", "daily", 2, None)]


# -- the client and the CLI refuse with the same message before anything is queued ---------------------------


class _NoBroker:
    """Stands in for the Celery app: a send is a test failure."""

    def send_task(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"queued: {args} {kwargs}")


@pytest.fixture
def client(clean_env: None) -> Any:
    from hoster_tasks.client import Client

    return Client(Settings.from_env(redis_url="redis://127.0.0.1:1/0"), app=_NoBroker())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call, model, args, kwargs",
    [
        ("snapshot", TakeRequest, ["vm1", "custom", True], {}),
        ("snapshot", TakeRequest, ["a;rm -rf /"], {}),
        ("snapshot_all", TakeAllRequest, ["hourly", 0], {}),
        ("replicate", ReplicateRequest, ["vm1", "backup1", BOMB], {}),
        ("replicate", ReplicateRequest, ["vm1", "-oProxyCommand=sh"], {}),
        ("replicate_all", ReplicateAllRequest, ["backup1"], {"vms": "vm1"}),
        ("replicate_all", ReplicateAllRequest, ["backup1"], {"vms": []}),
        ("replicate_all", ReplicateAllRequest, ["backup1"], {"script_name": "$(id)"}),
        ("destroy", DestroyRequest, ["p/d@x;rm"], {}),
    ],
)
def test_the_client_refuses_with_the_workers_message(
    client: Any, call: str, model: type[TaskRequest], args: list[Any], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRequest) as info:
        getattr(client, call)(*args, **kwargs)
    assert str(info.value) == str(refused(model, *args, **kwargs))


def test_the_cli_refuses_before_queueing(clean_env: None, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from hoster_tasks.cli.main import main

    _registered_tasks()  # the Celery app exists already: not built from this test's broker URL
    monkeypatch.setenv("HOSTER_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens: a send would fail
    get_settings.cache_clear()
    try:
        code = main(["vm", "replicate-all", "--endpoint", "backup1", "--script-name", "a;b"])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("hoster-tasks: error: invalid request for hoster.replication")
        assert "script_name" in err and err.count("\n") == 1
        assert main(["vm", "replicate-all", "--endpoint", "backup1", "--filter", ","]) == 1
        assert "vms" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    "argv, text",
    [
        (["snapshot", "all", "--stype", "hourly", "--keep", str(KEEP_MAX + 1)], "at most"),
        (["snapshot", "new", "vm1", "--keep", "0"], "at least 1"),
        (["vm", "replicate", "vm1", "--endpoint", "b", "--speed-limit", "0"], "positive"),
        (["vm", "replicate", "vm1", "--endpoint", "b", "--speed-limit", "nan"], "positive"),
        (["vm", "replicate", "vm1", "--endpoint", "b", "--speed-limit", "-1"], "positive"),
        (["vm", "replicate-all", "--endpoint", "b", "--speed-limit", "inf"], "positive"),
        (["vm", "replicate-all", "--endpoint", "b", "--speed-limit", "1; rm"], "not a number"),
    ],
)
def test_cli_numbers_are_usage_errors_with_the_models_wording(
    argv: list[str], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from hoster_tasks.cli.main import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2 and text in capsys.readouterr().err


# -- properties over arbitrary JSON arguments ---------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, database=None)
@given(model=st.sampled_from(list(PUBLIC_REQUESTS.values())), args=st.lists(_json, max_size=5),
       kwargs=st.dictionaries(st.sampled_from(["vm", "stype", "keep", "only", "first_try", "snapshot", "endpoint",
                                               "vms", "speed_limit", "script_name", "force"]), _json, max_size=4))
def test_any_json_call_is_a_valid_request_or_one_clear_error(
    model: type[TaskRequest], args: list[Any], kwargs: dict[str, Any]
) -> None:
    try:
        req = model.from_call(args, kwargs)
    except InvalidRequest as exc:
        text = str(exc)
        assert "\n" not in text and len(text) < 1500 and text.startswith(f"invalid request for {model.task_name}: ")
        return
    values = req.model_dump()
    for key in ("keep",):
        if values.get(key) is not None:
            assert type(values[key]) is int and 1 <= values[key] <= KEEP_MAX
    if values.get("speed_limit") is not None:
        assert type(values["speed_limit"]) is float and 0 < values["speed_limit"] <= SPEED_LIMIT_MAX
    for key in ("vm", "stype", "snapshot", "endpoint", "script_name"):
        value = values.get(key)
        assert value is None or (type(value) is str and value and value[0] != "-" and not set(value) & set(" ;$`'\"\n"))


def _valid(model: type[TaskRequest]) -> dict[str, Any]:
    """Keyword arguments that make a valid request of `model`."""
    valid: dict[type[TaskRequest], dict[str, Any]] = {
        TakeRequest: {"vm": "vm1"},
        TakeAllRequest: {"stype": "hourly", "keep": 3},
        ListRequest: {},
        DestroyRequest: {"snapshot": "pool/vm/vm1@hourly_2024-01-01_00-33-00"},
        SnapshotFanoutRequest: {"stype": "daily", "keep": 5},
        ReplicateRequest: {"vm": "vm1", "endpoint": "backup1"},
        ReplicateAllRequest: {"endpoint": "backup1"},
        ReplicationFanoutRequest: {"endpoint": "backup1", "speed_limit": 90, "script_name": "to_backup1"},
        StepRequest: {"prev": None, "dataset": "pool/vm/vm1", "endpoint": "backup1", "speed_limit": None,
                      "chain": "0f3c"},
        FinishRequest: {"acc": {"sent": ["hourly_2024-01-01_00-33-00"], "bytes": 10, "seconds": 0.5,
                                "handoff": {"source": "0f3c:handoff:ab", "target": "0f3c:handoff:cd"}},
                        "dataset": "pool/vm/vm1", "endpoint": "backup1", "chain": "0f3c"},
        ChainFailedRequest: {"task_id": "8d4e-11", "dataset": "pool/vm/vm1", "endpoint": "backup1"},
        ReplicateAllDoneRequest: {"parts": [None, None], "endpoint": "backup1",
                                  "job": {"id": "8d4e-11", "vms": ["vm1"], "script_name": "nightly"},
                                  "datasets": ["pool/vm/vm1", "pool/vm/vm2"], "work": ["pool/vm/vm1"],
                                  "skipped": ["pool/vm/old (backup copy of n2)"]},
        ChangeParentRequest: {"vm": "vm1", "start": True, "cireset": True},
        CiresetRequest: {"vm": "vm1"},
        MoveRequest: {"vm": "vm1", "to": "backup1"},
        RollbackRequest: {"vm": "vm1", "snapshot": "hourly_2024-01-01_00-33-00", "force_stop": True,
                          "expect_destroyed": ["hourly_2024-01-01_01-33-00"]},
        RetryFailedRequest: {"endpoint": "backup1", "vm": "vm1"},
    }
    return valid[model]
