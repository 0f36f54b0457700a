"""The OpenZFS 2.x paths of the replicator (hoster_tasks/replication/replicator.py), by the exact argv lists
they build: raw sends of encrypted datasets, resumable receives (`receive -s`, `send -t`, `receive -A`),
`send -nP` estimates, holds, and the refusals. zfs-fuse on the test machine has none of these, so the hosts
here are `ScriptedShell`s: they implement the `Shell` protocol, record every argv, and answer from a table
of canned outputs (OpenZFS 2.2's usage text for the probe; `zfs get -Hp` output rendered from a small model
of each host's datasets). The only fake is `run_pipeline`, captured instead of run (it has real tests in
test_pipeline_errors.py); the ssh argv of the receive stage is built by the real `shell.ssh_argv`.

The Redis client is only used for locks and state: most tests drive the Replicator's steps directly and
give it a Redis that fails the test if touched. The few tests of the whole `run_all` flow use a private
real redis-server (skipped when it is not installed).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hoster_tasks import keys
from hoster_tasks.errors import ConnectionLost, Diverged, Permanent, ReceiveInProgress, ZfsError, zfs_error
from hoster_tasks.policy.planner import Action, StepKind, target_prune
from hoster_tasks.replication import replicator as replicator_module
from hoster_tasks.replication.pipeline import PipelineResult, Stage
from hoster_tasks.replication.replicator import Replicator
from hoster_tasks.settings import Endpoint, Settings
from hoster_tasks.snapshots import NodeContext
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs.probe import OPENZFS2, Capabilities, capabilities_from_usage, probe
from hoster_tasks.zfs.shell import DEFAULT_TIMEOUT, Result, ssh_argv

FIXTURES = Path(__file__).parent / "fixtures"
OPENZFS_USAGE = (FIXTURES / "openzfs2_usage.txt").read_text()
ZFS_FUSE_USAGE = (FIXTURES / "zfs_fuse_usage.txt").read_text()

NODE = "node1"
TARGET = "backup1"
SRC_ENC, SRC_PLAIN = "zroot/vm-encrypted", "zroot/vm-unencrypted"
DST_ENC, DST_PLAIN = "tank/backup/vm-encrypted", "tank/backup/vm-unencrypted"
VM1, WEB, VM3 = f"{SRC_ENC}/vm1", f"{SRC_PLAIN}/web", f"{SRC_ENC}/vm3"  # encrypted, plain, encrypted
T_VM1, T_WEB, T_VM3 = f"{DST_ENC}/vm1", f"{DST_PLAIN}/web", f"{DST_ENC}/vm3"
MARKS = ("-o", f"hoster-tasks:parent={NODE}", "-o", "readonly=on")  # receive -o: the copy is marked as made
H1, H2, H3 = "hourly_2024-05-06_10-33-00", "hourly_2024-05-06_11-33-00", "hourly_2024-05-06_12-33-00"
# A receive_resume_token as OpenZFS 2.2 prints it (abbreviated: real ones are a few hundred hex digits).
TOKEN = (
    "1-11a8f9d4a0-f0-789c636064000310a500c4ec50360710e72765a52697303030419460caa7a515a79630c001489e0d493ea9b224b5"
    "18486c3e1ae1d41526600a3a1b66e9fda002f8dbc2f4ad4f3a5bd5d2a2b4c4d33d3c8041a9ecd6a7fcb5a9393f92d2ed2e8a0d00"
)
SSH_OPTIONS = [
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=yes",
    "-o", "ConnectTimeout=10",
    "-o", "ServerAliveInterval=5",
    "-o", "ServerAliveCountMax=3",
    "-p", "2222",
    "-l", "root",
    "-o", "UserKnownHostsFile=/etc/hoster-tasks/known_hosts",
    "-i", "/etc/hoster-tasks/id_ed25519", "-o", "IdentitiesOnly=yes",
]  # fmt: skip
SRC_PROPS = "guid,createtxg,creation,used,referenced,userrefs,clones,hoster-tasks:base.backup1,encryption"
TGT_PROPS = "guid,createtxg,creation,used,referenced,userrefs,clones,hoster-tasks:parent,receive_resume_token"


def guid(dataset: str, name: str) -> int:
    """A stable 64-bit GUID per snapshot of a *source* dataset (copies keep their source's GUID)."""
    return int.from_bytes(hashlib.sha256(f"{dataset}@{name}".encode()).digest()[:8], "big") or 1


# -- a model of each host's datasets, rendered as `zfs get -Hp -o name,property,value` output -------------------


@dataclass
class SnapRow:
    name: str
    guid: int
    createtxg: int
    creation: int
    used: int = 1_236_992
    referenced: int = 5_368_709_120
    userrefs: int = 0
    clones: str = ""  # OpenZFS prints an empty value for a snapshot without clones


@dataclass
class DatasetRow:
    name: str
    guid: int
    createtxg: int
    creation: int = 1_700_000_000
    used: int = 5_370_000_000
    referenced: int = 5_368_709_120
    props: dict[str, str] = field(default_factory=dict)  # encryption, user properties, receive_resume_token
    snaps: list[SnapRow] = field(default_factory=list)
    bookmarks: list[SnapRow] = field(default_factory=list)  # a recursive `zfs get` lists them too


class ZfsModel:
    """What one host's `zfs get` sees. Only what the replicator reads is modelled."""

    def __init__(self) -> None:
        self.datasets: dict[str, DatasetRow] = {}
        self.txg = 9000

    def add(self, name: str, snaps: Sequence[SnapRow] = (), **props: str) -> DatasetRow:
        self.txg += 1
        row = DatasetRow(name, guid(name, ""), self.txg, props=dict(props), snaps=list(snaps))
        self.datasets[name] = row
        return row

    def snap(self, dataset: str, name: str) -> SnapRow:
        return next(s for s in self.datasets[dataset].snaps if s.name == name)

    def _value(self, ds: DatasetRow, snap: SnapRow | None, prop: str) -> str:
        if prop in ("guid", "createtxg", "creation", "used", "referenced"):
            return str(getattr(snap if snap is not None else ds, prop))
        if prop == "userrefs":
            return "-" if snap is None else str(snap.userrefs)
        if prop == "clones":
            return "-" if snap is None else snap.clones
        if prop == "encryption":
            return ds.props.get("encryption", "off")  # snapshots show their dataset's
        if prop == "receive_resume_token":
            return "-" if snap is not None else ds.props.get(prop, "-")
        if ":" in prop:
            return ds.props.get(prop, "-")  # user properties: snapshots inherit their dataset's
        raise AssertionError(f"property {prop!r} is not modelled")

    def get(self, argv: list[str]) -> tuple[int, str, str]:
        """`zfs get -Hp [-r] -o name,property,value <props> <names...>`, as OpenZFS answers it."""
        flags = argv[2:argv.index("-o")]
        assert flags in (["-Hp"], ["-Hp", "-r"]), argv
        assert argv[argv.index("-o") + 1] == "name,property,value", argv
        props = argv[argv.index("-o") + 2].split(",")
        names = argv[argv.index("-o") + 3:]
        out, err = [], []
        for name in names:
            ds = self.datasets.get(name)
            if ds is None:
                err.append(f"cannot open '{name}': dataset does not exist")
                continue
            objects: list[tuple[str, SnapRow | None]] = [(name, None)]
            if "-r" in flags:
                objects += [(f"{name}@{s.name}", s) for s in sorted(ds.snaps, key=lambda s: s.createtxg)]
                objects += [(f"{name}#{b.name}", b) for b in ds.bookmarks]
            for full, snap in objects:
                out += [f"{full}\t{prop}\t{self._value(ds, snap, prop)}" for prop in props]
        return (1 if err else 0), "".join(line + "\n" for line in out), "".join(line + "\n" for line in err)


# -- the scripted Shell ------------------------------------------------------------------------------------------

Answer = tuple[int, str, str]  # exit code, stdout, stderr
Reply = Answer | Callable[[list[str]], Answer]


class ScriptedShell:
    """A `Shell` (hoster_tasks/zfs/shell.py) that records every argv and answers from a table.

    `exact` maps a whole argv to its answer, `prefix` the start of an argv (longest prefix wins); an answer is
    (exit code, stdout, stderr) or a function of the argv returning one. Anything unscripted fails the test.
    A non-zero exit with check=True raises the named error, as the real shells do (`errors.zfs_error`).
    """

    def __init__(self, host: str, log: list[tuple[str, list[str]]], endpoint: Endpoint | None = None) -> None:
        self.host = host
        self.log = log  # shared by both hosts and the pipeline: the order of everything
        self.endpoint = endpoint  # set: a remote host, whose pipeline stage goes through ssh
        self.calls: list[list[str]] = []
        self.exact: dict[tuple[str, ...], Reply] = {}
        self.prefix: dict[tuple[str, ...], Reply] = {}
        self.closed = False

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Result:
        argv = list(argv)
        self.calls.append(argv)
        self.log.append((self.host, argv))
        code, out, err = self._reply(argv)
        if check and code != 0:
            raise zfs_error(argv, code, err, self.host)
        return Result(tuple(argv), code, out, err)

    def _reply(self, argv: list[str]) -> Answer:
        reply = self.exact.get(tuple(argv))
        if reply is None:
            keys = [k for k in self.prefix if tuple(argv[: len(k)]) == k]
            if not keys:
                raise AssertionError(f"[{self.host}] unscripted command: {argv}")
            reply = self.prefix[max(keys, key=len)]
        return reply(argv) if callable(reply) else reply

    def process_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv) if self.endpoint is None else ssh_argv(self.endpoint, argv)

    def close(self) -> None:
        self.closed = True


