"""One way to build a Redis client: a plain `redis://` / `rediss://` / `unix://` URL, or Redis Sentinel.

A Sentinel URL has kombu's form (its SentinelChannel, and Celery's SentinelBackend), one `sentinel://` URL
per sentinel, separated by `;`, plus the master's name as a query parameter:

    sentinel://[:password@]10.0.0.1:26379;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379/0?master_name=hoster

The password (and user name) and the database of the first URL are the master's, as in kombu. The client
returned is redis-py's `Sentinel.master_for(...)`: every new connection asks the sentinels for the current
master, and a connection to a demoted master fails (READONLY) and is re-resolved, so the locks, the node
registry and the state follow a failover by themselves. Celery gets the same sentinels and master name
(`celery_urls`), so the broker, the result backend, beat's lock and this code all use one master.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel"
_SEPARATOR = ";"


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed `sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def celery_url(self) -> str:
        """kombu's form without our query (kombu and Celery would hand it to redis-py as connection options)."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        parts = [f"{SENTINEL_SCHEME}://{auth if i == 0 else ''}{h}:{p}" for i, (h, p) in enumerate(self.sentinels)]
        return _SEPARATOR.join(parts) + f"/{self.db}"


def is_sentinel(url: str) -> bool:
    return url.startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Raises ValueError naming what is wrong (settings report it)."""
    base, _, query = url.partition("?")
    names = parse_qs(query).get("master_name", [])
    if len(names) != 1 or not names[0]:
        raise ValueError("a sentinel:// URL needs exactly one ?master_name=<name> (the monitored master)")
    chunks = [c for c in base.split(_SEPARATOR) if c]
    if not chunks:
        raise ValueError("a sentinel:// URL names no sentinel")
    sentinels: list[tuple[str, int]] = []
    first = urlsplit(chunks[0])
    for chunk in chunks:
        part = urlsplit(chunk)
        if part.scheme != SENTINEL_SCHEME or not part.hostname:
            raise ValueError(f"each sentinel must be sentinel://host:port (got {part.scheme}://{part.hostname or ''})")
        sentinels.append((part.hostname, part.port or 26379))
    db_text = urlsplit(chunks[-1]).path.strip("/") or first.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ValueError(f"the database must be a number (got {db_text!r})")
    return SentinelUrl(
        tuple(sentinels), names[0], int(db_text),
        unquote(first.username) if first.username else None,
        unquote(first.password) if first.password is not None else None,
    )  # fmt: skip


def client_from_url(url: str, **kwargs: Any) -> redis.Redis:
    """A client of the current master; `kwargs` are redis-py connection options (socket_timeout ...)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    parsed = parse_sentinel_url(url)
    # The sentinels themselves get the same timeouts, so a dead sentinel costs no more than a dead master.
    timeouts = {k: v for k, v in kwargs.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=timeouts or None, **timeouts)
    return sentinel.master_for(
        parsed.master_name, db=parsed.db, username=parsed.username, password=parsed.password, **kwargs
    )


def redis_client(settings: Any, **kwargs: Any) -> redis.Redis:
    """The client for `settings.redis_url` (typed loosely: settings imports nothing from here)."""
    return client_from_url(settings.redis_url, **kwargs)


@dataclass(frozen=True)
class CeleryUrls:
    """What Celery's broker and result backend are given for one redis_url."""

    url: str
    transport_options: dict[str, Any]


def celery_urls(url: str) -> CeleryUrls:
    if not is_sentinel(url):
        return CeleryUrls(url, {})
    parsed = parse_sentinel_url(url)
    return CeleryUrls(parsed.celery_url(), {"master_name": parsed.master_name})


def check_url(url: str) -> str:
    """For settings: a sentinel:// URL must parse; other URLs are redis-py's to judge."""
    if is_sentinel(url):
        parse_sentinel_url(url)
    return url
