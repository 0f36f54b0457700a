"""Every path production takes on OpenZFS, run on real OpenZFS 2.3 (the guest) through the CLI on the host
and real workers inside the guest: raw sends of encrypted VMs, resumable receives, the stall watchdog,
holds and bookmarks, atomic snapshots, `send -nP` progress, the capability probe, the safety rules, and
the failover of an encrypted copy.

One bed for the module, because a worker takes half a minute to start under TCG: a source pool and a target
pool, the source node's worker (`ozfs-src`, VMs under <src>/vm-encrypted, <src>/vm-plain and <src>/vm) and
the backup node's (`ozfs-dst`, holding the copies). Each test works on VMs of its own. The data path is
production's `zfs send | pv | ssh zfs receive` to the guest's own sshd (see tests/harness/openzfs.py).
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from harness import RedisServer
from harness.openzfs import (
    GUEST_SRC,
    GUEST_VENV_PYTHON,
    Guest,
    GuestPool,
    GuestPoolFactory,
    GuestWorker,
    GuestWorkerFactory,
    endpoint,
)
from harness.proc import wait_until

from hoster_tasks import keys
from hoster_tasks.nodes import PARTLY_RECEIVED, live_nodes
from hoster_tasks.zfs.ops import hold_tag

TARGET, BACK = "ozfs-target", "ozfs-back"  # the source's target; the backup node's way back
SRC_NODE, DST_NODE = "ozfs-src", "ozfs-dst"
ENC, PLAIN, VMS = "vm-encrypted", "vm-plain", "vm"  # the seed keeps VMs on zroot/vm-encrypted
ROOTS = (ENC, PLAIN, VMS)
KEY_FILE = "/root/vm-encrypted.key"
KEY_LOCATION = f"file://{KEY_FILE}"
STATES = "/root/vm-states.json"  # vm_control=file: the VMs' running states, shared by both workers
STALL = 20  # seconds without a byte: a stalled transfer (generous: a resumed send under TCG pauses ~10 s)
# Timeouts for a TCG guest on a busy 2-core host: a slow answer is not a lost link here.
SLOW_LINK = {"keepalive_seconds": 15, "connect_timeout": 30, "stall_seconds": STALL}


@dataclass
class Bed:
    guest: Guest
    src: GuestPool
    dst: GuestPool
    workers: GuestWorkerFactory
    src_worker: GuestWorker
    dst_worker: GuestWorker
    redis_url: str

    def registered_parent(self, node: str, vm: str) -> str | None:
        """The parent `node`'s heartbeat last published for `vm` (what the CLI routes by)."""
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            nodes = {n.name: n for n in live_nodes(client)}
        finally:
            client.close()
        found = [v.parent for v in nodes[node].vms if v.name == vm] if node in nodes else []
        return found[0] if found else None

    def vm(self, root: str, name: str, mib: int = 0) -> tuple[str, str]:
        """One of the bed's VMs (see BED_VMS), with `mib` MiB more data, and the name its copy has."""
        assert (root, name) in BED_VMS
        ds = self.src.ds(f"{root}/{name}")
        if mib:
            self.guest.write_random(ds, mib)
        return ds, self.dst.ds(f"{root}/{name}")


# Made before the workers start, so their first heartbeat registers them (a VM made later is unknown
# until a heartbeat under TCG has listed it again). Each test has its own.
MANY = tuple(f"many{i:02d}" for i in range(20))
BED_VMS = (
    (ENC, "secret1"), (ENC, "secret2"), (PLAIN, "web1"),
    *((VMS, n) for n in ("resume1", "stall1", "marks1", "safe1", *MANY)),
)