OK: Answer = (0, "", "")


def zfs_host(host: str, log: list[tuple[str, list[str]]], model: ZfsModel, usage: str = OPENZFS_USAGE,
             endpoint: Endpoint | None = None) -> ScriptedShell:
    shell = ScriptedShell(host, log, endpoint)
    shell.exact[("zfs",)] = (2, "", usage)  # `zfs` alone: usage on stderr, exit 2
    shell.prefix[("zfs", "get")] = model.get
    for verb in ("set", "hold", "release", "destroy", "bookmark"):
        shell.prefix[("zfs", verb)] = OK
    shell.prefix[("ps",)] = OK  # the receive-in-progress check: none running
    return shell


# -- the pipeline, captured --------------------------------------------------------------------------------------


@dataclass
class Transfer:
    send: list[str]
    receive: list[str]
    send_host: str
    receive_host: str
    speed_limit: float | None

    @property
    def remote_command(self) -> list[str]:
        """The receive stage's remote command line, split back into its argv."""
        assert self.receive[0] == "ssh" and self.receive[-3] == "--", self.receive
        return shlex.split(self.receive[-1])


class CapturedPipeline:
    """Stands in for `run_pipeline`: records both stages' argvs; can fail, or apply the stream to a model."""

    def __init__(self, log: list[tuple[str, list[str]]]) -> None:
        self.log = log
        self.transfers: list[Transfer] = []
        self.failures: list[BaseException | None] = []  # consumed one per call; None: succeed
        self.on_success: Callable[[Transfer], None] | None = None
        self.nbytes = 4096

    def __call__(self, send: Stage, receive: Stage, speed_limit_mb: float | None = None,
                 progress: Callable[[int], None] | None = None, cancel: Any = None,
                 timeout: float | None = None, lease: Any = None,
                 stall_seconds: float | None = None) -> PipelineResult:
        t = Transfer(send.argv, receive.argv, send.host, receive.host, speed_limit_mb)
        self.transfers.append(t)
        self.log.append(("pipeline", [*send.argv, "|", *receive.argv]))
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        if progress is not None:
            progress(self.nbytes)
        if self.on_success is not None:
            self.on_success(t)
        return PipelineResult(self.nbytes, 0.25, [])


class RedisMustNotBeTouched:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis was used ({name}) where no lock or state was expected")


# -- the world: node1 with three VMs, backup1 with copies of two of them -------------------------------------------


def source_snaps(dataset: str, names: Sequence[str] = (H1, H2, H3), first_txg: int = 1200) -> list[SnapRow]:
    return [
        SnapRow(n, guid(dataset, n), first_txg + 100 * i, 1_714_991_580 + 3600 * i, used=1_236_992 + i)
        for i, n in enumerate(names)
    ]


def copy_of(source: SnapRow, txg: int, userrefs: int = 0) -> SnapRow:
    """The same snapshot received on the target: same GUID and creation, the target's own createtxg."""
    return SnapRow(source.name, source.guid, txg, source.creation, source.used, source.referenced, userrefs)


