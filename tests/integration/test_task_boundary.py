"""Every public task refuses invalid arguments at the task boundary, sent the way Flower's API sends them.

One real worker on node `tb1` (zfs-fuse, Redis) whose `zfs_command` is a recording wrapper: it appends each
argv to a file, then runs the real zfs. Hypothesis sends invalid arguments to every public task by name
(wrong types, hostile and huge strings, non-positive or non-finite numbers, unknown keywords, extra
positional arguments); each must fail with one clear `InvalidRequest` naming the bad argument, run no zfs
command at all, and leave the worker answering valid tasks.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import Pool, PoolFactory, RedisServer, Worker, WorkerFactory, ZfsFuse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenario import VMS_ROOT, make_vms, node_env, snapshot_names

from hoster_tasks import keys
from hoster_tasks.errors import InvalidRequest
from hoster_tasks.requests import KEEP_MAX, PUBLIC_REQUESTS, SPEED_LIMIT_MAX

NODE = "tb1"
ENDPOINT = "backup1"  # configured, never contacted: no valid replication is ever sent here
HOURLY = ["hourly_2024-01-01_00-33-00", "hourly_2024-01-01_01-33-00", "hourly_2024-01-01_02-33-00"]
EXAMPLES = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class BoundaryNode:
    worker: Worker
    pool: Pool
    zfs_log: Path
    vm1: str

    @property
    def queue(self) -> str:
        return keys.node_queue(NODE)

    def zfs_count(self) -> int:
        return len(self.zfs_log.read_text().splitlines()) if self.zfs_log.exists() else 0


def _recorder(path: Path, log: Path) -> Path:
    """A zfs that appends its argv to `log` (one line per command), then runs the real one."""
    real = shutil.which("zfs")
    assert real, "zfs not on PATH"
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{log}'\nexec '{real}' \"$@\"\n")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def node(zfs_fuse: ZfsFuse, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[BoundaryNode]:
    """One worker for the whole module (starting one per test would cost more than the tests)."""
    tmp = tmp_path_factory.mktemp("boundary")
    pools = PoolFactory(tmp / "pools", zfs_fuse.mount_root)
    workers = WorkerFactory(redis_server.url, tmp / "workers")
    try:
        pool = pools()
        vm1, _ = make_vms(pool, "vm1", "vm2")
        from harness import zfs as hz

        for short in HOURLY:  # what `keep: true` (taken as 1) would prune
            hz.snapshot(vm1, short)
        redis_server.client().flushall()
        log = tmp / "zfs-commands.log"
        env = node_env(
            pool,
            HOSTER_ZFS_COMMAND=str(_recorder(tmp / "zfs-recorder", log)),
            HOSTER_HEARTBEAT_SECONDS=3600,  # its first beat runs at start, then no zfs until the module ends
            HOSTER_TARGETS=[{"name": ENDPOINT, "host": "192.0.2.10", "connect_timeout": 1}],
            HOSTER_RETRY_MAX=0,
        )
        worker = workers(NODE, env, args=["-c", "1"])
        yield BoundaryNode(worker, pool, log, vm1)
    finally:
        workers.cleanup()
        pools.cleanup()


def _settled(node: BoundaryNode) -> int:
    """The command count once the worker is idle (the start-up beat, or a valid task, may still be running)."""
    count = node.zfs_count()
    while True:
        time.sleep(0.3)
        if node.zfs_count() == count:
            return count
        count = node.zfs_count()


def send_invalid(app: Any, node: BoundaryNode, name: str, args: list[Any], kwargs: dict[str, Any],
                 expect: str) -> InvalidRequest:
    """Send by name as Flower's API does; the task must fail with InvalidRequest naming `expect`, run no zfs."""
    before = node.zfs_count()
    res = app.send_task(name, args=args, kwargs=kwargs, queue=node.queue)
    res.get(timeout=30, propagate=False)
    exc = res.result
    shown = f"{name} args={str(args)[:200]} kwargs={str(kwargs)[:200]}: {res.state} {str(exc)[:300]}"
    assert res.state == "FAILURE" and isinstance(exc, InvalidRequest), shown
    text = str(exc)
    assert "\n" not in text and len(text) < 1500 and text.startswith(f"invalid request for {name}: "), shown
    assert expect in exc.fields or expect in text, (expect, shown)
    assert node.zfs_count() == before, f"zfs ran for {shown}: {node.zfs_log.read_text().splitlines()[before:]}"
    return exc


