"""End to end: a real Prometheus (loopback, 1 s scrape and evaluation) scrapes the daemon, which
watches a throwaway PostgreSQL (with a streaming standby as a second target, a logical slot, an
archiver that failed once, a slow vacuum running and a sequence at 80 %) and Redis running the demo
workload. Every dashboard query returns data; the unused-index, slow-statement, sequence and cache
hit-ratio alerts fire (the last one also clears); and exposed_metrics.json matches the real /metrics.

The exporter runs with `query_text_length: 0` (no pgcache_statement_info at all), as README
recommends where statement text is sensitive: the Query performance tables must still list the top
statements, and the slow-statement alert must still fire, keyed by queryid.

The rules are alerts.yml passed through deploy/prometheus/short_rules.py (for: 2s, windows 10s)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from collectors.collector_harness import wait_until
from collectors.standby import StandbyCluster, allow_replication
from daemon_harness import fast_collectors, fetch, running_daemon, wait_for
from metrics_text import promtool_check_metrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_harness import Prometheus, prometheus_ready, prometheus_server
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from exporter.cache import CachingService
from exporter.demo.blog import (
    CachedUserRepository,
    asyncpg_url,
    create_schema,
    run_workload,
    seed_data,
)
from exporter.demo.servers import PostgresCluster, RedisServer

from . import promql
from .test_rules import ALERTS, load_short_rules

UNUSED_INDEX = "idx_users_username_lower_unused"  # the demo schema's index nobody uses
SLOW_SQL = "SELECT pg_sleep(:pause) /* made slow on purpose */"


# What the server-health families need to have samples: logical WAL (a logical slot), archiving
# (failing first, then working, so both timestamps exist), a bound on what slots may keep
# (safe_wal_size).
SERVER_SETTINGS = {"autovacuum_naptime": "1", "wal_level": "logical", "archive_mode": "on",
                   "archive_command": "'false'", "max_slot_wal_keep_size": "'1GB'"}
NEARLY_OUT = "e2e_nearly_out"  # a sequence at 80 % of its range: exported, and its alert fires


@pytest.fixture
def pg_autovacuum() -> Iterator[PostgresCluster]:
    """A cluster of the test's own whose autovacuum wakes every second, so the autovacuum and
    autoanalyze timestamps appear within the test."""
    with PostgresCluster(settings=SERVER_SETTINGS) as cluster:
        yield cluster


@pytest.fixture
def replica(pg_autovacuum: PostgresCluster) -> Iterator[PostgresCluster]:
    """A streaming standby of the e2e cluster, through a physical slot: the second PostgreSQL
    target, so the standby families and the replication panels have data."""
    allow_replication(pg_autovacuum)
    with StandbyCluster(pg_autovacuum, slot="e2e_standby") as standby:
        wait_until(pg_autovacuum, "SELECT count(*) = 1 FROM pg_stat_replication WHERE state = 'streaming'", timeout=30)
        yield standby


def prepare_server_health(pg: PostgresCluster) -> None:
    pg.psql(f"CREATE SEQUENCE {NEARLY_OUT} MAXVALUE 1000; SELECT setval('{NEARLY_OUT}', 800)")
    pg.psql("SELECT pg_create_logical_replication_slot('e2e_logical', 'pgoutput')")
    # A table that a slow VACUUM scans page by page (vacuum_progress has a running vacuum).
    pg.psql("CREATE TABLE e2e_vacuum_probe WITH (autovacuum_enabled = off) AS "
            "SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 20000) g")
    # Archiving fails (archive_command 'false'), then works: both timestamps exist.
    pg.psql("SELECT pg_switch_wal()")
    wait_until(pg, "SELECT failed_count > 0 FROM pg_stat_archiver", timeout=30)
    pg.psql("ALTER SYSTEM SET archive_command = 'true'")
    pg.psql("SELECT pg_reload_conf()")
    pg.psql("CREATE TABLE e2e_wal AS SELECT 1 AS one")
    pg.psql("SELECT pg_switch_wal()")
    wait_until(pg, "SELECT archived_count > 0 FROM pg_stat_archiver", timeout=30)


async def slow_vacuum(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET vacuum_cost_delay = '20ms'; SET vacuum_cost_limit = 1")
        await conn.execute("VACUUM (DISABLE_PAGE_SKIPPING) e2e_vacuum_probe")
    finally:
        await conn.close()


# -- workload -------------------------------------------------------------------------------------
async def prepare_database(pg: PostgresCluster, engine: AsyncEngine) -> None:
    await create_schema(engine)
    await seed_data(engine, users=300, posts=3000, follows=1500)
    # A redundant index (a prefix of the unique constraint's index) and an invalid one (a unique
    # index built concurrently over duplicate values fails and stays behind, invalid).
    pg.psql("CREATE INDEX idx_follows_follower ON user_follows (follower_id)")
    with pytest.raises(Exception, match="could not create unique index"):
        pg.psql("CREATE UNIQUE INDEX CONCURRENTLY idx_posts_body_invalid ON posts (body)")
    # Reset timestamps exist only after a reset; vacuum and analyze timestamps after a vacuum.
    pg.psql("SELECT pg_stat_reset()")
    pg.psql("SELECT pg_stat_statements_reset()")
    pg.psql("VACUUM ANALYZE users, posts, user_follows")
    # The workload's likes update posts: let autovacuum process it after the first few.
    pg.psql("ALTER TABLE posts SET (autovacuum_vacuum_threshold = 5, autovacuum_vacuum_scale_factor = 0, "
            "autovacuum_analyze_threshold = 5, autovacuum_analyze_scale_factor = 0)")


async def forever(step: Callable[[], Awaitable[Any]], stop: asyncio.Event, pause: float = 0.0) -> None:
    while not stop.is_set():
        await step()
        if pause:
            await asyncio.sleep(pause)


@contextlib.asynccontextmanager
async def background(*coros: Awaitable[Any]) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- the test -------------------------------------------------------------------------------------
def dashboard_variables(uid: str) -> dict[str, str]:
    common = {"datasource": "prometheus", "job": "pgcache-exporter", "datname": "postgres",
              "cache_target": "cache", "namespace": "user_stats", "queryid": ".+"}
    return {**common, "target": "cache" if uid == "pgcache-cache" else "main|replica"}


async def empty_dashboard_queries(p: Prometheus, pg_major: int) -> list[str]:
    fams = promql.exposed()
    empty = []
    for path in promql.dashboard_files():
        board = promql.load(path)
        for q in promql.queries(board):
            names = promql.metric_names(q.expr)
            if any(fams.get(n, {}).get("min_postgres", 0) > pg_major for n in names):
                continue  # e.g. last_idx_scan: PostgreSQL 16+
            if any(fams.get(n, {}).get("opt_in") for n in names):
                continue  # a collector off by default (the advisor): its own test checks it
            expr = promql.fill(q.expr, dashboard_variables(board["uid"]))
            if not await p.query(expr):
                empty.append(f"{q.dashboard} {q.where}: {expr}")
    return empty


def check_exposition(body: str, pg_major: int) -> None:
    """exposed_metrics.json is exactly what the exporter exposes (names, types, labels)."""
    expected = promql.exposed()
    seen: dict[str, dict[str, Any]] = {}
    for fam in text_string_to_metric_families(body):
        name = fam.name + ("_total" if fam.type == "counter" else "")
        labels: set[str] = set()
        for s in fam.samples:
            labels |= set(s.labels) - {"le"}
        seen[name] = {"type": fam.type, "labels": sorted(labels), "samples": len(fam.samples)}
    assert sorted(set(seen) - set(expected)) == [], "exposed but missing from exposed_metrics.json"
    for name, want in expected.items():
        if want.get("min_postgres", 0) > pg_major or want.get("opt_in"):
            continue
        if name == "pgcache_statement_info":  # query_text_length: 0 in this run
            assert not seen.get(name, {}).get("samples"), "query_text_length: 0 still exposes statement text"
            continue
        assert name in seen, f"{name} is in exposed_metrics.json but not in /metrics"
        got = seen[name]
        assert got["type"] == want["type"], (name, got, want)
        assert got["samples"], f"{name}: no samples in the end-to-end run"
        assert got["labels"] == sorted(want["labels"]), (name, got["labels"], want["labels"])


async def test_dashboards_and_alerts_against_a_real_prometheus(
    pg_autovacuum: PostgresCluster, replica: PostgresCluster, redis_private: RedisServer, tmp_path: Path,
    promtool: str,
) -> None:
    started = time.monotonic()
    pg, redis = pg_autovacuum, redis_private
    engine = create_async_engine(asyncpg_url(pg.dsn), pool_size=10)
    await prepare_database(pg, engine)
    prepare_server_health(pg)
    config = {
        "postgres": [{"name": "main", "dsn": pg.dsn}, {"name": "replica", "dsn": replica.dsn}],
        "redis": [{"name": "cache", "url": redis.url}],
        "collectors": fast_collectors(indexes={"unused_min_stats_age": "0s", "unused_min_size": "0"},
                                      statements={"query_text_length": 0}),
    }
    stop = asyncio.Event()
    storm = asyncio.Event()
    try:
        async with CachingService(redis.url, instance="e2e") as cache, running_daemon(config) as daemon:
            await cache.redis.config_set("maxmemory", "512mb")  # so the memory-limit panels have data
            repo = CachedUserRepository(async_sessionmaker(engine, expire_on_commit=False), cache)
            hot_users = [int(u) for u in (await _user_ids(engine))[:5]]
            # One entry that cannot be decoded: counted as a cache error (operation "decode").
            await cache.redis.set(cache.key("user_stats", {"user_id": -1}), b"not a cache entry")
            await cache.get_or_load("user_stats", {"user_id": -1}, _loaded)

            async def hot_read() -> None:
                for uid in hot_users:
                    await repo.get_user_with_stats_cached(uid)

            async def slow() -> None:
                async with engine.connect() as conn:
                    await conn.execute(text(SLOW_SQL), {"pause": 0.6})

            counter = iter(range(10**9))

            async def miss() -> None:
                if storm.is_set():
                    await cache.get_or_load("user_stats", {"user_id": 1, "storm": next(counter)}, _loaded)
                else:
                    await asyncio.sleep(0.05)

            assert daemon.bound is not None
            host, port = daemon.bound
            rules = load_short_rules().shorten_file(ALERTS, tmp_path / "alerts.short.yml", for_="2s", window="10s")
            with prometheus_server(tmp_path, f"{host}:{port}", [rules]) as prom:
                async with background(
                    run_workload(engine, cache, stop=stop, rate=20, seed=5),
                    forever(hot_read, stop, pause=0.2),
                    forever(slow, stop), forever(slow, stop),
                    forever(lambda: slow_vacuum(pg.dsn), stop),
                    *(forever(miss, stop) for _ in range(4)),
                ):
                    await prometheus_ready(prom)

                    # The statement slowed on purpose (0.6 s per call) fires, by its queryid: no text.
                    async def slow_statement() -> str | None:
                        return await _queryid(engine, "made slow on purpose")

                    slow_id = await wait_for(slow_statement, timeout=30, what="the slow statement in pg_stat_statements")

                    async def slow_alert() -> list[dict[str, str]]:
                        return [a for a in await prom.alerts("PgcacheSlowStatement") if a["queryid"] == slow_id]

                    (fired,) = await wait_for(slow_alert, timeout=45, what="PgcacheSlowStatement firing")
                    assert fired["target"] == "main" and fired["datname"] == "postgres", fired
                    assert "query" not in fired, fired

                    # With no statement text at all, the Query performance tables still list the top
                    # statements, the slow one among them.
                    assert await prom.query('pgcache_statement_info{job="pgcache-exporter"}') == []
                    board = promql.load(promql.DASHBOARDS / "queries.json")
                    for q in promql.queries(board):
                        if "pgcache_statement_info" not in q.expr:
                            continue
                        rows = await prom.query(promql.fill(q.expr, dashboard_variables(board["uid"])))
                        # At least the slow one: the exporter's own statements, which used to fill
                        # these tables, are left out now (issue 16).
                        assert len(rows) >= 1, (q.where, rows)
                        if "pgcache_statement_exec_seconds_total" in q.expr:  # total and mean time: it leads
                            assert slow_id in {r["metric"]["queryid"] for r in rows}, (q.where, rows)

                    # The sequence at 80 % of its range is exported and fires (75 %), not the 90 % one.
                    async def sequence_alert() -> list[dict[str, str]]:
                        return [a for a in await prom.alerts("PgcacheSequenceNearlyExhausted")
                                if a["sequencename"] == NEARLY_OUT and a["target"] == "main"]

                    (fired,) = await wait_for(sequence_alert, timeout=30, what="PgcacheSequenceNearlyExhausted firing")
                    assert fired["datname"] == "postgres" and fired["schemaname"] == "public", fired
                    assert await prom.alerts("PgcacheSequenceExhaustionCritical") == []

                    # The index nobody uses fires.
                    async def unused_alert() -> list[dict[str, str]]:
                        return [a for a in await prom.alerts("PgcacheUnusedIndex")
                                if a["index"] == UNUSED_INDEX and a["target"] == "main"]

                    (fired,) = await wait_for(unused_alert, timeout=30, what="PgcacheUnusedIndex firing")
                    assert fired["table"] == "users", fired

                    # Every dashboard query (and variable) returns at least one series.
                    last: list[str] = []

                    async def all_queries_answer() -> bool:
                        nonlocal last
                        last = await empty_dashboard_queries(prom, pg.major)
                        return not last

                    with contextlib.suppress(AssertionError):
                        await wait_for(all_queries_answer, timeout=20, what="dashboard queries")
                    assert last == [], "dashboard queries without data:\n" + "\n".join(last)

                    # exposed_metrics.json is what the exporter really exposes.
                    async def exposition_matches() -> bool:
                        nonlocal problem
                        status, body = await fetch(daemon)
                        assert status == 200
                        try:
                            check_exposition(body, pg.major)
                            promtool_check_metrics(promtool, body.encode())
                        except AssertionError as e:
                            problem = str(e)
                            return False
                        problem = ""
                        return True

                    problem = ""
                    with contextlib.suppress(AssertionError):
                        await wait_for(exposition_matches, timeout=30, what="exposition")
                    assert not problem, problem

                    # Cache hit ratio: healthy before, alert during a miss storm, clear after it.
                    assert await prom.alerts("PgcacheCacheHitRatioLow") == []
                    storm.set()

                    async def ratio_alert() -> list[dict[str, str]]:
                        return [a for a in await prom.alerts("PgcacheCacheHitRatioLow") if a["namespace"] == "user_stats"]

                    await wait_for(ratio_alert, timeout=30, what="PgcacheCacheHitRatioLow firing")
                    storm.clear()

                    async def ratio_clear() -> bool:
                        return not await prom.alerts("PgcacheCacheHitRatioLow", state="firing") and not \
                            await prom.alerts("PgcacheCacheHitRatioLow", state="pending")

                    await wait_for(ratio_clear, timeout=40, what="PgcacheCacheHitRatioLow cleared")
                    stop.set()
    finally:
        stop.set()
        await engine.dispose()
    print(f"end to end: {time.monotonic() - started:.1f}s")


async def _loaded() -> dict[str, int]:
    return {"loaded": 1}


async def _queryid(engine: AsyncEngine, marker: str) -> str | None:
    async with engine.connect() as conn:
        sql = text("SELECT queryid::text FROM pg_stat_statements WHERE query LIKE :pat AND queryid IS NOT NULL LIMIT 1")
        found = (await conn.execute(sql, {"pat": f"%{marker}%"})).scalar_one_or_none()
        return None if found is None else str(found)


async def _user_ids(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return list((await conn.execute(text("SELECT id FROM users ORDER BY id LIMIT 50"))).scalars())