@dataclass
class World:
    settings: Settings
    endpoint: Endpoint
    src_model: ZfsModel
    tgt_model: ZfsModel
    src: ScriptedShell
    tgt: ScriptedShell
    pipeline: CapturedPipeline
    log: list[tuple[str, list[str]]]
    redis: Any = field(default_factory=RedisMustNotBeTouched)
    progress: list[dict[str, Any]] = field(default_factory=list)

    def replicator(self, caps: Capabilities | None = None) -> Replicator:
        ctx = NodeContext(self.settings, self.src, caps or probe(self.src), self.redis)
        return Replicator(ctx, self.endpoint, progress=self.progress.append, target_shell=self.tgt)

    def reset(self) -> None:
        self.log.clear()
        self.src.calls.clear()
        self.tgt.calls.clear()
        self.pipeline.transfers.clear()


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    for key in list(os.environ):
        if key.startswith("HOSTER_"):
            monkeypatch.delenv(key)
    endpoint = Endpoint(
        name=TARGET, host="192.0.2.10", port=2222, user="root",
        key_file=Path("/etc/hoster-tasks/id_ed25519"), known_hosts=Path("/etc/hoster-tasks/known_hosts"),
        root_map={SRC_ENC: DST_ENC, SRC_PLAIN: DST_PLAIN},
    )  # fmt: skip
    settings = Settings(node_name=NODE, datasets=[SRC_ENC, SRC_PLAIN], targets=[endpoint], zfs_command="zfs")
    log: list[tuple[str, list[str]]] = []

    src_model = ZfsModel()
    src_model.add(SRC_ENC, encryption="aes-256-gcm")
    src_model.add(SRC_PLAIN)
    vm1 = source_snaps(VM1)
    vm1[0].userrefs = 1  # the recorded base is held
    src_model.add(VM1, vm1, encryption="aes-256-gcm", **{"hoster-tasks:base.backup1": str(vm1[0].guid)})
    web = source_snaps(WEB, first_txg=1210)
    web[0].userrefs = 1
    src_model.add(WEB, web, **{"hoster-tasks:base.backup1": str(web[0].guid)})
    src_model.add(VM3, source_snaps(VM3, first_txg=1220), encryption="aes-256-gcm")

    tgt_model = ZfsModel()
    tgt_model.add(DST_ENC)
    tgt_model.add(DST_PLAIN)
    # vm1's copy has H1 (held) and an interrupted resumable receive of H2
    tgt_model.add(T_VM1, [copy_of(vm1[0], 310, userrefs=1)], encryption="aes-256-gcm",
                  receive_resume_token=TOKEN, **{"hoster-tasks:parent": NODE})
    tgt_model.add(T_WEB, [copy_of(web[0], 320, userrefs=1)], **{"hoster-tasks:parent": NODE})
    # vm3 has no copy yet

    src = zfs_host("local", log, src_model)
    tgt = zfs_host(TARGET, log, tgt_model, endpoint=endpoint)
    pipeline = CapturedPipeline(log)
    monkeypatch.setattr(replicator_module, "run_pipeline", pipeline)
    return World(settings, endpoint, src_model, tgt_model, src, tgt, pipeline, log)


def nP_output(lines: Sequence[tuple[str, ...]], total: int) -> str:
    """`zfs send -nP` on OpenZFS 2.2: one line per stream, then `size\t<bytes>` (on stdout with -n)."""
    return "".join("\t".join(parts) + "\n" for parts in lines) + f"size\t{total}\n"


def script_estimates(world: World) -> None:
    """Every `zfs send -nP ...` on the source answers 1000 bytes, in OpenZFS's format."""

    def answer(argv: list[str]) -> Answer:
        line: tuple[str, ...]
        if "-I" in argv:
            line = ("incremental", argv[argv.index("-I") + 1].split("@")[1], argv[-1], "1000")
        else:
            line = ("full", argv[-1], "1000")
        return 0, nP_output([line], 1000), ""

    world.src.prefix[("zfs", "send", "-nP")] = answer


def receive_stage(target: str) -> list[str]:
    return ["ssh", *SSH_OPTIONS, "--", "192.0.2.10", shlex.join(["zfs", "receive", "-u", "-s", *MARKS, target])]


def received(world: World, target: str, source: str, names: Sequence[str], **props: str) -> None:
    """As if the transfer had landed `names` on the target (copies of the source's snapshots)."""
    row = world.tgt_model.datasets.get(target) or world.tgt_model.add(target)
    row.props.update(props)
    row.props.pop("receive_resume_token", None)
    have = {s.name for s in row.snaps}
    for n in names:
        if n not in have:
            world.tgt_model.txg += 1
            row.snaps.append(copy_of(world.src_model.snap(source, n), world.tgt_model.txg))


def apply_stream(world: World) -> Callable[[Transfer], None]:
    """What a successful `zfs send ... | zfs receive <target>` leaves on the target model."""

    def apply(t: Transfer) -> None:
        target = t.remote_command[-1]
        send = t.send
        if send[2] == "-t":
            source, name = VM1, H2  # the token's stream: vm1@H2
            received(world, target, source, [name])
            return
        source, last = send[-1].split("@")
        snaps = world.src_model.datasets[source].snaps
        if "-I" in send:
            first = send[send.index("-I") + 1].split("@")[1]
            lo = world.src_model.snap(source, first).createtxg
            hi = world.src_model.snap(source, last).createtxg
            received(world, target, source, [s.name for s in snaps if lo < s.createtxg <= hi])
        else:
            received(world, target, source, [last])

    return apply


def commands(log: Sequence[tuple[str, list[str]]]) -> list[list[str]]:
    """Every zfs command in the log, with each pipeline split into its stages and the remote command of an
    ssh stage split back into its argv."""
    out = []
    for _, argv in log:
        stages: list[list[str]] = [[]]
        for word in argv:
            if word == "|":
                stages.append([])
            else:
                stages[-1].append(word)
        out += [shlex.split(stage[-1]) if stage[0] == "ssh" else stage for stage in stages]
    return out


def destructive(log: Sequence[tuple[str, list[str]]]) -> list[list[str]]:
    """Every command that could lose data or state on a target: destroy, rollback, receive -F, receive -A."""
    return [
        c for c in commands(log)
        if c[:2] in (["zfs", "destroy"], ["zfs", "rollback"])
        or (c[:2] == ["zfs", "receive"] and ("-F" in c or "-A" in c))
    ]


# -- probe and listing -------------------------------------------------------------------------------------------


def test_both_hosts_are_probed_as_openzfs_2(world: World) -> None:
    rep = world.replicator()
    assert rep.ctx.caps == OPENZFS2
    assert rep.target_caps == OPENZFS2
    assert rep.target_caps == OPENZFS2  # probed once per run
    assert world.src.calls == [["zfs"]] and world.tgt.calls == [["zfs"]]