@pytest.fixture
def idle(node: BoundaryNode) -> Iterator[BoundaryNode]:
    """The node, idle before the test; after it, the worker still runs and answers a valid task."""
    _settled(node)
    yield node
    assert node.worker.running, node.worker.log_tail()


def assert_answers(app: Any, node: BoundaryNode) -> None:
    rows = app.send_task("hoster.snapshot.list", args=["vm1"], queue=node.queue).get(timeout=60)
    assert {r["snapshot"] for r in rows} >= {f"{node.vm1}@{s}" for s in HOURLY}
    assert node.worker.running


# -- strategies: invalid values per kind of argument ---------------------------------------------------------

_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_bits = st.sampled_from(["'", '"', "$(id)", "$(touch /tmp/pwned)", "`id`", ";", "; rm -rf /", "\n", " ", "|", "&&",
                         ">", "*", "\\", "\t", "\x00"])
hostile = st.builds(lambda a, bit, b: a + bit + b, _word | st.just(""), _bits, _word | st.just(""))
dashed = _word.map(lambda w: "-" + w)  # would be read as an option
huge = st.sampled_from([300, 70_000, 1_000_000]).map(lambda n: "x" * n)
_not_str = (st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.lists(_word, max_size=3)
            | st.dictionaries(_word, st.integers(), max_size=2))
bad_name = hostile | dashed | huge | _not_str | st.just("")  # for an optional name (None is valid there)
bad_required_name = bad_name | st.none()
bad_stype = bad_required_name | st.sampled_from(["minutely", "Hourly", "snapshot"])

_numeric_strings = st.integers(1, 100).map(str) | st.just("1; " + "9" * 200_000) | st.just("1e3")
bad_keep = (st.booleans() | st.integers(max_value=0) | st.integers(KEEP_MAX + 1, 10**30) | st.floats()
            | _numeric_strings | st.lists(st.integers(1, 5), max_size=2))
bad_required_keep = bad_keep | st.none()
bad_speed = (st.booleans() | st.floats(max_value=0) | st.sampled_from([math.nan, math.inf, -math.inf])
             | st.integers(max_value=0) | st.floats(min_value=SPEED_LIMIT_MAX * 1.01, allow_infinity=False)
             | _numeric_strings | st.just("1; " + "x" * 1_000_000) | st.lists(st.integers(1, 90), max_size=2))
bad_first_try = (st.booleans() | st.text(max_size=10) | st.sampled_from([math.nan, math.inf, -math.inf, 0, -1.0])
                 | st.floats(time.time() + 86_400, 1e15))
_valid_vm = st.sampled_from(["vm1", "vm2", "web-01"])
bad_vms: st.SearchStrategy[Any] = (st.text(max_size=20) | st.just("vm1") | st.just([]) | st.integers() | st.booleans()
           | st.dictionaries(_word, _word, max_size=2)
           | st.tuples(st.lists(_valid_vm, max_size=3), bad_required_name).map(lambda t: [*t[0], t[1]]))
bad_only = (st.just("pool/vm/vm1") | st.integers() | st.booleans()
            | st.tuples(st.lists(st.just("pool/vm/vm1"), max_size=2), bad_required_name).map(lambda t: [*t[0], t[1]]))
bad_snapshot = (bad_required_name | _word | st.builds(lambda a, b: f"pool/vm/vm1@{a}@{b}", _word, _word)
                | hostile.map(lambda h: f"pool/vm/vm1@{h}") | hostile.map(lambda h: f"pool/{h}@s"))
