"""redis_conn: one factory for plain and Sentinel URLs, and what Celery is given for each."""

from __future__ import annotations

import pytest
from redis.sentinel import SentinelConnectionPool

from hoster_tasks.errors import ConfigError
from hoster_tasks.redis_conn import celery_urls, client_from_url, parse_sentinel_url
from hoster_tasks.settings import Settings

URL = "sentinel://:s3cret@10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://10.0.0.3/2?master_name=hoster"


def test_kombu_style_url_names_every_sentinel_the_master_db_and_password() -> None:
    parsed = parse_sentinel_url(URL)
    assert parsed.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert (parsed.master_name, parsed.db, parsed.password) == ("hoster", 2, "s3cret")
    assert "s3cret" not in repr(parsed)


def test_celery_gets_kombus_form_without_our_query_and_the_master_name_as_a_transport_option() -> None:
    urls = celery_urls(URL)
    assert urls.url == "sentinel://:s3cret@10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://10.0.0.3:26379/2"
    assert urls.transport_options == {"master_name": "hoster"}
    assert celery_urls("redis://h:6379/0").url == "redis://h:6379/0"
    assert celery_urls("redis://h:6379/0").transport_options == {}


def test_the_client_resolves_the_master_through_the_sentinels() -> None:
    client = client_from_url(URL, socket_timeout=3)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "hoster"
    first = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert (first["host"], first["port"], first["socket_timeout"]) == ("10.0.0.1", 26379, 3)
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["socket_timeout"] == 3


@pytest.mark.parametrize("url, why", [
    ("sentinel://10.0.0.1:26379/0", "master_name"),
    ("sentinel://10.0.0.1:26379;redis://10.0.0.2:6379/0?master_name=m", "sentinel://host:port"),
    ("sentinel://10.0.0.1:26379/x?master_name=m", "database"),
])  # fmt: skip
def test_a_bad_sentinel_url_is_a_settings_error(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        Settings.from_env(redis_url=url)


def test_beat_lock_must_outlive_several_beat_loops() -> None:
    with pytest.raises(ConfigError, match="beat_lock_timeout_seconds"):
        Settings.from_env(beat_max_loop_seconds=5, beat_lock_timeout_seconds=10)