def test_one_batched_listing_per_host_for_several_datasets(world: World) -> None:
    rep = world.replicator()
    world.reset()
    sides = rep.list_sides([VM1, WEB, VM3])

    assert world.src.calls == [
        ["zfs", "get", "-Hp", "-r", "-o", "name,property,value", SRC_PROPS, VM1, WEB, VM3]
    ]
    assert world.tgt.calls == [
        ["zfs"],  # the target's probe, on first use
        ["zfs", "get", "-Hp", "-r", "-o", "name,property,value", TGT_PROPS, T_VM1, T_WEB, T_VM3],
    ]
    assert "encryption" in SRC_PROPS.split(",") and "hoster-tasks:base.backup1" in SRC_PROPS.split(",")
    assert {"receive_resume_token", "hoster-tasks:parent"} <= set(TGT_PROPS.split(","))

    assert [s.name for s in sides.source[VM1]] == [H1, H2, H3]
    assert sides.source_props[VM1]["encryption"] == "aes-256-gcm"
    assert sides.source_props[WEB]["encryption"] == "off"
    assert sides.source_props[VM1]["hoster-tasks:base.backup1"] == str(guid(VM1, H1))
    assert [s.name for s in sides.target[T_VM1] or []] == [H1]
    assert sides.target[T_VM3] is None  # "dataset does not exist" on stderr, exit 1: absent, not an error
    assert sides.target_props[T_VM1]["receive_resume_token"] == TOKEN
    assert sides.target_props[T_VM1]["hoster-tasks:parent"] == NODE
    assert sides.target_props[T_WEB]["receive_resume_token"] == "-"


def test_a_real_listing_error_on_the_target_is_raised(world: World) -> None:
    rep = world.replicator()
    world.tgt.prefix[("zfs", "get")] = (1, "", "cannot open 'tank': pool I/O is currently suspended\n")
    with pytest.raises(ZfsError, match="suspended"):
        rep.list_sides([VM1])


# -- the data path: raw sends, resumable receives ----------------------------------------------------------------


def test_encrypted_incremental_is_sent_raw_into_a_resumable_receive(world: World) -> None:
    rep = world.replicator()
    sides = rep.list_sides([VM1])
    plan = rep.plan(VM1, sides)
    assert plan.action is Action.INCREMENTAL and len(plan.steps) == 1
    world.src.prefix[("zfs", "send", "-nP")] = (
        0,
        nP_output([("incremental", H1, f"{VM1}@{H2}", "1052672"), ("incremental", H2, f"{VM1}@{H3}", "2101248")],
                  3153920),
        "",
    )
    world.reset()

    rep.send_step(VM1, plan.steps[0], sides)

    assert world.src.calls == [["zfs", "send", "-nP", "-w", "-I", f"{VM1}@{H1}", f"{VM1}@{H3}"]]
    assert world.tgt.calls == []
    [t] = world.pipeline.transfers
    assert t.send == ["zfs", "send", "-w", "-I", f"{VM1}@{H1}", f"{VM1}@{H3}"]
    assert t.send_host == "local"
    assert t.receive == receive_stage(T_VM1)
    assert t.receive_host == TARGET
    assert t.remote_command == ["zfs", "receive", "-u", "-s", *MARKS, T_VM1]
    assert world.progress[-1] == {"dataset": VM1, "target": TARGET, "bytes": 4096, "total": 3153920, "done": True}


def test_encrypted_new_copy_is_a_raw_full_send_then_a_raw_incremental(world: World) -> None:
    rep = world.replicator()
    sides = rep.list_sides([VM3])
    plan = rep.plan(VM3, sides)
    assert plan.action is Action.FULL
    assert [s.kind for s in plan.steps] == [StepKind.FULL, StepKind.INCREMENTAL]
    script_estimates(world)
    world.reset()

    for step in plan.steps:
        rep.send_step(VM3, step, sides)

    assert [t.send for t in world.pipeline.transfers] == [
        ["zfs", "send", "-w", f"{VM3}@{H1}"],
        ["zfs", "send", "-w", "-I", f"{VM3}@{H1}", f"{VM3}@{H3}"],
    ]
    assert [t.receive for t in world.pipeline.transfers] == [receive_stage(T_VM3)] * 2
    assert world.src.calls == [
        ["zfs", "send", "-nP", "-w", f"{VM3}@{H1}"],
        ["zfs", "send", "-nP", "-w", "-I", f"{VM3}@{H1}", f"{VM3}@{H3}"],
    ]


def test_unencrypted_dataset_is_not_sent_raw(world: World) -> None:
    rep = world.replicator()
    sides = rep.list_sides([WEB])
    plan = rep.plan(WEB, sides)
    script_estimates(world)
    world.reset()

    rep.send_step(WEB, plan.steps[0], sides)

    [t] = world.pipeline.transfers
    assert t.send == ["zfs", "send", "-I", f"{WEB}@{H1}", f"{WEB}@{H3}"]
    assert world.src.calls == [["zfs", "send", "-nP", "-I", f"{WEB}@{H1}", f"{WEB}@{H3}"]]
    assert t.receive == receive_stage(T_WEB)  # still resumable: both hosts are OpenZFS 2.x


def test_encrypted_dataset_to_a_zfs_fuse_target_is_not_raw_nor_resumable(world: World) -> None:
    world.tgt.exact[("zfs",)] = (2, "", ZFS_FUSE_USAGE)
    # allowed here; without it the send is refused (tests/unit/test_encryption_policy.py)
    world.endpoint = world.endpoint.model_copy(update={"send_decrypted": True})
    rep = world.replicator()
    sides = rep.list_sides([VM1])
    script_estimates(world)
    world.reset()
    rep.send_step(VM1, rep.plan(VM1, sides).steps[0], sides)
    [t] = world.pipeline.transfers
    assert t.send == ["zfs", "send", "-I", f"{VM1}@{H1}", f"{VM1}@{H3}"]
    assert t.remote_command == ["zfs", "receive", "-u", T_VM1]


def test_a_resume_token_is_sent_first(world: World) -> None:
    rep = world.replicator()
    sides = rep.list_sides([VM1])
    world.reset()

    result = rep.resume(VM1, sides)

    assert result is not None
    [t] = world.pipeline.transfers
    assert t.send == ["zfs", "send", "-t", TOKEN]
    assert t.receive == receive_stage(T_VM1)
    assert world.tgt.calls == [] and world.src.calls == []  # no abort; no estimate for a resume
    assert rep.resume(WEB, rep.list_sides([WEB])) is None  # no token: nothing to resume


