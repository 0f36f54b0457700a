"""The typed request of every public task: one frozen, strict pydantic model per task.

A task's arguments arrive as JSON from anything that can reach the broker (beat, the client, Flower's HTTP
API, another system), so they are checked by type at the task boundary (`tasks.base.PublicTask`) before the
body runs, and the client and the CLI build the same models before anything is queued. Strict: `true` is not
1 and `"90"` is not 90.0; unknown arguments are refused. `from_call` binds positional and keyword arguments
by the task's signature and raises one `InvalidRequest` that lists every problem on one line, each value
shortened: a megabyte-long argument is never echoed back.

A task declares its model in its decorator: `@app.task(name=..., base=NodeTask, request_model=TakeRequest)`
(Celery sets extra decorator keywords as attributes of the task class). A model's fields are the task's
parameters, in order, with the same defaults (tests/unit/test_requests.py checks every registered task).
"""

from __future__ import annotations

import math
import re
import reprlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic_core import ErrorDetails

from hoster_tasks.errors import ConfigError, InvalidRequest
from hoster_tasks.names import (
    MAX_NAME,
    validate_dataset,
    validate_node_name,
    validate_snapshot,
    validate_snapshot_name,
    validate_stype,
    validate_vm,
)

if TYPE_CHECKING:  # settings may use these field types (SpeedLimit, ScriptName) without an import cycle
    from hoster_tasks.settings import Settings

KEEP_MAX = 10_000  # far above any real retention; bounds what one request may ask to keep
SPEED_LIMIT_MAX = 100_000.0  # MB/s (100 GB/s): above any link, and pv's byte rate stays a plain integer
MAX_ITEMS = 4096  # VMs (or datasets) named in one request
MAX_ENDPOINT = 253  # a DNS name's length
FIRST_TRY_SKEW = 300.0  # s: a retry's first-try time may not lie further ahead (or it would wait forever)
MAX_PROBLEMS = 10  # listed in one message; the rest are counted
MAX_PROBLEM_CHARS = 300

# An endpoint is a configured name or host: a name, an IP address (v6 with its zone), maybe user@host.
# No whitespace, quotes or shell syntax, and no leading '-' (it could be read as an ssh option).
_ENDPOINT = re.compile(r"^[A-Za-z0-9_.:\[\]%@][A-Za-z0-9_.:\[\]%@-]*$")
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


# --- field checks (shared with the CLI's argument types) -------------------------------------------------


def keep_value(keep: int) -> int:
    if keep < 1:
        raise ValueError(f"must be at least 1 (got {keep}): keeping nothing is not a retention")
    if keep > KEEP_MAX:
        raise ValueError(f"must be at most {KEEP_MAX} (got {brief(keep)})")
    return keep


def speed_limit_value(mb_per_s: float) -> float:
    if not math.isfinite(mb_per_s) or mb_per_s <= 0:
        raise ValueError(f"must be a positive number of MB/s (got {mb_per_s})")
    if mb_per_s > SPEED_LIMIT_MAX:
        raise ValueError(f"must be at most {SPEED_LIMIT_MAX:g} MB/s (got {mb_per_s:g})")
    return mb_per_s


def first_try_value(stamp: float) -> float:
    """A retry's first-try time (UNIX seconds): a future one would make the busy-wait never end."""
    if not math.isfinite(stamp) or stamp <= 0 or stamp > time.time() + FIRST_TRY_SKEW:
        raise ValueError(f"must be a UNIX time not in the future (got {stamp})")
    return stamp


def endpoint_value(name_or_host: str) -> str:
    if not _ENDPOINT.fullmatch(name_or_host):
        raise ValueError(
            f"invalid endpoint {name_or_host!r}: a target's name or host (A-Z a-z 0-9 _ . : [ ] % @ -, "
            "no leading '-')"
        )
    return name_or_host


def _snapshot_value(full: str) -> str:
    validate_snapshot(full)
    return full


def _snapshot_or_short(name: str) -> str:
    """dataset@name, or the name alone (a VM's own snapshot)."""
    if "@" in name:
        validate_snapshot(name)
    else:
        validate_snapshot_name(name)
    return name