# an endpoint of the right form that is not one of the node's targets: refused on the worker, before anything
unconfigured = st.sampled_from(["elsewhere", "10.9.9.9", "fd00::99", "root@other.example.org"])
bad_token = hostile | dashed.map(lambda w: w + " x") | huge | _not_str | st.just("")  # chain ids, task ids
_progress_fields = st.sampled_from(["bytes", "seconds", "sent", "complete", "action", "handoff", "dataset"])
bad_progress = (st.text(max_size=10) | st.integers() | st.lists(_word, max_size=2)
                | st.builds(lambda k, v: {k: v}, _progress_fields, bad_name | st.integers(max_value=-1))
                | st.builds(lambda k: {k: 1}, _word.filter(lambda w: w not in ("bytes", "seconds")))
                | bad_token.map(lambda t: {"handoff": {"source": t}}))
bad_slot = (st.booleans() | st.text(max_size=10) | st.floats() | st.integers(max_value=946_684_799)
            | st.integers(946_684_800, 4_102_444_800).filter(lambda n: n % 60 != 0))
bad_diverged = bad_name | st.sampled_from(["Discard", "rollback", "force"])
bad_job = (st.text(max_size=10) | st.integers() | st.lists(_word, max_size=2) | bad_token.map(lambda t: {"id": t})
           | st.builds(lambda v: {"id": "j1", "vms": v}, bad_vms) | st.just({"id": "j1", "script_name": "a;b"})
           | st.builds(lambda k: {"id": "j1", k: 1}, _word.filter(lambda w: w not in ("id", "fanout"))))
bad_flag = st.integers() | st.text(max_size=5) | st.none() | st.lists(st.booleans(), max_size=2)  # not a bool
_json = st.none() | st.booleans() | st.integers(-100, 100) | st.text(max_size=10) | st.lists(st.integers(), max_size=2)


@dataclass
class Spec:
    """A public task: its parameters in order, valid values for all of them, and invalid ones per parameter."""

    name: str
    valid: dict[str, Any]
    bad: dict[str, st.SearchStrategy[Any]]
    params: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.params = list(self.valid)