def test_a_failed_resume_is_aborted_and_the_normal_plan_continues(world: World) -> None:
    rep = world.replicator()
    script_estimates(world)
    world.reset()
    send_t = ["zfs", "send", "-t", TOKEN]
    world.pipeline.failures = [
        zfs_error(send_t, 1, f"cannot resume send: '{VM1}@{H2}' used in the initial send no longer exists",
                  "local")
    ]
    world.tgt.exact[("zfs", "receive", "-A", T_VM1)] = OK

    sides, plan, resumed = rep.prepare(VM1)  # what the step task and replicate_one run under the locks
    assert resumed == 0 and plan.action is Action.INCREMENTAL
    rep.send_step(VM1, plan.steps[0], sides)

    assert [t.send for t in world.pipeline.transfers] == [
        send_t,
        ["zfs", "send", "-w", "-I", f"{VM1}@{H1}", f"{VM1}@{H3}"],
    ]
    assert [(host, argv) for host, argv in world.log if argv[1:2] != ["get"]] == [
        (TARGET, ["zfs"]),  # the probe, once
        (TARGET, ["ps", "-ww", "-A", "-o", "args="]),  # no receive of ours in progress there (with the listing)
        ("pipeline", [*send_t, "|", *receive_stage(T_VM1)]),
        (TARGET, ["zfs", "receive", "-A", T_VM1]),
        ("local", ["zfs", "send", "-nP", "-w", "-I", f"{VM1}@{H1}", f"{VM1}@{H3}"]),
        ("pipeline", ["zfs", "send", "-w", "-I", f"{VM1}@{H1}", f"{VM1}@{H3}", "|", *receive_stage(T_VM1)]),
    ]


def test_a_completed_resume_is_followed_by_the_plan_from_what_it_completed(world: World) -> None:
    rep = world.replicator()
    script_estimates(world)
    world.pipeline.on_success = apply_stream(world)  # the token's stream lands vm1@H2
    world.reset()

    sides, plan, resumed = rep.prepare(VM1)

    assert resumed == world.pipeline.nbytes
    assert [t.send for t in world.pipeline.transfers] == [["zfs", "send", "-t", TOKEN]]
    assert [s.name for s in sides.target[T_VM1] or []] == [H1, H2]  # listed again after the resume
    assert [(s.kind, s.base and s.base.name, s.snapshot.name) for s in plan.steps] == [
        (StepKind.INCREMENTAL, H2, H3)
    ]
    assert ["zfs", "receive", "-A", T_VM1] not in world.tgt.calls


def test_a_resume_cut_by_the_network_keeps_the_partial_state(world: World) -> None:
    rep = world.replicator()
    sides = rep.list_sides([VM1])
    world.reset()
    world.pipeline.failures = [
        zfs_error(receive_stage(T_VM1), 255, "Connection closed by 192.0.2.10 port 2222", TARGET)
    ]
    with pytest.raises(ConnectionLost):
        rep.resume(VM1, sides)
    assert world.tgt.calls == []  # no `receive -A`: the next attempt resumes from the token


def test_estimate_reads_size_from_send_nP(world: World) -> None:
    rep = world.replicator()
    sides = rep.list_sides([VM3])
    full = rep.plan(VM3, sides).steps[0]
    world.src.exact[("zfs", "send", "-nP", "-w", f"{VM3}@{H1}")] = (
        0, nP_output([("full", f"{VM3}@{H1}", "5368709120")], 5368709120), ""
    )
    world.reset()
    assert rep.estimate(full, cmd.SendOptions(raw=True)) == 5368709120
    assert world.src.calls == [["zfs", "send", "-nP", "-w", f"{VM3}@{H1}"]]


def test_estimate_without_send_nP_runs_nothing(world: World) -> None:
    fuse = capabilities_from_usage(ZFS_FUSE_USAGE)
    rep = world.replicator(caps=fuse)
    sides = rep.list_sides([VM3])
    world.reset()
    full = rep.plan(VM3, sides).steps[0]
    assert rep.estimate(full, cmd.SendOptions()) == full.snapshot.referenced
    assert world.src.calls == []


# -- after the transfer: base, holds, parent, prune ----------------------------------------------------------------


def test_finish_moves_base_and_holds_and_prunes_what_target_prune_chose(world: World) -> None:
    # the target still has an old snapshot the source already pruned, and one another tool made
    old = SnapRow("hourly_2024-05-06_09-33-00", guid(VM1, "old"), 250, 1_714_987_980)
    theirs = SnapRow("before-upgrade", guid(T_VM1, "theirs"), 260, 1_714_988_000)
    world.tgt_model.datasets[T_VM1].snaps[:0] = [old, theirs]
    rep = world.replicator()
    rep.list_sides([VM1])  # probes both hosts before the transfer
    received(world, T_VM1, VM1, [H2, H3])
    after = rep.list_sides([VM1])
    world.reset()

    done = rep.finish(VM1, after)

    h3 = guid(VM1, H3)
    assert world.src.calls == [
        ["zfs", "set", f"hoster-tasks:base.backup1={h3}", VM1],
        ["zfs", "hold", "hoster-tasks.backup1", f"{VM1}@{H3}"],
        ["zfs", "release", "hoster-tasks.backup1", f"{VM1}@{H1}"],
        ["zfs", "bookmark", f"{VM1}@{H3}", f"{VM1}#hoster-tasks:backup1:{H3}"],
    ]
    chosen = target_prune(after.source[VM1], after.target[T_VM1] or [], h3)
    assert [s.full for s in chosen] == [f"{T_VM1}@{old.name}"]
    assert world.tgt.calls == [
        ["zfs", "hold", "hoster-tasks.backup1", f"{T_VM1}@{H3}"],
        ["zfs", "release", "hoster-tasks.backup1", f"{T_VM1}@{H1}"],
        *[["zfs", "destroy", s.full] for s in chosen],
    ]  # the copy already names its parent: no `set` on the target
    assert done["base"] == f"{VM1}@{H3}" and done["pruned_on_target"] == [f"{T_VM1}@{old.name}"]
    # the base is recorded before anything is pruned
    verbs = [argv[1] for _, argv in world.log]
    assert verbs.index("set") < verbs.index("destroy")


