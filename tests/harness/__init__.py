"""Integration-test harness: real redis-server, zfs-fuse pools, network-namespace nodes with sshd,
Celery worker processes and a local Sentry sink. The pytest fixtures are in tests/conftest.py."""

from .netns import Node, NodeFactory, NodeNetwork
from .proc import HarnessError
from .redis_server import RedisServer
from .sentry_sink import SentryItem, SentrySink
from .workers import Worker, WorkerFactory, worker_available
from .zfs import Pool, PoolFactory, Snapshot, ZfsFuse

__all__ = [
    "HarnessError",
    "Node",
    "NodeFactory",
    "NodeNetwork",
    "Pool",
    "PoolFactory",
    "RedisServer",
    "SentryItem",
    "SentrySink",
    "Snapshot",
    "Worker",
    "WorkerFactory",
    "ZfsFuse",
    "worker_available",
]
