"""The state hashes that `status` and `metrics` show: written with a TTL and an index, read through the index.

Writers (snapshot and replication jobs) add each hash's name to a per-node sorted set scored by the time of
the write, refresh the hash's TTL and drop index entries older than the TTL (their hashes are gone too).
Readers take the index and read exactly those hashes: the cost follows the number of VMs and targets, never
the size of the keyspace (Celery's result keys live in the same Redis).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

import redis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from hoster_tasks import keys


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(fields: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    """As redis-py's `hset` types its mapping (a dict's key type is invariant: dict[str, str] is not one)."""
    return {k: v for k, v in fields.items()}


def _index(pipe: Pipeline, key: str, index: str, member: str, now: float) -> None:
    """The writes that go with every state write, in the same pipeline (MULTI) as the write itself."""
    pipe.expire(key, keys.STATE_TTL_SECONDS)
    pipe.zadd(index, {member: now})
    pipe.zremrangebyscore(index, "-inf", now - keys.STATE_TTL_SECONDS)
    pipe.expire(index, keys.STATE_TTL_SECONDS)


def record_dataset(pipe: Pipeline, node: str, dataset: str, fields: Mapping[str, str], now: float) -> None:
    key = keys.dataset_state(node, dataset)
    pipe.hset(key, mapping=_fields(fields))
    _index(pipe, key, keys.dataset_state_index(node), dataset, now)


def record_replication(
    pipe: Pipeline, node: str, dataset: str, target: str, fields: Mapping[str, str],
    counters: Mapping[str, int], now: float,
) -> None:
    key = keys.replication_state(node, dataset, target)
    pipe.hset(key, mapping=_fields(fields))
    for name, by in counters.items():
        pipe.hincrby(key, name, by)
    _index(pipe, key, keys.replication_state_index(node), keys.replication_member(dataset, target), now)


def _hashes(client: redis.Redis, names: list[str]) -> list[dict[str, str]]:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    return [{_text(k): _text(v) for k, v in raw.items()} for raw in pipe.execute()]


def _members(client: redis.Redis, index: str) -> list[str]:
    return sorted(_text(m) for m in cast("list[bytes | str]", client.zrange(index, 0, -1)))


def dataset_states(client: redis.Redis, node: str, datasets: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
    """dataset -> its state hash, for `datasets` (default: every dataset in the node's index). Hashes that
    expired are left out."""
    names = _members(client, keys.dataset_state_index(node)) if datasets is None else list(datasets)
    found = _hashes(client, [keys.dataset_state(node, ds) for ds in names])
    return {ds: h for ds, h in zip(names, found, strict=True) if h}


def replication_states(client: redis.Redis, node: str) -> dict[tuple[str, str], dict[str, str]]:
    """(dataset, target) -> its replication state hash, from the node's index. Expired hashes are left out."""
    pairs = [keys.parse_replication_member(m) for m in _members(client, keys.replication_state_index(node))]
    found = _hashes(client, [keys.replication_state(node, ds, target) for ds, target in pairs])
    return {pair: h for pair, h in zip(pairs, found, strict=True) if h}