def _node_env(mine: GuestPool, other: GuestPool, target: str, **extra: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "HOSTER_DATASETS": [mine.ds(r) for r in ROOTS],
        "HOSTER_TARGETS": [endpoint(target, {mine.ds(r): other.ds(r) for r in ROOTS}, **SLOW_LINK)],
        "HOSTER_HEARTBEAT_SECONDS": 2,
        "HOSTER_LOCK_WAIT_SECONDS": 30,
        "HOSTER_LOCK_LEASE_SECONDS": 60,
        "HOSTER_RETRY_MAX": 6,
        "HOSTER_RETRY_BACKOFF_MAX_SECONDS": 2,
        "HOSTER_VM_CONTROL": "file",
        "HOSTER_VM_STATE_FILE": STATES,
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def bed(openzfs_guest: Guest, redis_server: RedisServer) -> Iterator[Bed]:
    assert redis_server.port is not None
    g = openzfs_guest
    g.redis_target(redis_server.port)
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()  # once, before the workers start (a flush later would drop their queue bindings)
    client.close()
    pools = GuestPoolFactory(g)
    workers = GuestWorkerFactory(g, redis_server.url)
    try:
        src, dst = pools(size="3G"), pools(size="3G")
        g.sh(f"head -c 24 /dev/urandom | base64 > {KEY_FILE}; chmod 600 {KEY_FILE}")
        g.run(["sh", "-c", f"echo '{{\"vms\": {{}}}}' > {STATES}"])
        src.create_dataset(ENC, {"encryption": "on", "keyformat": "passphrase", "keylocation": KEY_LOCATION})
        for root in (PLAIN, VMS):
            src.create_dataset(root)
        for root in ROOTS:
            dst.create_dataset(root)
        g.sh("; ".join(f"zfs create {shlex.quote(src.ds(f'{root}/{name}'))}" for root, name in BED_VMS))
        src_worker = workers(SRC_NODE, _node_env(src, dst, TARGET))
        dst_worker = workers(DST_NODE, _node_env(dst, src, BACK, HOSTER_VM_KEY_LOCATION=KEY_LOCATION))
        yield Bed(g, src, dst, workers, src_worker, dst_worker, redis_server.url)
    finally:
        try:
            workers.cleanup()
        finally:
            pools.cleanup()


@pytest.fixture
def ozfs(bed: Bed, request: pytest.FixtureRequest) -> Iterator[Bed]:
    """The bed, with the workers' logs under a failure."""
    yield bed
    for when in ("call", "setup"):
        report = getattr(request.node, f"rep_{when}", None)
        if report is not None and report.failed:
            report.sections.append(("guest worker logs", bed.workers.log_tails(120)))
            return


# -- helpers ----------------------------------------------------------------------------------------------
def guids(guest: Guest, dataset: str) -> dict[str, str]:
    """{short snapshot name: guid}, oldest first."""
    out = guest.zfs("list", "-H", "-p", "-t", "snapshot", "-o", "name,guid", "-s", "createtxg", "-d", "1", dataset)
    return {name.split("@", 1)[1]: guid for name, guid in (line.split("\t") for line in out.splitlines())}


def prop(guest: Guest, dataset: str, name: str) -> str:
    return guest.zfs("get", "-H", "-o", "value", name, dataset).strip()


def holds(guest: Guest, snapshot: str) -> list[str]:
    """The hold tags on a snapshot, read with `zfs holds`."""
    return [line.split("\t")[1] for line in guest.zfs("holds", "-H", snapshot).splitlines() if line.strip()]


def bookmarks(guest: Guest, dataset: str) -> dict[str, str]:
    """{bookmark name: guid}."""
    out = guest.zfs("list", "-H", "-p", "-t", "bookmark", "-o", "name,guid", "-d", "1", dataset)
    return {name.split("#", 1)[1]: guid for name, guid in (line.split("\t") for line in out.splitlines())}


def stream_size(guest: Guest, snapshot: str, base: str | None = None) -> int:
    """What `zfs send -nP` says the stream is."""
    out = guest.zfs("send", "-nP", *(["-i", base] if base else []), snapshot)
    return int(re.findall(r"^size\s+(\d+)$", out, re.M)[-1])


def cut_stream(guest: Guest, send: list[str], target: str, nbytes: int) -> None:
    """A transfer cut after `nbytes`: `zfs send ... | head -c N | zfs receive -s -u target` (as the note's
    verification did); the receive fails and keeps a resume token."""
    script = f"{shlex.join(['zfs', 'send', *send])} | head -c {nbytes} | zfs receive -s -u {shlex.quote(target)}"
    assert guest.run(["sh", "-c", script], check=False, timeout=300).returncode != 0
    assert prop(guest, target, "receive_resume_token") not in ("-", "")


def ok_json(res: Any) -> dict[str, Any]:
    assert res.returncode == 0, res.stderr + res.stdout
    return dict(json.loads(res.stdout))


def snap(cli: Callable[..., Any], vm: str, keep: int = 10) -> None:
    res = cli("snapshot", "new", vm, "--stype", "hourly", "--keep", str(keep), "--json")
    assert res.returncode == 0, res.stderr + res.stdout


def replicate(cli: Callable[..., Any], vm: str, *extra: str) -> dict[str, Any]:
    return ok_json(cli("vm", "replicate", vm, "--endpoint", TARGET, "--json", *extra))


def newest(guest: Guest, dataset: str) -> str:
    return list(guids(guest, dataset))[-1]


# -- the probe ----------------------------------------------------------------------------------------------
def test_the_probe_reads_real_openzfs(ozfs: Bed) -> None:
    """The capability probe, run in the guest on the real `zfs` usage text, locally and over SSH."""
    script = (
        "from hoster_tasks.settings import Endpoint\n"
        "from hoster_tasks.zfs.probe import OPENZFS2, probe\n"
        "from hoster_tasks.zfs.shell import LocalShell, shell_for\n"
        f"ep = Endpoint(**{endpoint(TARGET, connect_timeout=30)!r})\n"
        "print(probe(LocalShell()) == OPENZFS2, probe(shell_for(ep)) == OPENZFS2)\n"
    )
    out = ozfs.guest.run(["env", f"PYTHONPATH={GUEST_SRC}", GUEST_VENV_PYTHON, "-c", script], timeout=300)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr


# -- encrypted VMs go raw, beside plain ones ------------------------------------------------------------------
def test_an_encrypted_vm_goes_raw_beside_a_plain_one(ozfs: Bed, cli: Callable[..., Any]) -> None:
    g = ozfs.guest
    secret, copy_secret = ozfs.vm(ENC, "secret1", 2)
    web, copy_web = ozfs.vm(PLAIN, "web1", 2)
    for vm in ("secret1", "web1"):
        snap(cli, vm)
    first = ok_json(cli("vm", "replicate-all", "--endpoint", TARGET, "--filter", "secret1,web1", "--json"))
    assert sorted((r["dataset"], r["action"]) for r in first["results"]) == [(secret, "full"), (web, "full")], first
    # encrypted on the target with no key there: only a raw send (-w) gives that; no key left the source
    assert prop(g, copy_secret, "encryption") == "aes-256-gcm"
    assert prop(g, copy_secret, "keystatus") == "unavailable"
    assert prop(g, copy_web, "encryption") == "off"

    for ds, vm in ((secret, "secret1"), (web, "web1")):
        g.write_random(ds, 1)
        snap(cli, vm)
    second = ok_json(cli("vm", "replicate-all", "--endpoint", TARGET, "--filter", "secret1,web1", "--json"))
    assert sorted(r["action"] for r in second["results"]) == ["incremental", "incremental"], second
    assert guids(g, copy_secret) == guids(g, secret) and len(guids(g, secret)) == 2
    assert guids(g, copy_web) == guids(g, web)
    assert prop(g, copy_secret, "keystatus") == "unavailable"  # the incremental went raw too

    # the data, once the key is loaded, on a scratch clone of the copy's newest snapshot
    g.zfs("load-key", "-L", KEY_LOCATION, copy_secret)
    try:
        scratch = ozfs.dst.ds("scratch-secret1")
        g.zfs("clone", "-o", f"mountpoint={ozfs.dst.mountpoint}/scratch-secret1",
              f"{copy_secret}@{newest(g, copy_secret)}", scratch)
        assert g.sha256_files(scratch) == g.sha256_files(secret)
        g.zfs("destroy", scratch)
    finally:
        g.zfs("unload-key", copy_secret)
    assert prop(g, copy_secret, "keystatus") == "unavailable"


# -- resumable receives ----------------------------------------------------------------------------------------
def test_a_cut_transfer_resumes_from_its_token_and_a_stale_token_is_aborted(
    ozfs: Bed, cli: Callable[..., Any]
) -> None:
    g = ozfs.guest
    vm, copy = ozfs.vm(VMS, "resume1", 8)
    snap(cli, "resume1")
    first = newest(g, vm)
    full = stream_size(g, f"{vm}@{first}")

    # a first replication cut after 3 MB (by a receive that did not mark the copy): the backup node lists it
    # as a partly received copy, not as its own VM, so the CLI still routes resume1's jobs to its parent
    cut_stream(g, [f"{vm}@{first}"], copy, 3_000_000)
    wait_until(lambda: ozfs.registered_parent(DST_NODE, "resume1") is not None, 60, "a heartbeat to list the copy")
    assert ozfs.registered_parent(DST_NODE, "resume1") == PARTLY_RECEIVED
    # the next run resumes with send -t and sends only the rest
    resumed = replicate(cli, "resume1")
    assert 0 < resumed["resumed"] < full - 2_500_000, (resumed, full)
    assert prop(g, copy, "receive_resume_token") == "-"
    assert guids(g, copy) == guids(g, vm)

    # an incremental cut, then its snapshot destroyed on the source: the token is aborted (receive -A)
    # and the run re-plans from the common snapshot, sending nothing from zero
    g.write_random(vm, 4)
    snap(cli, "resume1")
    second = newest(g, vm)
    cut_stream(g, ["-i", f"{vm}@{first}", f"{vm}@{second}"], copy, 1_000_000)
    g.write_random(vm, 1)
    snap(cli, "resume1")
    g.zfs("destroy", f"{vm}@{second}")
    again = replicate(cli, "resume1")
    assert again["action"] == "incremental" and not again.get("resumed"), again
    assert again["bytes"] < full, again
    assert prop(g, copy, "receive_resume_token") == "-"
    assert guids(g, copy) == guids(g, vm) and second not in guids(g, copy)


def test_a_stalled_transfer_is_stopped_retried_and_resumed(ozfs: Bed, cli: Callable[..., Any]) -> None:
    """The link stalls (its local end frozen, SIGSTOP): no byte moves for stall_seconds while the locks are
    renewed as ever. The watchdog stops the transfer, the step is retried and resumes from the token."""
    g = ozfs.guest
    vm, copy = ozfs.vm(VMS, "stall1", 10)
    snap(cli, "stall1")
    done: list[Any] = []
    published: set[str | None] = set()  # what the backup node's heartbeats said stall1's parent was
    thread = threading.Thread(target=lambda: done.append(
        cli("vm", "replicate", "stall1", "--endpoint", TARGET, "--speed-limit", "1", "--json", timeout=600)))
    thread.start()
    receive = f"zfs receive -u -s -o hoster-tasks:parent={SRC_NODE} -o readonly=on {copy}"  # marked as made
    wait_until(lambda: bool(g.pgrep(f"^{receive}$")), 180, "the receive to start", interval=0.5)
    time.sleep(3)  # some bytes on their way
    assert g.pkill(f"^ssh .*{receive}$", "STOP") == 1
    while thread.is_alive():  # the cut copy, until resumed, is listed as the source's, never the backup's
        published.add(ozfs.registered_parent(DST_NODE, "stall1"))
        thread.join(0.5)
    assert done, "the replication did not end"
    assert published <= {None, SRC_NODE}, published
    result = ok_json(done[0])
    assert result["resumed"] > 0, result
    assert guids(g, copy) == guids(g, vm)
    assert f"no progress for {STALL} s" in ozfs.src_worker.log_tail(2000)


# -- holds, bookmarks, retention, progress ---------------------------------------------------------------
def test_holds_and_bookmarks_follow_the_base_and_a_bookmark_replaces_a_lost_base(
    ozfs: Bed, cli: Callable[..., Any]
) -> None:
    g = ozfs.guest
    vm, copy = ozfs.vm(VMS, "marks1", 3)
    tag = hold_tag(TARGET)
    snap(cli, "marks1")
    b1 = newest(g, vm)

    # progress: a percentage from `send -nP`'s estimate, drawn while the transfer runs
    res = cli("vm", "replicate", "marks1", "--endpoint", TARGET, "--speed-limit", "1")
    assert res.returncode == 0, res.stderr + res.stdout
    shown = [float(p) for p in re.findall(r"\]\s+([\d.]+)%", res.stdout + res.stderr)]
    assert any(0 < p < 100 for p in shown) and shown[-1] == 100.0, res.stdout + res.stderr
    assert holds(g, f"{vm}@{b1}") == [tag] and holds(g, f"{copy}@{b1}") == [tag]
    assert bookmarks(g, vm) == {f"hoster-tasks:{TARGET}:{b1}": guids(g, vm)[b1]}

    g.write_random(vm, 1)
    snap(cli, "marks1")
    b2 = newest(g, vm)
    replicate(cli, "marks1")
    assert holds(g, f"{vm}@{b1}") == [] and holds(g, f"{copy}@{b1}") == []
    assert holds(g, f"{vm}@{b2}") == [tag] and holds(g, f"{copy}@{b2}") == [tag]
    assert bookmarks(g, vm) == {f"hoster-tasks:{TARGET}:{b2}": guids(g, vm)[b2]}

    # retention with keep 1 spares the held base, and destroys the rest in one `zfs destroy ds@a,b,c`
    snap(cli, "marks1")
    snap(cli, "marks1")
    snap(cli, "marks1", keep=1)
    b3 = newest(g, vm)
    assert list(guids(g, vm)) == [b2, b3]

    # the base destroyed by hand on the source (its hold released first): its bookmark is the base now
    g.zfs("release", tag, f"{vm}@{b2}")
    g.zfs("destroy", f"{vm}@{b2}")
    res_json = replicate(cli, "marks1")
    assert res_json["action"] == "incremental", res_json
    assert res_json["bytes"] < stream_size(g, f"{vm}@{b3}") / 2, res_json  # not the whole dataset again
    assert holds(g, f"{vm}@{b3}") == [tag] and holds(g, f"{copy}@{b3}") == [tag]
    assert bookmarks(g, vm) == {f"hoster-tasks:{TARGET}:{b3}": guids(g, vm)[b3]}
    # the target mirrors the source's pruning (b1 and the old base b2, its hold released by the target's
    # own listing) in one list destroy
    assert sorted(res_json["pruned_on_target"]) == sorted([f"{copy}@{b1}", f"{copy}@{b2}"]), res_json
    assert guids(g, copy) == guids(g, vm) == {b3: guids(g, vm)[b3]}


# -- the safety scenarios, on OpenZFS ---------------------------------------------------------------------
def test_a_diverged_target_is_refused_intact_and_a_copy_is_never_a_source(
    ozfs: Bed, cli: Callable[..., Any], app: Any
) -> None:
    g = ozfs.guest
    vm, copy = ozfs.vm(VMS, "safe1", 2)
    snap(cli, "safe1")
    replicate(cli, "safe1")

    g.zfs("snapshot", f"{copy}@someone-elses")  # the copy went its own way
    g.write_random(vm, 1)
    snap(cli, "safe1")
    before = guids(g, copy)
    res = cli("vm", "replicate", "safe1", "--endpoint", TARGET, "--json")
    assert res.returncode != 0 and "diverged" in res.stderr + res.stdout, res.stderr + res.stdout
    assert guids(g, copy) == before and "someone-elses" in before

    # every task sent straight to the backup node about its copy is refused, and nothing changes
    copy_before, vm_before = guids(g, copy), guids(g, vm)
    queue = keys.node_queue(DST_NODE)
    sent = {
        "take": app.send_task("hoster.snapshot.take", args=["safe1", "custom", 1], queue=queue),
        "destroy": app.send_task("hoster.snapshot.destroy", args=[f"{copy}@{next(iter(copy_before))}"],
                                 queue=queue),
        "replicate": app.send_task("hoster.replication.replicate", args=["safe1", BACK], queue=queue),
    }
    for what, result in sent.items():
        result.get(timeout=180, propagate=False)
        assert result.state == "FAILURE", what
        assert "backup copy" in str(result.result), (what, result.result)
    assert guids(g, copy) == copy_before and guids(g, vm) == vm_before


# -- snapshot all: one atomic call ----------------------------------------------------------------------------
def test_snapshot_all_of_twenty_vms_is_one_atomic_call(ozfs: Bed, cli: Callable[..., Any]) -> None:
    g = ozfs.guest
    names = MANY
    res = cli("snapshot", "all", "--stype", "daily", "--keep", "5", "--node", SRC_NODE, "--json")
    assert res.returncode == 0, res.stderr + res.stdout
    out = g.zfs("list", "-H", "-p", "-t", "snapshot", "-o", "name,createtxg", "-r", ozfs.src.name)
    rows = [line.split("\t") for line in out.splitlines() if "@daily_" in line]
    assert {r[0].split("@")[0].rsplit("/", 1)[1] for r in rows} >= set(names)
    assert len({r[1] for r in rows}) == 1, rows  # one transaction group: one `zfs snapshot a@s b@s ...`


# -- failover of an encrypted copy (last: it retires the source node) -----------------------------------------
def test_an_encrypted_copy_fails_over_with_its_key(ozfs: Bed, cli: Callable[..., Any]) -> None:
    g = ozfs.guest
    vm, copy = ozfs.vm(ENC, "secret2", 2)
    snap(cli, "secret2")
    replicate(cli, "secret2")
    assert prop(g, copy, "keystatus") == "unavailable"

    # the parent is lost; the copy on the backup node becomes the VM, its key loaded from vm_key_location
    ozfs.src_worker.stop()
    client = redis.Redis.from_url(ozfs.src_worker.redis_url)
    wait_until(lambda: not client.exists(keys.node(SRC_NODE)), 60, "the old parent to drop out of the registry")
    moved = cli("vm", "change-parent", "secret2", "--node", DST_NODE, "--start", "--json")
    assert moved.returncode == 0, moved.stderr + moved.stdout
    assert prop(g, copy, "keystatus") == "available"
    assert prop(g, copy, "readonly") == "off"
    assert prop(g, copy, "mounted") == "yes"
    assert prop(g, copy, "hoster-tasks:parent") == DST_NODE
    assert g.sha256_files(copy) == g.sha256_files(vm)
    assert json.loads(g.read_file(STATES))["vms"]["secret2"] == "running"
