"""Choosing the store's client and the chat queue's Redis from the settings (no Redis needed)."""

from __future__ import annotations

import pytest

from shared.adapters.redis.cluster import parse_cluster_url
from shared.adapters.redis.connect import queue_url, uses_cluster
from shared.config import Settings


def test_a_cluster_url_names_its_startup_nodes_and_credentials():
    u = parse_cluster_url("redis+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001,redis-3")
    assert u.nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("redis-3", 6379)]
    assert (u.username, u.password, u.ssl) == ("app", "s@cret", False)
    assert parse_cluster_url("rediss+cluster://h:1").ssl
    with pytest.raises(ValueError):
        parse_cluster_url("redis+cluster://")
    with pytest.raises(ValueError):
        parse_cluster_url("http://h:1")


def test_the_scheme_or_the_flag_selects_the_cluster_client():
    assert uses_cluster(Settings(redis_url="redis+cluster://h:7000"))
    assert uses_cluster(Settings(redis_url="redis://h:7000", redis_cluster=True))
    assert not uses_cluster(Settings(redis_url="redis://h:6379/0"))
    assert uses_cluster(Settings.from_env({"REDIS_URL": "redis://h:7000", "PARLEY_REDIS_CLUSTER": "1"}))


def test_the_queue_runs_on_its_own_redis_and_never_on_a_cluster():
    assert queue_url(Settings(redis_url="redis://h:6379/0")) == "redis://h:6379/0"
    assert queue_url(Settings(redis_url="redis://h:6379/0", queue_url="redis://q:6379/1")) == "redis://q:6379/1"
    assert queue_url(Settings(redis_url="redis+cluster://h:7000", queue_url="redis://q:6379/0")) == "redis://q:6379/0"
    with pytest.raises(RuntimeError, match="PARLEY_QUEUE_URL"):
        queue_url(Settings(redis_url="redis+cluster://h:7000"))
    with pytest.raises(RuntimeError, match="PARLEY_QUEUE_URL"):
        queue_url(Settings(redis_url="redis://h:7000", redis_cluster=True))
    with pytest.raises(RuntimeError, match="not a cluster"):
        queue_url(Settings(redis_url="redis://h:6379", queue_url="redis+cluster://q:7000"))


def test_a_new_deployment_on_a_cluster_gets_enough_partitions_to_spread():
    assert Settings.from_env({"REDIS_URL": "redis+cluster://h:7000"}).partitions == 64
    assert Settings.from_env({"REDIS_URL": "redis://h:7000", "PARLEY_REDIS_CLUSTER": "1"}).partitions == 64
    assert Settings.from_env({"REDIS_URL": "redis://h:6379"}).partitions == 16  # one Redis: nothing to spread over
    assert Settings.from_env({"REDIS_URL": "redis+cluster://h:7000", "PARLEY_PARTITIONS": "16"}).partitions == 16
