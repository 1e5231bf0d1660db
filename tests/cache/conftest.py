"""Fixtures of the cache tests: a flushed Redis per test, and a real 3-master Redis Cluster."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from exporter.demo.servers import RedisServer, free_port


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis, emptied for this test."""
    with redis.Redis.from_url(redis_server.url) as r:
        r.flushall()
    return redis_server.url


def _cluster_port() -> int:
    # The cluster bus listens on port + 10000: that one must be free too.
    for _ in range(50):
        port = free_port()
        if port + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[list[RedisServer]]:
    """Three masters on loopback, joined with `redis-cli --cluster create`, no replicas."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli not found: install redis-tools (or redis-server)")
    nodes: list[RedisServer] = []
    try:
        for _ in range(3):
            node = RedisServer(port=_cluster_port())
            node.extra_args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node.base / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ]
            nodes.append(node.start())
        r = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 30
        while True:
            states = []
            for n in nodes:
                with redis.Redis(port=n.port) as c:
                    states.append(c.cluster("info")["cluster_state"])  # type: ignore[no-untyped-call]
            if all(s == "ok" for s in states):
                break
            assert time.monotonic() < deadline, f"cluster never became ok: {states}"
            time.sleep(0.1)
        yield nodes
    finally:
        for n in nodes:
            n.remove()


@pytest.fixture
def cluster_url(redis_cluster: list[RedisServer]) -> str:
    for n in redis_cluster:
        with redis.Redis(port=n.port) as c:
            c.flushall()
    return redis_cluster[0].url