def test_the_old_base_is_released_on_neither_side_before_both_hold_the_new_one(world: World) -> None:
    """The two sides run at the same time, but in two phases: a side that is quick to hold the new base
    waits for the other before it releases the old one, so one common snapshot is held on both at every
    moment (a worker killed in between leaves no copy without a held common snapshot)."""
    rep = world.replicator()
    rep.list_sides([VM1])  # probes both hosts before the transfer
    received(world, T_VM1, VM1, [H2, H3])
    after = rep.list_sides([VM1])
    world.reset()

    def slow_hold(argv: list[str]) -> Answer:
        time.sleep(0.2)  # the target answers late: the source has long held its side by then
        world.log.append((TARGET, ["(held)"]))  # the log has each command's start; this, the hold's end
        return OK

    world.tgt.prefix[("zfs", "hold")] = slow_hold
    rep.finish(VM1, after)

    events = [(host, argv[1] if len(argv) > 1 else argv[0]) for host, argv in world.log
              if argv[1:2] in (["hold"], ["release"]) or argv == ["(held)"]]
    assert sorted(events[:3]) == [(TARGET, "(held)"), (TARGET, "hold"), ("local", "hold")]
    assert sorted(events[3:]) == [(TARGET, "release"), ("local", "release")]


def test_a_receive_running_into_the_target_is_busy_read_with_the_listing(world: World) -> None:
    rep = world.replicator()
    rep.list_sides([VM1])  # probes both hosts
    world.reset()
    world.tgt.prefix[("ps",)] = (0, f"/usr/sbin/sshd -D\nzfs receive -s -u {T_VM1}\n", "")
    with pytest.raises(ReceiveInProgress, match=f"{TARGET}:{T_VM1} has a zfs receive in progress"):
        rep.prepare(VM1)
    assert world.tgt.calls[0] == ["ps", "-ww", "-A", "-o", "args="] and world.tgt.calls[1][1] == "get"
    assert world.pipeline.transfers == [] and destructive(world.log) == []


def test_finish_marks_a_new_copy_with_its_parent_and_read_only(world: World) -> None:
    rep = world.replicator()
    rep.list_sides([VM3])  # probes both hosts before the transfer
    received(world, T_VM3, VM3, [H1, H2, H3], encryption="aes-256-gcm")
    after = rep.list_sides([VM3])
    world.reset()

    rep.finish(VM3, after)

    h3 = guid(VM3, H3)
    assert world.src.calls == [
        ["zfs", "set", f"hoster-tasks:base.backup1={h3}", VM3],
        ["zfs", "hold", "hoster-tasks.backup1", f"{VM3}@{H3}"],
        ["zfs", "bookmark", f"{VM3}@{H3}", f"{VM3}#hoster-tasks:backup1:{H3}"],
    ]  # no old base: nothing to release
    assert world.tgt.calls == [
        ["zfs", "hold", "hoster-tasks.backup1", f"{T_VM3}@{H3}"],
        ["zfs", "set", f"hoster-tasks:parent={NODE}", T_VM3],
        ["zfs", "set", "readonly=on", T_VM3],
    ]


def test_finish_with_nothing_new_writes_nothing(world: World) -> None:
    received(world, T_VM1, VM1, [H2, H3])
    world.src_model.datasets[VM1].props["hoster-tasks:base.backup1"] = str(guid(VM1, H3))
    h3 = world.src_model.snap(VM1, H3)
    h3.userrefs = 1  # the recorded base is held on both sides already, and bookmarked
    world.tgt_model.snap(T_VM1, H3).userrefs = 1
    world.src_model.datasets[VM1].bookmarks = [SnapRow(f"hoster-tasks:backup1:{H3}", h3.guid, h3.createtxg,
                                                       h3.creation)]
    rep = world.replicator()
    sides = rep.list_sides([VM1])
    world.reset()
    rep.finish(VM1, sides)
    assert world.src.calls == [] and world.tgt.calls == []


def test_an_already_held_base_is_not_an_error(world: World) -> None:
    rep = world.replicator()
    rep.list_sides([VM3])  # probes both hosts before the transfer
    received(world, T_VM3, VM3, [H1, H2, H3])
    after = rep.list_sides([VM3])
    world.tgt.exact[("zfs", "hold", "hoster-tasks.backup1", f"{T_VM3}@{H3}")] = (
        1, "", f"cannot hold snapshot '{T_VM3}@{H3}': tag already exists on this dataset\n"
    )
    rep.finish(VM3, after)
    assert ["zfs", "set", "readonly=on", T_VM3] in world.tgt.calls


def test_target_keep_prunes_the_old_base_whose_hold_was_just_released(world: World) -> None:
    endpoint = world.endpoint.model_copy(update={"keep": {"hourly": 2}})
    rep = Replicator(NodeContext(world.settings, world.src, probe(world.src), world.redis), endpoint,
                     target_shell=world.tgt)
    rep.list_sides([VM1])  # probes both hosts before the transfer
    received(world, T_VM1, VM1, [H2, H3])
    after = rep.list_sides([VM1])
    world.reset()
    rep.finish(VM1, after)
    assert ["zfs", "release", "hoster-tasks.backup1", f"{T_VM1}@{H1}"] in world.tgt.calls
    assert ["zfs", "destroy", f"{T_VM1}@{H1}"] in world.tgt.calls  # 3 hourly, keep 2, H1 no longer held


def test_a_recorded_but_unheld_base_gets_its_hold(world: World) -> None:
    rep = world.replicator()
    received(world, T_VM3, VM3, [H1, H2, H3], **{"hoster-tasks:parent": NODE})
    world.src_model.datasets[VM3].props["hoster-tasks:base.backup1"] = str(guid(VM3, H3))
    after = rep.list_sides([VM3])
    world.reset()
    rep.finish(VM3, after)
    assert ["zfs", "hold", "hoster-tasks.backup1", f"{T_VM3}@{H3}"] in world.tgt.calls


# -- refusals ------------------------------------------------------------------------------------------------------


def test_a_target_owned_by_another_node_is_refused_before_anything_is_sent(world: World) -> None:
    world.tgt_model.datasets[T_WEB].props["hoster-tasks:parent"] = "node7"
    rep = world.replicator()
    sides = rep.list_sides([WEB])
    with pytest.raises(Permanent, match="belongs to node 'node7'"):
        rep.plan(WEB, sides)
    assert world.pipeline.transfers == []
    # each host: its probe, then its listing (the two hosts at the same time); nothing else ran anywhere
    assert len(commands(world.log)) == 4 and len(world.src.calls) == len(world.tgt.calls) == 2
    assert world.src.calls[0] == world.tgt.calls[0] == ["zfs"]
    assert world.src.calls[1][1] == world.tgt.calls[1][1] == "get"


def test_a_diverged_target_raises_and_nothing_destructive_runs(world: World) -> None:
    # someone snapshotted the copy after the common H1: history the source never had
    world.tgt_model.datasets[T_WEB].snaps.append(
        SnapRow("hourly_2024-05-06_11-00-00", guid(T_WEB, "local"), 330, 1_714_993_200)
    )
    rep = world.replicator()
    sides = rep.list_sides([WEB])
    with pytest.raises(Diverged, match="hourly_2024-05-06_11-00-00"):
        rep.plan(WEB, sides)
    assert world.pipeline.transfers == []
    assert destructive(world.log) == []
    assert {c[1] for c in commands(world.log) if len(c) > 1 and c[0] == "zfs"} == {"get"}


