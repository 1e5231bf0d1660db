"""Faults the daemon survives, each against real servers: crashes, hangs, exhaustion, bugs,
reloads in the middle of a run, and Redis going away or losing its data."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as aioredis
from daemon_harness import (
    all_off_except,
    fast_collectors,
    fetch,
    next_round,
    running_daemon,
    wait_for,
)
from metrics_text import types, value
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from exporter import daemon as daemon_module
from exporter.cache import CachingService
from exporter.collector import CollectResult
from exporter.definitions import builtin_definitions
from exporter.demo.servers import PostgresCluster, RedisServer
from exporter.postgres.collector import PostgresCollector

OFF = all_off_except("activity")


def config(dsn: str, **collectors: dict) -> dict:
    return {"postgres": [{"name": "main", "dsn": dsn, "connect_timeout": "2s"}],
            "collectors": {**fast_collectors(), **OFF, **collectors}}


class SleepyCollector(PostgresCollector):
    """Stands in for a collector whose query hangs on the server (pg_sleep past the timeout)."""

    name = "database"
    sleep = 30.0

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        await conn.execute(text("SELECT pg_sleep(:s)"), {"s": type(self).sleep})
        return CollectResult([])


class BrokenCollector(PostgresCollector):
    name = "database"

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        raise RuntimeError("boom: a bug in a collector")


async def exporter_backends(pg: PostgresCluster) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(pg.dsn)
    try:
        rows = await conn.fetch(
            "SELECT state, query FROM pg_stat_activity WHERE application_name = 'pgcache-exporter'"
        )
        return [(r["state"], r["query"]) for r in rows]
    finally:
        await conn.close()


async def test_postgres_killed_then_restarted(pg_private: PostgresCluster) -> None:
    async with running_daemon(config(pg_private.dsn)) as d:
        await next_round(d, "activity")
        assert d.snapshot.up["main"] is True
        pg_private.kill()
        await wait_for(lambda: d.snapshot.up.get("main") is False, what="pgcache_up 0 after SIGKILL")
        assert (await fetch(d))[0] == 200
        pg_private.start()  # crash recovery
        await wait_for(lambda: d.snapshot.up.get("main") is True, timeout=20, what="pgcache_up 1 after recovery")


async def test_hung_query_times_out_without_leaking_connections(
    pg_private: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(daemon_module.HAND_WRITTEN, "database", SleepyCollector)
    monkeypatch.setattr(SleepyCollector, "sleep", 30.0)
    cfg = config(pg_private.dsn, database={"enabled": True, "interval": "2s", "timeout": "1s"})
    async with running_daemon(cfg) as d:
        await wait_for(lambda: d.snapshot.status[("main", "database")].errors_total >= 3, timeout=20,
                       what="three timed-out runs")
        st = d.snapshot.status[("main", "database")]
        assert "statement timeout" in (st.last_error or "") or "timed out" in (st.last_error or "")
        # No run piled up on the server: the sleeping statement was cancelled each time, and the
        # exporter holds no more connections than its pool allows.
        backends = await exporter_backends(pg_private)
        assert not [q for s, q in backends if s == "active" and "pg_sleep" in q], backends
        assert len(backends) <= 2, backends
        # The other collector kept working throughout.
        assert d.snapshot.status[("main", "activity")].success is True
        # The server answers in time again: the next run works.
        monkeypatch.setattr(SleepyCollector, "sleep", 0.0)
        await wait_for(lambda: d.snapshot.status[("main", "database")].success is True, timeout=10,
                       what="a successful run after the hang")


async def test_max_connections_exhausted(pg_private: PostgresCluster) -> None:
    # 3 slots are reserved for superusers; with 6 in all, ordinary roles get 3.
    pg_private.psql("ALTER SYSTEM SET max_connections = 6")
    pg_private.stop()
    pg_private.start()
    pg_private.psql("CREATE ROLE exporter LOGIN PASSWORD 'exp-pw' IN ROLE pg_monitor")
    pg_private.psql("CREATE ROLE app LOGIN PASSWORD 'app-pw'")
    hogs = [await asyncpg.connect(pg_private.dsn_for("app", "app-pw")) for _ in range(3)]
    try:
        async with running_daemon(config(pg_private.dsn_for("exporter", "exp-pw"))) as d:
            await next_round(d, "activity")
            st = d.snapshot.status[("main", "activity")]
            assert d.snapshot.up["main"] is False
            assert "too many" in (st.last_error or "") or "remaining connection slots" in (st.last_error or "")
            for h in hogs:
                await h.close()
            hogs = []
            await wait_for(lambda: d.snapshot.up.get("main") is True, what="recovery once slots are free")
            await wait_for(lambda: d.snapshot.status[("main", "activity")].success, what="activity again")
            _, body = await fetch(d)
            # The exporter's own connection is excluded, so the three closed sessions left nothing.
            assert value(body, "pgcache_connections_max", target="main") == 3
    finally:
        for h in hogs:
            await h.close()


async def test_collector_bug_is_contained(pg: PostgresCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(daemon_module.HAND_WRITTEN, "database", BrokenCollector)
    async with running_daemon(config(pg.dsn, database=dict(fast_collectors()["database"]))) as d:
        await next_round(d, "database")
        await next_round(d, "activity")
        _, body = await fetch(d)
        assert value(body, "pgcache_collector_success", target="main", collector="database") == 0
        assert value(body, "pgcache_collector_errors_total", target="main", collector="database") >= 1
        assert value(body, "pgcache_collector_success", target="main", collector="activity") == 1
        assert value(body, "pgcache_up", target="main") == 1
        _, page = await fetch(d, "/")
        assert "failed unexpectedly: RuntimeError: boom: a bug in a collector" in page


async def test_reload_while_a_job_runs(pg: PostgresCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(daemon_module.HAND_WRITTEN, "database", SleepyCollector)
    monkeypatch.setattr(SleepyCollector, "sleep", 2.5)
    doc = config(pg.dsn, database={"enabled": True, "interval": "10s", "timeout": "5s"})
    current = {"doc": doc}
    async with running_daemon(lambda: current["doc"]) as d:
        await asyncio.sleep(0.5)  # the sleepy job is mid-query now
        current["doc"] = {**doc, "postgres": [{"name": "renamed", "dsn": pg.dsn}]}
        assert await asyncio.wait_for(d.reload(), timeout=8) is True
        await next_round(d, "activity", "renamed")
        assert ("main", "activity") not in d.snapshot.status
        _, body = await fetch(d)
        assert value(body, "pgcache_up", target="renamed") == 1
        assert 'target="main"' not in body
        assert await asyncio.wait_for(d.reload(), timeout=8) is True  # and again, idempotent
        await next_round(d, "activity", "renamed")


async def test_redis_down_restarted_and_flushed(pg: PostgresCluster, redis_private: RedisServer) -> None:
    doc = {"redis": [{"name": "cache", "url": redis_private.url}],
           "collectors": {**fast_collectors(), **{d.name: {"enabled": False} for d in builtin_definitions()}}}
    async with CachingService(redis_private.url) as svc:
        for i in range(5):
            await svc.get_or_load("users", {"id": i % 2}, lambda: _value(), ttl=60)
    async with running_daemon(doc) as d:
        await next_round(d, "cache")
        _, body = await fetch(d)
        assert types(body)["pgcache_cache_hits"] == "counter"
        hits = value(body, "pgcache_cache_hits_total", target="cache", namespace="users")
        assert hits == 3 and value(body, "pgcache_up", target="cache") == 1

        # Flushed: the counters start again from zero, as a reset (still counters, never negative).
        client = aioredis.from_url(redis_private.url)
        await client.flushall()
        await client.aclose()
        await next_round(d, "cache")
        _, body = await fetch(d)
        after = value(body, "pgcache_cache_hits_total", target="cache", namespace="users")
        assert after is None or 0 <= after < hits

        redis_private.stop()
        await wait_for(lambda: d.snapshot.up.get("cache") is False, what="redis target down")
        await next_round(d, "cache")
        _, body = await fetch(d)
        # What the PgcacheRedisDown alert reads; the figures Redis can no longer vouch for are gone.
        assert value(body, "pgcache_redis_up", target="cache") == 0
        assert value(body, "pgcache_up", target="cache") == 0
        assert value(body, "pgcache_redis_memory_used_bytes", target="cache") is None
        assert value(body, "pgcache_cache_hits_total", target="cache", namespace="users") is None
        redis_private.start()
        await wait_for(lambda: d.snapshot.up.get("cache") is True, what="redis target back")
        _, body = await fetch(d)
        assert value(body, "pgcache_redis_up", target="cache") == 1


async def _value() -> dict:
    return {"name": "x"}
