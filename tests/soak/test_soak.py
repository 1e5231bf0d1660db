"""Soak: thousands of collection rounds while tables, indexes and statements appear and vanish;
memory and series count stay flat. Not in the default run: `pytest -m soak tests/soak`
(PGCACHE_SOAK_ROUNDS sets the rounds, default 3000; about 4 minutes on 2 cores)."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

from exporter.cache import CachingService
from exporter.config import build_config
from exporter.daemon import build_jobs, lay_out
from exporter.demo.servers import PostgresCluster, RedisServer
from exporter.scheduler import run_job
from exporter.snapshot import Snapshot

pytestmark = pytest.mark.soak

ROUNDS = int(os.environ.get("PGCACHE_SOAK_ROUNDS", "3000"))
NAMESPACES = 150  # more than the collector's cap of 100 below


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def series(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


async def churn(dsn: str, redis_url: str, stop: asyncio.Event, ready: asyncio.Event) -> None:
    """New tables, indexes, statements and cache namespaces all the time; old ones dropped."""
    conn = await asyncpg.connect(dsn)
    i = 0
    async with CachingService(redis_url, stats_flush_interval=0.2) as cache:
        # Every namespace exists from the start, so the cap is reached before the first round.
        for n in range(NAMESPACES):
            await cache.get_or_load(f"ns{n}", {"i": -1}, _value, ttl=5)
        await cache.flush_stats()
        ready.set()
        while not stop.is_set():
            await conn.execute(f"CREATE TABLE churn_{i} (id int PRIMARY KEY, v text)")
            await conn.execute(f"CREATE INDEX churn_{i}_v ON churn_{i} (v)")
            await conn.execute(f"INSERT INTO churn_{i} SELECT g, g::text FROM generate_series(1, 50) g")
            await conn.execute(f"SELECT count(*) FROM churn_{i} WHERE v = $1", "7")
            await cache.get_or_load(f"ns{i % NAMESPACES}", {"i": i}, _value, ttl=5)
            if i >= 20:
                await conn.execute(f"DROP TABLE churn_{i - 20}")
            i += 1
            await asyncio.sleep(0.02)
    await conn.close()


async def _value() -> int:
    return 1


async def test_soak_memory_and_series_stay_flat() -> None:
    # A small pg_stat_statements.max makes statements fall out of the view as new ones arrive.
    with PostgresCluster(settings={"pg_stat_statements.max": "200"}) as pg, RedisServer() as redis:
        config = build_config({
            "postgres": [{"name": "soak", "dsn": pg.dsn}],
            "redis": [{"name": "cache", "url": redis.url}],
            "collectors": {
                "statements": {"limit": 50},
                "tables": {"limit": 30},
                "indexes": {"limit": 60, "unused_min_stats_age": "0s", "unused_min_size": 0},
                "cache": {"max_namespaces": 100},
            },
        })
        snapshot = Snapshot()
        targets, jobs = build_jobs(config)
        lay_out(snapshot, config, jobs)
        stop, ready = asyncio.Event(), asyncio.Event()
        churner = asyncio.create_task(churn(pg.dsn, redis.url, stop, ready))
        await asyncio.wait_for(ready.wait(), 30)
        rss: list[int] = []
        counts: list[int] = []
        try:
            for _ in range(ROUNDS):
                results = await asyncio.gather(*(run_job(j, snapshot) for j in jobs))
                assert all(results), [st.last_error for st in snapshot.status.values() if not st.success]
                counts.append(series(snapshot.text()))
                rss.append(rss_bytes())
        finally:
            stop.set()
            await churner
            for j in jobs:
                await j.collector.close()
            for t in targets:
                await t.dispose()
        warm = ROUNDS // 4  # caches, pools and allocator arenas have settled by then
        growth = max(rss[warm:]) - rss[warm]
        assert growth < 16 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB after warm-up ({rss[warm] / 2**20:.0f} MiB)"
        assert max(counts[warm:]) <= 1.2 * max(counts[:warm]), (max(counts[:warm]), max(counts[warm:]))
        # The limits really cut (so the flat line is the bound, not an idle workload).
        assert snapshot.status[("soak", "statements")].dropped_total > 0
        assert snapshot.status[("cache", "cache")].dropped_total > 0
