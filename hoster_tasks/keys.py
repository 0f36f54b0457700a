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


LOCK_PATTERN = f"{PREFIX}:lock:*"


def lock_fence(node_name: str, dataset: str) -> str:
    """Counter INCRed on every acquire: a fencing token for destructive steps."""
    return f"{PREFIX}:fence:{node_name}:{dataset}"


def dataset_state(node_name: str, dataset: str) -> str:
    """Hash: last snapshot time/name, last error (shown by `status`, exported as metrics)."""
    return f"{PREFIX}:state:{node_name}:{dataset}"


def replication_state(node_name: str, dataset: str, target: str) -> str:
    """Hash: last success, bytes, duration, failures, lag for one dataset and target."""
    return f"{PREFIX}:repl:{node_name}:{dataset}:{target}"


STATE_PATTERN = f"{PREFIX}:state:*"
REPLICATION_PATTERN = f"{PREFIX}:repl:*"


def running_jobs(node_name: str) -> str:
    """Hash task_id -> description of jobs running on a node right now."""
    return f"{PREFIX}:running:{node_name}"