SPECS = {
    "take": Spec("hoster.snapshot.take", {"vm": "vm1", "stype": "hourly", "keep": None, "first_try": None},
                 {"vm": bad_required_name, "stype": bad_stype, "keep": bad_keep, "first_try": bad_first_try}),
    "take_all": Spec("hoster.snapshot.take_all",
                     {"stype": "hourly", "keep": 3, "only": None, "first_try": None, "slot": None},
                     {"stype": bad_stype, "keep": bad_required_keep, "only": bad_only, "first_try": bad_first_try,
                      "slot": bad_slot}),
    "list": Spec("hoster.snapshot.list", {"vm": None}, {"vm": bad_name}),
    "destroy": Spec("hoster.snapshot.destroy", {"snapshot": "pool/vm/vm1@hourly_2024-01-01_00-33-00",
                                                "first_try": None},
                    {"snapshot": bad_snapshot, "first_try": bad_first_try}),
    "snapshot_fanout": Spec("hoster.snapshot.fanout", {"stype": "hourly", "keep": 3, "slot": None},
                            {"stype": bad_stype, "keep": bad_required_keep, "slot": bad_slot}),
    "rollback": Spec("hoster.snapshot.rollback",
                     {"vm": "vm1", "snapshot": HOURLY[0], "force_stop": False, "force_start": False,
                      "destroy_base": False, "keep_newer": False, "dry_run": True, "expect_destroyed": None,
                      "first_try": None},
                     {"vm": bad_required_name, "snapshot": bad_required_name | hostile.map(lambda h: f"vm1@{h}"),
                      "force_stop": bad_flag, "force_start": bad_flag, "destroy_base": bad_flag,
                      "keep_newer": bad_flag, "dry_run": bad_flag, "expect_destroyed": bad_only,
                      "first_try": bad_first_try}),
    "replicate": Spec("hoster.replication.replicate",
                      {"vm": "vm1", "endpoint": ENDPOINT, "speed_limit": None, "diverged": None},
                      {"vm": bad_required_name, "endpoint": bad_required_name | unconfigured,
                       "speed_limit": bad_speed, "diverged": bad_diverged}),
    "replicate_all": Spec("hoster.replication.replicate_all",
                          {"endpoint": ENDPOINT, "vms": None, "speed_limit": None, "script_name": None},
                          {"endpoint": bad_required_name | unconfigured, "vms": bad_vms, "speed_limit": bad_speed,
                           "script_name": bad_name}),
    # the links of a replicate chain: sent by `replicate`, but any client of the broker can send them too
    "step": Spec("hoster.replication.step",
                 {"prev": None, "dataset": "pool/vm/vm1", "endpoint": ENDPOINT, "speed_limit": None, "chain": "c1",
                  "report_to": None, "diverged": None, "job": None},
                 {"prev": bad_progress, "dataset": bad_required_name, "endpoint": bad_required_name | unconfigured,
                  "speed_limit": bad_speed, "chain": bad_token | st.none(), "report_to": bad_token,
                  "diverged": bad_diverged, "job": bad_job}),
    "finish": Spec("hoster.replication.finish",
                   {"acc": {"sent": [], "bytes": 0, "seconds": 0.0}, "dataset": "pool/vm/vm1", "endpoint": ENDPOINT,
                    "chain": "c1", "report_to": None, "job": None},
                   {"acc": bad_progress | st.none(), "dataset": bad_required_name,
                    "endpoint": bad_required_name | unconfigured, "chain": bad_token | st.none(),
                    "report_to": bad_token, "job": bad_job}),
    # the chord callback of a replicate-all job
    "replicate_all_done": Spec("hoster.replication.replicate_all_done",
                               {"parts": [None], "endpoint": ENDPOINT, "job": {"id": "j1"},
                                "datasets": ["pool/vm/vm1"], "work": ["pool/vm/vm1"], "skipped": None,
                                "superseded": None},
                               {"parts": st.integers() | st.lists(st.integers(), min_size=1, max_size=2),
                                "endpoint": bad_required_name | unconfigured, "job": bad_job | st.none(),
                                "datasets": bad_only | st.none(), "work": bad_only | st.none(),
                                "skipped": st.integers() | st.just(["x" * 70_000]),
                                "superseded": st.integers() | st.booleans()}),
    "chain_failed": Spec("hoster.replication.chain_failed",
                         {"task_id": "t1", "dataset": "pool/vm/vm1", "endpoint": ENDPOINT},
                         {"task_id": bad_token | st.none(), "dataset": bad_required_name,
                          "endpoint": bad_required_name}),
    "retry_failed": Spec("hoster.replication.retry_failed", {"endpoint": None, "vm": None},
                         {"endpoint": bad_name, "vm": bad_name}),
    "change_parent": Spec("hoster.vm.change_parent", {"vm": "vm1", "start": False, "cireset": False},
                          {"vm": bad_required_name, "start": bad_flag, "cireset": bad_flag}),
    "move": Spec("hoster.vm.move", {"vm": "vm1", "to": ENDPOINT, "start": True},
                 {"vm": bad_required_name, "to": bad_required_name | unconfigured, "start": bad_flag}),
    "cireset": Spec("hoster.vm.cireset", {"vm": "vm1"}, {"vm": bad_required_name}),
    "replication_fanout": Spec("hoster.replication.fanout",
                               {"endpoint": ENDPOINT, "speed_limit": None, "script_name": None},
                               {"endpoint": bad_required_name, "speed_limit": bad_speed, "script_name": bad_name}),
}


