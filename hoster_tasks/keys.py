"""Every Redis key this system uses, in one place (arq style).

Keys are namespaced by node as well as dataset: the same dataset name exists on a source and on its
replication target, and the two must lock independently.
"""

PREFIX = "hoster"

NODES_SET = f"{PREFIX}:nodes"  # names of every node that ever registered
NODE_TTL_FACTOR = 3  # a node key lives this many heartbeats


def node(name: str) -> str:
    """Hash with a live node's facts (queue, datasets, vms); expires when its heartbeat stops."""
    return f"{PREFIX}:node:{name}"


def node_queue(name: str) -> str:
    """The Celery queue a node's worker consumes."""
    return f"{PREFIX}.node.{name}"


CONTROL_QUEUE = f"{PREFIX}.control"  # fan-out tasks from beat; every worker consumes it


def dataset_lock(node_name: str, dataset: str) -> str:
    return f"{PREFIX}:lock:{node_name}:{dataset}"


def snapshot_lock(node_name: str, dataset: str) -> str:
    """Held through a rollback (locks.LockSpec.kind "snapshot"): snapshot jobs do not start meanwhile."""
    return f"{PREFIX}:snaplock:{node_name}:{dataset}"


def snapshot_takers(node_name: str, dataset: str) -> str:
    """Sorted set: the snapshot jobs taking a snapshot of the dataset now, scored by lease expiry (locks.py)."""
    return f"{PREFIX}:snaptakers:{node_name}:{dataset}"


def lock_key(kind: str, node_name: str, dataset: str) -> str:
    return snapshot_lock(node_name, dataset) if kind == "snapshot" else dataset_lock(node_name, dataset)


def lock_fence(node_name: str, dataset: str, kind: str = "dataset") -> str:
    """Counter INCRed on every acquire: a fencing token for destructive steps."""
    name = "fence" if kind == "dataset" else f"fence-{kind}"
    return f"{PREFIX}:{name}:{node_name}:{dataset}"


def dataset_state(node_name: str, dataset: str) -> str:
    """Hash: last snapshot time/name, last error (shown by `status`, exported as metrics)."""
    return f"{PREFIX}:state:{node_name}:{dataset}"


def replication_state(node_name: str, dataset: str, target: str) -> str:
    """Hash: last success, bytes, duration, failures, lag for one dataset and target."""
    return f"{PREFIX}:repl:{node_name}:{dataset}:{target}"


def running_jobs(node_name: str) -> str:
    """Hash task_id -> the job running on a node (and the request that re-runs it): see jobs.py."""
    return f"{PREFIX}:running:{node_name}"


FENCE_TTL_SECONDS = 30 * 24 * 3600  # a fence outlives any lease by far; a retired dataset's goes away


def job_alive(task_id: str) -> str:
    """The job's lease, holding the running delivery's lease id; renewed by the worker process running it.
    Gone while the job's entry remains: the job is lost."""
    return f"{PREFIX}:job-alive:{task_id}"


def job_requeued(task_id: str) -> str:
    """The id of the job that re-runs a lost one (`task_id` is the id a client waits on)."""
    return f"{PREFIX}:job-requeued:{task_id}"


REQUEUED_TTL_SECONDS = 7 * 24 * 3600


def job_queue(job_id: str) -> str:
    """List: the datasets of a replicate-all job not yet taken by one of its lanes (tasks/replicate_all.py)."""
    return f"{PREFIX}:job-queue:{job_id}"


def job_results(job_id: str) -> str:
    """Hash dataset -> outcome (JSON) of each dataset a replicate-all job sent; its chord's callback reads it."""
    return f"{PREFIX}:job-results:{job_id}"


JOB_TTL_SECONDS = 7 * 24 * 3600  # a job's queue and results outlive any run of it


def deferred_prunes(node_name: str, dataset: str) -> str:
    """Hash stype -> keep: retention a snapshot job could not run while the dataset was replicating."""
    return f"{PREFIX}:prune-deferred:{node_name}:{dataset}"


DEFERRED_PRUNE_TTL_SECONDS = 7 * 24 * 3600  # by then the schedule's own runs have pruned it


def fanout_checkin(fanout_id: str) -> str:
    """Hash: the Sentry Crons check-in a beat fan-out took over (slug, check-in id, start, failures)."""
    return f"{PREFIX}:fanout:{fanout_id}"


def fanout_pending(fanout_id: str) -> str:
    """Set: the nodes whose job of that fan-out has not ended for good yet (the last one closes the check-in)."""
    return f"{PREFIX}:fanout:{fanout_id}:pending"


# State hashes (dataset_state, replication_state) live this long after their last write, so a retired VM's
# state goes away by itself; every write refreshes it.
STATE_TTL_SECONDS = 30 * 24 * 3600


def dataset_state_index(node_name: str) -> str:
    """Sorted set of a node's datasets that have a dataset_state hash, scored by its last write (unix time):
    `status` and `metrics` read these instead of scanning the keyspace. Same TTL as the hashes."""
    return f"{PREFIX}:index:state:{node_name}"


def replication_state_index(node_name: str) -> str:
    """Sorted set of `replication_member(dataset, target)` for a node's replication_state hashes, scored by
    the last write. Same TTL as the hashes."""
    return f"{PREFIX}:index:repl:{node_name}"


def replication_member(dataset: str, target: str) -> str:
    """A tab never occurs in a dataset or node name (names.py), so the pair splits back unambiguously."""
    return f"{dataset}\t{target}"


def parse_replication_member(member: str) -> tuple[str, str]:
    dataset, _, target = member.partition("\t")
    return dataset, target


NODES_SEEN = f"{PREFIX}:nodes:seen"  # sorted set: node name scored by its last heartbeat (outlives the node key)


def node_keys(name: str) -> list[str]:
    """The registry and per-node index keys `node forget` removes (with the state hashes the indexes name)."""
    return [node(name), running_jobs(name), dataset_state_index(name), replication_state_index(name)]


# Beat (celery-redbeat). RedBeat names its own keys from this prefix: `<prefix><entry name>` per entry,
# `<prefix>:schedule` and `<prefix>:statics`. The lock starts with the prefix, so RedBeat takes it as is
# (no entry is named "lock": entries are snapshot-<name> and replicate-<name>).
BEAT_KEY_PREFIX = f"{PREFIX}:beat:"
BEAT_LOCK = f"{BEAT_KEY_PREFIX}lock"  # held by the beat that fires; a standby waits for it
BEAT_MISSED = f"{PREFIX}:beat-missed"  # hash entry name -> slots no beat fired (counted when it next fires)


def vm_owner(vm_name: str) -> str:
    """Hash {parent, previous, at}: written by `vm change-parent` (a failover). The previous parent reads it
    to know its own copy is stale (hoster_tasks/failover.py)."""
    return f"{PREFIX}:vm-owner:{vm_name}"
