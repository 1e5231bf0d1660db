"""Several application processes against one real Redis: one load per key across processes, and
their counters adding up exactly in what the exporter's cache collector reads."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
from daemon_harness import fast_collectors, fetch, next_round, running_daemon
from metrics_text import samples, types, value

from exporter.cache.collector import CacheCollector
from exporter.config import CacheSettings, RedisTargetConfig
from exporter.definitions import builtin_definitions
from exporter.demo.servers import free_port
from exporter.errors import ConnectError

WORKER = Path(__file__).with_name("worker.py")


def _run(*args: str) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE)]


def _finish(procs: list[subprocess.Popen[bytes]]) -> list[bytes]:
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=30)
        assert p.returncode == 0
        out.append(stdout)
    return out


def test_four_processes_load_once(redis_url: str) -> None:
    start_at = time.time() + 2.0  # every interpreter is up and connected by then
    procs = [p for _ in range(4) for p in _run("stampede", redis_url, repr(start_at))]
    outputs = _finish(procs)
    values = [orjson.loads(o) for o in outputs]
    assert values == [{"loaded_by_call": 1}] * 4
    with redis.Redis.from_url(redis_url) as r:
        assert r.get("test:loads") == b"1"
        stats = r.hgetall("pgcache:stats")
    assert stats[b"loads|stampede"] == b"1"
    assert int(stats[b"misses|stampede"]) + int(stats.get(b"hits|stampede", 0)) == 4
    # Unless a process started late enough to hit, it waited on the lock.
    assert int(stats.get(b"lock_waits|stampede", 0)) == int(stats[b"misses|stampede"]) - 1


async def test_counters_of_three_processes_add_up_in_the_daemons_metrics(redis_url: str) -> None:
    procs = [p for i in range(3) for p in _run("counters", redis_url, "app:stats", str(i))]
    _finish(procs)
    off = {d.name: {"enabled": False} for d in builtin_definitions()}
    config = {"redis": [{"name": "cache", "url": redis_url, "stats_key": "app:stats"}],
              "collectors": {**fast_collectors(), **off}}
    async with running_daemon(config) as daemon:
        await next_round(daemon, "cache")
        _, body = await fetch(daemon)
    assert types(body)["pgcache_cache_load_duration_seconds"] == "histogram"

    def get(name: str, **labels: str) -> float:
        found = value(body, name, target="cache", **labels)
        assert found is not None, (name, labels)
        return found

    per_proc = [3 + i for i in range(3)]  # misses, loads and hits of process i
    assert get("pgcache_cache_misses_total", namespace="proc") == sum(per_proc) == 12
    assert get("pgcache_cache_hits_total", namespace="proc") == 12
    assert get("pgcache_cache_loads_total", namespace="proc") == 12
    assert get("pgcache_cache_invalidations_total", namespace="proc") == 3
    assert get("pgcache_cache_invalidated_keys_total", namespace="proc") == 3
    assert get("pgcache_cache_load_duration_seconds_count", namespace="proc") == 12
    assert get("pgcache_cache_load_duration_seconds_bucket", namespace="proc", le="+Inf") == 12
    assert get("pgcache_cache_load_duration_seconds_bucket", namespace="proc", le="0.1") == 12
    # Each key was hit once after its one load: the hits saved what the loads cost.
    saved = get("pgcache_cache_saved_seconds_total", namespace="proc")
    assert saved >= 12 * 0.01
    assert saved == pytest.approx(get("pgcache_cache_load_duration_seconds_sum", namespace="proc"), abs=12e-6)
    assert get("pgcache_redis_up") == 1
    assert get("pgcache_redis_keyspace_hits_total") >= 12
    assert get("pgcache_redis_connected_clients") >= 1
    assert get("pgcache_series_dropped_total", collector="cache") == 0
    # Every instance closed cleanly, so none is left in the flush-time gauge.
    assert samples(body, "pgcache_cache_stats_flush_timestamp_seconds") == []


async def test_unreachable_redis_is_a_connect_error_without_secrets() -> None:
    url = f"redis://:s3cret-pass@127.0.0.1:{free_port()}/0"
    cfg = RedisTargetConfig(name="down", url=url)  # type: ignore[arg-type]
    collector = CacheCollector(cfg, CacheSettings(timeout=1))
    try:
        with pytest.raises(ConnectError) as err:
            await collector.collect()
    finally:
        await collector.close()
    assert "'down'" in str(err.value)
    assert "s3cret-pass" not in str(err.value) and url not in str(err.value)