@st.composite
def invalid_call(draw: st.DrawFn, spec: Spec) -> tuple[list[Any], dict[str, Any], str]:
    """(args, kwargs, the field the error must name): one thing wrong, the rest valid, split at random
    between positional and keyword arguments."""
    values = dict(spec.valid)
    kind = draw(st.sampled_from(["field", "field", "field", "unknown", "positional"]))
    if kind == "positional":
        extra = draw(st.lists(_json, min_size=1, max_size=3))
        return [values[p] for p in spec.params] + extra, {}, "positional"
    expect = draw(st.sampled_from(list(spec.bad)))
    values[expect] = draw(spec.bad[expect])
    cut = draw(st.integers(0, len(spec.params)))
    args = [values[p] for p in spec.params[:cut]]
    kwargs = {p: values[p] for p in spec.params[cut:]}
    if kind == "unknown":
        values[expect] = spec.valid[expect]
        args = [values[p] for p in spec.params[:cut]]
        kwargs = {p: values[p] for p in spec.params[cut:]}
        expect = draw(st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True).filter(lambda k: k not in spec.valid))
        kwargs[expect] = draw(_json)
    return args, kwargs, expect


def test_every_public_task_is_covered_with_all_its_parameters() -> None:
    """A parameter the specs do not know would take the "extra positional" examples as valid values."""
    assert {spec.name for spec in SPECS.values()} == set(PUBLIC_REQUESTS)
    for spec in SPECS.values():
        assert spec.params == list(PUBLIC_REQUESTS[spec.name].model_fields), spec.name


@pytest.mark.parametrize("task", list(SPECS))
def test_invalid_arguments_fail_at_the_boundary_and_run_nothing(app: Any, idle: BoundaryNode, task: str) -> None:
    spec = SPECS[task]

    @EXAMPLES
    @given(call=invalid_call(spec))
    def each(call: tuple[list[Any], dict[str, Any], str]) -> None:
        args, kwargs, expect = call
        send_invalid(app, idle, spec.name, args, kwargs, expect)

    each()
    assert_answers(app, idle)


REPORTED: list[tuple[str, list[Any], dict[str, Any], str]] = [
    ("hoster.snapshot.take", ["vm1", "hourly", True], {}, "keep"),  # was taken as 1: pruned to one snapshot
    ("hoster.snapshot.take_all", ["hourly"], {"keep": True}, "keep"),
    ("hoster.replication.replicate", ["vm1", ENDPOINT], {"speed_limit": "1; " + "x" * 1_000_000}, "speed_limit"),
    ("hoster.replication.replicate", ["vm1", ENDPOINT, 0], {}, "speed_limit"),  # reached pv
    ("hoster.replication.replicate", ["vm1", ENDPOINT, -1], {}, "speed_limit"),
    ("hoster.replication.replicate_all", [ENDPOINT], {"vms": "vm1"}, "vms"),  # silently ignored
    ("hoster.replication.replicate_all", [ENDPOINT], {"vms": ["vm1", "a;b"]}, "vms"),
    ("hoster.replication.replicate_all", [ENDPOINT], {"script_name": "x;rm -rf /"}, "script_name"),  # checked last
    ("hoster.replication.replicate_all", ["10.9.9.9"], {}, "endpoint"),  # host form, not a target
    ("hoster.replication.replicate_all", ["-oProxyCommand=touch /tmp/pwned"], {}, "endpoint"),
]


def test_reported_cases_fail_before_anything_runs(app: Any, idle: BoundaryNode) -> None:
    for name, args, kwargs, expect in REPORTED:
        send_invalid(app, idle, name, args, kwargs, expect)
    assert snapshot_names(idle.vm1) == HOURLY  # nothing taken, nothing pruned
    assert_answers(app, idle)


def test_the_recorder_sees_a_valid_task(app: Any, idle: BoundaryNode) -> None:
    """The zero counts above mean something: a valid task's zfs commands are recorded."""
    before = _settled(idle)
    app.send_task("hoster.snapshot.list", args=["vm1"], queue=idle.queue).get(timeout=60)
    assert idle.zfs_count() > before
    assert any(VMS_ROOT in line for line in idle.zfs_log.read_text().splitlines()[before:])