# -- the whole run (run_all) with a real redis-server for the locks -------------------------------------------------


@pytest.fixture
def real_redis(private_redis: Any) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(private_redis.url)
    try:
        yield client
    finally:
        client.close()


def replicate_many(rep: Any, datasets: list[str]) -> dict[str, Any]:
    """What a replicate-all job does, without Celery: one survey, then each dataset with work through the
    lifecycle its chain runs (lifecycle.advance and complete under its locks); failures stop one dataset."""
    from hoster_tasks.errors import HosterTasksError, Transient
    from hoster_tasks.replication.lifecycle import new_progress, replicate_one
    from hoster_tasks.replication.run_all import survey

    out: dict[str, Any] = {"results": [], "failed": [], "failed_datasets": [], "transient": False}
    found = survey(rep, datasets)
    assert found.listing_error is None
    for ds in datasets:
        try:
            out["results"].append(replicate_one(rep, ds) if ds in found.work
                                  else {**new_progress(rep.endpoint, ds), "complete": True})
        except HosterTasksError as exc:
            rep.record_failure(ds, str(exc))
            out["failed"].append(f"{ds}: {exc}")
            out["failed_datasets"].append(ds)
            out["transient"] |= isinstance(exc, Transient)
    return out


def test_replicate_many_end_to_end(world: World, real_redis: Any) -> None:
    world.redis = real_redis
    world.pipeline.on_success = apply_stream(world)
    script_estimates(world)
    rep = world.replicator()
    world.reset()

    out = replicate_many(rep, [VM1, WEB, VM3])

    assert out["failed"] == [], out["failed"]
    assert [r["action"] for r in out["results"]] == ["incremental", "incremental", "full"]
    # one listing per host for all three first (the two sides at once: their order is not fixed)
    assert sorted(world.log[:3], key=repr) == sorted([
        ("local", ["zfs", "get", "-Hp", "-r", "-o", "name,property,value", SRC_PROPS, VM1, WEB, VM3]),
        (TARGET, ["zfs"]),
        (TARGET, ["zfs", "get", "-Hp", "-r", "-o", "name,property,value", TGT_PROPS, T_VM1, T_WEB, T_VM3]),
    ], key=repr)
    assert [t.send for t in world.pipeline.transfers] == [
        ["zfs", "send", "-t", TOKEN],  # vm1: the interrupted receive first
        ["zfs", "send", "-w", "-I", f"{VM1}@{H2}", f"{VM1}@{H3}"],  # then on from what it completed
        ["zfs", "send", "-I", f"{WEB}@{H1}", f"{WEB}@{H3}"],
        ["zfs", "send", "-w", f"{VM3}@{H1}"],
        ["zfs", "send", "-w", "-I", f"{VM3}@{H1}", f"{VM3}@{H3}"],
    ]
    assert {tuple(t.remote_command) for t in world.pipeline.transfers} == {
        ("zfs", "receive", "-u", "-s", *MARKS, T_VM1), ("zfs", "receive", "-u", "-s", *MARKS, T_WEB),
        ("zfs", "receive", "-u", "-s", *MARKS, T_VM3),
    }
    assert destructive(world.log) == []
    assert ["zfs", "set", f"hoster-tasks:parent={NODE}", T_VM3] in world.tgt.calls
    # what each step sends is protected from retention before the send, its base recorded right after it
    vm3 = [argv for host, argv in world.log if host in ("local", "pipeline") and VM3 in " ".join(argv)
           and argv[1] in ("set", "send") and "-nP" not in argv]
    assert vm3[:6] == [  # (the scripted host keeps no property it is given: finish then sets the base again)
        ["zfs", "set", f"hoster-tasks:sending.{TARGET}={guid(VM3, H1)}", VM3],
        ["zfs", "send", "-w", f"{VM3}@{H1}", "|", *receive_stage(T_VM3)],
        ["zfs", "set", f"hoster-tasks:base.{TARGET}={guid(VM3, H1)}", VM3],
        ["zfs", "set", f"hoster-tasks:sending.{TARGET}={guid(VM3, H3)}", VM3],
        ["zfs", "send", "-w", "-I", f"{VM3}@{H1}", f"{VM3}@{H3}", "|", *receive_stage(T_VM3)],
        ["zfs", "set", f"hoster-tasks:base.{TARGET}={guid(VM3, H3)}", VM3],
    ]
    for ds in (VM1, WEB, VM3):
        assert real_redis.hget(keys.replication_state(NODE, ds, TARGET), "error") == b"0"


def test_replicate_many_a_diverged_target_runs_nothing_destructive(world: World, real_redis: Any) -> None:
    world.redis = real_redis
    world.tgt_model.datasets[T_WEB].snaps.append(
        SnapRow("hourly_2024-05-06_11-00-00", guid(T_WEB, "local"), 330, 1_714_993_200)
    )
    rep = world.replicator()
    world.reset()

    out = replicate_many(rep, [WEB])

    assert out["failed_datasets"] == [WEB] and out["transient"] is False
    assert "diverged" in out["failed"][0] and "hourly_2024-05-06_11-00-00" in out["failed"][0]
    assert world.pipeline.transfers == []
    assert destructive(world.log) == []
    assert {c[1] for c in commands(world.log) if len(c) > 1 and c[0] == "zfs"} == {"get"}
    assert real_redis.hget(keys.replication_state(NODE, WEB, TARGET), "error") == b"1"


def test_replicate_many_a_foreign_target_is_refused_before_anything_is_sent(world: World, real_redis: Any) -> None:
    world.redis = real_redis
    world.tgt_model.datasets[T_WEB].props["hoster-tasks:parent"] = "node7"
    rep = world.replicator()
    world.reset()

    out = replicate_many(rep, [WEB])

    assert out["failed_datasets"] == [WEB] and "belongs to node 'node7'" in out["failed"][0]
    assert world.pipeline.transfers == []
    assert {c[1] for c in commands(world.log) if len(c) > 1 and c[0] == "zfs"} == {"get"}