VmName = Annotated[str, StringConstraints(max_length=200), AfterValidator(validate_vm)]
DatasetName = Annotated[str, StringConstraints(max_length=MAX_NAME), AfterValidator(validate_dataset)]
SnapshotRef = Annotated[str, StringConstraints(max_length=MAX_NAME), AfterValidator(_snapshot_value)]
Stype = Annotated[str, StringConstraints(max_length=32), AfterValidator(validate_stype)]
Keep = Annotated[int, AfterValidator(keep_value)]
SpeedLimit = Annotated[float, AfterValidator(speed_limit_value)]
FirstTry = Annotated[float, AfterValidator(first_try_value)]
# A beat fan-out's cron tick (unix seconds, a whole minute, 2000..2100): names the slot's snapshots (beat.py).
Slot = Annotated[int, Field(ge=946_684_800, le=4_102_444_800, multiple_of=60)]
EndpointRef = Annotated[str, StringConstraints(max_length=MAX_ENDPOINT), AfterValidator(endpoint_value)]
ScriptName = Annotated[str, StringConstraints(max_length=63), AfterValidator(validate_node_name)]
# `vms=[]` would mean "every VM" to replicate_all: refused, null says that.
VmList = Annotated[list[VmName], Field(min_length=1, max_length=MAX_ITEMS)]
DatasetList = Annotated[list[DatasetName], Field(max_length=MAX_ITEMS)]


# --- the mechanism ----------------------------------------------------------------------------------------


class TaskRequest(BaseModel):
    """Base of the request models. `task_name` is the task's public name, used in every message."""

    # defer_build: a model's validator is built when it is first used, so a CLI command pays for its own
    # request only, not for every task's (about 50 ms of the CLI's start here)
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False, defer_build=True)

    task_name: ClassVar[str] = ""

    @classmethod
    def from_call(
        cls, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, params: Sequence[str] | None = None
    ) -> Self:
        """Bind `args`/`kwargs` by `params` (the task's parameter names; the model's fields by default) and
        validate; every problem goes into one `InvalidRequest`."""
        names = list(cls.model_fields) if params is None else list(params)
        data, problems = _bind(args, {} if kwargs is None else kwargs, names)
        if data is None:  # not even a list and an object: nothing to validate
            raise cls.invalid(problems)
        request = None
        try:
            request = cls.model_validate(data)
        except ValidationError as exc:
            problems += [(_field(e), _problem(e)) for e in exc.errors(include_url=False)]
        if problems or request is None:
            raise cls.invalid(problems)
        return request

    @classmethod
    def of(cls, **kwargs: Any) -> Self:
        """The client's way in: keyword arguments only."""
        return cls.from_call((), kwargs)

    def check_settings(self, settings: Settings) -> None:
        """What only the worker can check, against its own settings, before the task body runs."""

    @classmethod
    def invalid(cls, problems: Sequence[tuple[str, str]]) -> InvalidRequest:
        shown = [_clip(text) for _, text in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"and {len(problems) - MAX_PROBLEMS} more")
        line = " ".join(f"invalid request for {cls.task_name}: {'; '.join(shown)}".split())  # one line
        return InvalidRequest(line, sorted({f for f, _ in problems[:MAX_PROBLEMS] if f}))


def _bind(
    args: Sequence[Any], kwargs: Mapping[str, Any], names: list[str]
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """Positional arguments take the parameter names in order, like Python's own call binding."""
    problems: list[tuple[str, str]] = []
    if not isinstance(args, list | tuple):
        return None, [("", f"positional arguments must be a list (got {brief(args)})")]
    if not isinstance(kwargs, Mapping):
        return None, [("", f"keyword arguments must be an object (got {brief(kwargs)})")]
    data = dict(zip(names, args, strict=False))
    if len(args) > len(names):
        problems.append(("", f"{len(args) - len(names)} extra positional argument(s): takes at most "
                             f"{len(names)} ({', '.join(names)})"))
    for key, value in kwargs.items():
        if key in data:
            problems.append((_key(key), f"{_key(key)}: given both by position and by keyword"))
        else:
            data[key] = value
    return data, problems


_MESSAGES = {"missing": "required", "extra_forbidden": "unknown argument"}


def _problem(error: ErrorDetails) -> str:
    where = _loc(error["loc"])
    kind = error["type"]
    if kind == "value_error":  # our validators' messages already quote the (bounded) value
        return f"{where}: {error['msg'].removeprefix('Value error, ')}"
    if kind == "missing":
        return f"{where}: required"
    return f"{where}: {_MESSAGES.get(kind, error['msg'])} (got {brief(error['input'])})"


def _field(error: ErrorDetails) -> str:
    loc = error["loc"]
    return _key(loc[0]) if loc else ""


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + _key(part)
    return out or "arguments"


def _key(key: object) -> str:
    return key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else brief(key)


_REPR = reprlib.Repr()
_REPR.maxstring = 40
_REPR.maxother = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2
_REPR.maxlong = 40


def brief(value: object) -> str:
    """A short, one-line picture of any argument: never the whole of a huge one."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int beyond Python's str conversion limit
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    if isinstance(value, str) and len(value) > _REPR.maxstring:
        text += f" ({len(value)} characters)"
    elif isinstance(value, list | tuple | dict) and len(value) > _REPR.maxlist:
        text += f" ({len(value)} items)"
    return f"{type(value).__name__} {text}" if not isinstance(value, str | type(None)) else text


def _clip(text: str) -> str:
    return text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 3] + "..."


def _configured_endpoint(request: TaskRequest, endpoint: str, settings: Settings, field: str = "endpoint") -> None:
    """The endpoint must be one of this worker's own targets (by name or host); an error names `field`."""
    try:
        settings.endpoint(endpoint)
    except ConfigError as exc:
        raise request.invalid([(field, f"{field}: {exc}")]) from None


# --- one model per public task ----------------------------------------------------------------------------


class TakeRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.snapshot.take"

    vm: VmName
    stype: Stype = "custom"
    keep: Keep | None = None
    first_try: FirstTry | None = None  # set by the task's own busy retries


class TakeAllRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.snapshot.take_all"

    stype: Stype
    keep: Keep
    only: DatasetList | None = None  # datasets, set by the task's own busy retries
    first_try: FirstTry | None = None
    slot: Slot | None = None  # the beat slot: one snapshot per (dataset, type, slot)


class ListRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.snapshot.list"

    vm: VmName | None = None


class DestroyRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.snapshot.destroy"

    snapshot: SnapshotRef
    first_try: FirstTry | None = None


class SnapshotFanoutRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.snapshot.fanout"

    stype: Stype
    keep: Keep
    slot: Slot | None = None  # set by beat (hoster_tasks/beat.py)


OnDiverged = Literal["discard", "keep"]  # the way back after a failover: see Replicator._settle_divergence


class ReplicateRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.replication.replicate"

    vm: VmName
    endpoint: EndpointRef
    speed_limit: SpeedLimit | None = None
    diverged: OnDiverged | None = None

    def check_settings(self, settings: Settings) -> None:
        _configured_endpoint(self, self.endpoint, settings)


class ReplicateAllRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.replication.replicate_all"

    endpoint: EndpointRef
    vms: VmList | None = None
    speed_limit: SpeedLimit | None = None
    script_name: ScriptName | None = None

    def check_settings(self, settings: Settings) -> None:
        _configured_endpoint(self, self.endpoint, settings)


class ReplicationFanoutRequest(TaskRequest):
    """Runs on the control queue: the endpoint is checked against the live nodes', not this worker's."""

    task_name: ClassVar[str] = "hoster.replication.fanout"

    endpoint: EndpointRef
    speed_limit: SpeedLimit | None = None
    script_name: ScriptName | None = None


class RetryFailedRequest(TaskRequest):
    """Runs on the control queue: each failed replication is re-sent to its owning node."""

    task_name: ClassVar[str] = "hoster.replication.retry_failed"

    endpoint: EndpointRef | None = None  # a target's configured name
    vm: VmName | None = None


# --- the links of a replicate chain (sent by `replicate`, but anyone on the broker can send them too) --------

# A chain id, a lock handoff value (<chain>:handoff:<hex>) or a task id: no shell syntax, bounded.
Token = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")]
ShortSnapshot = Annotated[str, StringConstraints(max_length=200), AfterValidator(validate_snapshot_name)]
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Handoff(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    source: Token | None = None
    target: Token | None = None


class Settled(BaseModel):
    """What the first link did with a diverged copy (Replicator._settle_divergence)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    discarded: Annotated[list[ShortSnapshot], Field(max_length=MAX_ITEMS)] | None = None
    rolled_back_to: SnapshotRef | None = None
    kept_as: DatasetName | None = None


class LinkProgress(BaseModel):
    """What one link hands the next (replication/lifecycle.py `new_progress`)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    dataset: DatasetName | None = None
    target: DatasetName | None = None
    target_host: ScriptName | None = None
    action: Literal["nothing", "full", "incremental"] = "nothing"
    sent: Annotated[list[ShortSnapshot], Field(max_length=MAX_ITEMS)] = []
    bytes: Count = 0
    resumed: Count = 0  # of `bytes`: what finished an interrupted receive (send -t)
    seconds: Seconds = 0.0
    complete: bool = False
    failed: bool = False  # a replicate-all job's link failed for good (recorded in the job): the rest passes
    speed_limit: SpeedLimit | None = None
    handoff: Handoff | None = None
    settled: Settled | None = None


class JobRef(BaseModel):
    """The replicate-all job a chain link runs for (tasks/replicate_all.py): where its outcome goes, and what
    re-runs the job if the link's worker dies."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    id: Token  # the replicate_all task id: its chord callback reports under it
    vms: VmList | None = None
    speed_limit: SpeedLimit | None = None
    script_name: ScriptName | None = None
    fanout: Token | None = None  # the beat fan-out the job reports to (Sentry Crons)


Note = Annotated[str, StringConstraints(max_length=1000)]


class StepRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.replication.step"

    prev: LinkProgress | None
    dataset: DatasetName
    endpoint: EndpointRef
    speed_limit: SpeedLimit | None
    chain: Token
    report_to: Token | None = None
    diverged: OnDiverged | None = None
    job: JobRef | None = None

    def check_settings(self, settings: Settings) -> None:
        _configured_endpoint(self, self.endpoint, settings)


class FinishRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.replication.finish"

    acc: LinkProgress
    dataset: DatasetName
    endpoint: EndpointRef
    chain: Token
    report_to: Token | None = None
    job: JobRef | None = None

    def check_settings(self, settings: Settings) -> None:
        _configured_endpoint(self, self.endpoint, settings)


class ReplicateAllDoneRequest(TaskRequest):
    """The chord callback of a replicate-all job: `parts` are its lanes' last links' results (None each)."""

    task_name: ClassVar[str] = "hoster.replication.replicate_all_done"

    parts: Annotated[list[None], Field(max_length=MAX_ITEMS)]
    endpoint: EndpointRef
    job: JobRef
    datasets: DatasetList  # every dataset of the job, in order
    work: DatasetList  # those sent by a chain (the others were in sync)
    skipped: Annotated[list[Note], Field(max_length=MAX_ITEMS)] | None = None
    superseded: Annotated[list[Note], Field(max_length=MAX_ITEMS)] | None = None

    def check_settings(self, settings: Settings) -> None:
        _configured_endpoint(self, self.endpoint, settings)


class ChainFailedRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.replication.chain_failed"

    task_id: Token
    dataset: DatasetName
    endpoint: EndpointRef


class RollbackRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.snapshot.rollback"

    vm: VmName
    snapshot: Annotated[str, StringConstraints(max_length=MAX_NAME), AfterValidator(_snapshot_or_short)]
    force_stop: bool = False
    force_start: bool = False
    destroy_base: bool = False
    keep_newer: bool = False
    dry_run: bool = False
    expect_destroyed: Annotated[list[ShortSnapshot], Field(max_length=MAX_ITEMS)] | None = None
    first_try: FirstTry | None = None


class ChangeParentRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.vm.change_parent"

    vm: VmName
    start: bool = False
    cireset: bool = False


class MoveRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.vm.move"

    vm: VmName
    to: ScriptName  # the new node: one of this node's targets, by name
    start: bool = True

    def check_settings(self, settings: Settings) -> None:
        _configured_endpoint(self, self.to, settings, field="to")


class CiresetRequest(TaskRequest):
    task_name: ClassVar[str] = "hoster.vm.cireset"

    vm: VmName


PUBLIC_REQUESTS: dict[str, type[TaskRequest]] = {
    m.task_name: m
    for m in (TakeRequest, TakeAllRequest, ListRequest, DestroyRequest, SnapshotFanoutRequest, ReplicateRequest,
              ReplicateAllRequest, ReplicationFanoutRequest, StepRequest, FinishRequest, ChainFailedRequest,
              ReplicateAllDoneRequest, RollbackRequest, ChangeParentRequest, CiresetRequest, MoveRequest,
              RetryFailedRequest)
}