def test_a_foreign_target_with_a_resume_token_is_not_touched(world: World) -> None:
    world.tgt_model.datasets[T_VM1].props["hoster-tasks:parent"] = "node7"  # and the token is node7's
    world.tgt.exact[("zfs", "receive", "-A", T_VM1)] = OK
    world.pipeline.failures = [
        zfs_error(["zfs", "send", "-t", TOKEN], 1,
                  f"cannot resume send: '{VM1}@{H2}' used in the initial send no longer exists", "local")
    ]
    rep = world.replicator()
    world.reset()

    with pytest.raises(Permanent, match="belongs to node 'node7'"):
        rep.prepare(VM1)
    assert world.pipeline.transfers == []
    assert destructive(world.log) == []


def test_an_aborted_partial_full_receive_is_replaced_by_a_full_send(world: World) -> None:
    # vm3's first (full) receive was interrupted: the partial dataset exists, no snapshot yet, with a token
    world.tgt_model.add(T_VM3, [], encryption="aes-256-gcm", receive_resume_token=TOKEN)

    def abort(argv: list[str]) -> Answer:
        del world.tgt_model.datasets[argv[-1]]  # `receive -A` of a new dataset destroys the partial one
        return OK

    world.tgt.exact[("zfs", "receive", "-A", T_VM3)] = abort
    world.pipeline.failures = [
        zfs_error(["zfs", "send", "-t", TOKEN], 1,
                  f"cannot resume send: '{VM3}@{H1}' used in the initial send no longer exists", "local")
    ]
    rep = world.replicator()
    world.reset()

    sides, plan, _ = rep.prepare(VM3)

    assert ["zfs", "receive", "-A", T_VM3] in world.tgt.calls
    assert sides.target[T_VM3] is None
    assert plan.action is Action.FULL


# -- bookmarks: the base is bookmarked; a lost base snapshot is replaced by its bookmark ----------------------------


def test_a_moved_base_replaces_this_targets_bookmark_only(world: World) -> None:
    """The new base is bookmarked before the old base's bookmark goes; another target's bookmark stays."""
    h1 = world.src_model.snap(VM1, H1)
    row = world.src_model.datasets[VM1]
    row.bookmarks = [SnapRow(f"hoster-tasks:backup1:{H1}", h1.guid, h1.createtxg, h1.creation),
                     SnapRow(f"hoster-tasks:backup2:{H1}", h1.guid, h1.createtxg, h1.creation),
                     SnapRow("users-own", h1.guid, h1.createtxg, h1.creation)]
    rep = world.replicator()
    rep.list_sides([VM1])
    received(world, T_VM1, VM1, [H2, H3])
    after = rep.list_sides([VM1])
    assert [b.full for b in after.bookmarks[VM1]] == [f"{VM1}#{b.name}" for b in row.bookmarks]
    world.reset()

    rep.finish(VM1, after)

    marks = [c for c in world.src.calls if c[1] == "bookmark" or c[1] == "destroy"]
    assert marks == [
        ["zfs", "bookmark", f"{VM1}@{H3}", f"{VM1}#hoster-tasks:backup1:{H3}"],
        ["zfs", "destroy", f"{VM1}#hoster-tasks:backup1:{H1}"],
    ]


def test_a_base_destroyed_on_the_source_is_replaced_by_its_bookmark(world: World) -> None:
    """web's base H1 was destroyed by hand; its bookmark is left: -i #H1 @H2, then -I @H2 @H3."""
    web = world.src_model.datasets[WEB]
    h1 = web.snaps.pop(0)
    web.bookmarks = [SnapRow(f"hoster-tasks:backup1:{H1}", h1.guid, h1.createtxg, h1.creation)]
    world.pipeline.on_success = apply_stream(world)
    world.src.prefix[("zfs", "send", "-nP")] = (0, "size\t4096\n", "")
    rep = world.replicator()
    sides = rep.list_sides([WEB])
    plan = rep.plan(WEB, sides)
    assert [st.base.full if st.base else None for st in plan.steps] == [
        f"{WEB}#hoster-tasks:backup1:{H1}", f"{WEB}@{H2}"]
    for step in plan.steps:
        rep.send_step(WEB, step, sides)
    assert [t.send for t in world.pipeline.transfers] == [
        ["zfs", "send", "-i", f"{WEB}#hoster-tasks:backup1:{H1}", f"{WEB}@{H2}"],
        ["zfs", "send", "-I", f"{WEB}@{H2}", f"{WEB}@{H3}"],
    ]
    after = rep.list_sides([WEB])
    world.reset()
    rep.finish(WEB, after)
    # the old base is gone from the source: its hold is released on the target, by the target's name
    assert ["zfs", "release", "hoster-tasks.backup1", f"{T_WEB}@{H1}"] in world.tgt.calls
    assert not [c for c in world.src.calls if c[1] == "release"]


def test_a_recorded_base_without_its_bookmark_gets_one(world: World) -> None:
    """A run killed after recording the base and before bookmarking it: the next finish bookmarks it, and
    writes nothing more once the bookmark is there."""
    rep = world.replicator()
    received(world, T_VM3, VM3, [H1, H2, H3], **{"hoster-tasks:parent": NODE})
    row = world.src_model.datasets[VM3]
    row.props["hoster-tasks:base.backup1"] = str(guid(VM3, H3))
    for snap in row.snaps:
        snap.userrefs = 1 if snap.name == H3 else 0
    world.tgt_model.snap(T_VM3, H3).userrefs = 1
    rep.finish(VM3, rep.list_sides([VM3]))
    assert [c for c in world.src.calls if c[1:2] == ["bookmark"]] == [
        ["zfs", "bookmark", f"{VM3}@{H3}", f"{VM3}#hoster-tasks:backup1:{H3}"]]

    h3 = world.src_model.snap(VM3, H3)
    row.bookmarks = [SnapRow(f"hoster-tasks:backup1:{H3}", h3.guid, h3.createtxg, h3.creation)]
    after = rep.list_sides([VM3])
    world.reset()
    rep.finish(VM3, after)
    assert [c for c in world.src.calls if c[1:2] in (["bookmark"], ["destroy"], ["set"], ["hold"])] == []


def test_list_sides_parses_each_sides_listing_once(world: World, monkeypatch: Any) -> None:
    """Before: the source listing was parsed again for every dataset (quadratic: 0.6 s for 200 VMs)."""
    from hoster_tasks.replication import replicator as replicator_mod

    calls: list[int] = []
    real = replicator_mod.snapshots_from_get
    monkeypatch.setattr(replicator_mod, "snapshots_from_get", lambda props: calls.append(len(props)) or real(props))
    rep = world.replicator()
    sides = rep.list_sides([VM1, WEB, VM3])
    assert len(calls) == 2  # one per side
    assert set(sides.source) == {VM1, WEB, VM3} and all(sides.source.values())
