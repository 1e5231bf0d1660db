"""The seed design's index strategy, working: the demo workload (at a scale where indexes matter)
scans every one of the seed's five indexes, the popular-posts query is served by the
engagement-score expression index, and the index advisor finds nothing missing. The seed at its
own scale (200k posts) seeds without an int4 overflow."""

from __future__ import annotations

import asyncio
import json
import time

from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import create_async_engine

from exporter.advisor.collector import AdvisorCollector
from exporter.advisor.settings import AdvisorSettings
from exporter.cache import CachingService
from exporter.config import DatabaseSelection, PostgresTargetConfig
from exporter.demo.blog import (
    SEED_INDEXES,
    asyncpg_url,
    create_schema,
    popular_posts_query,
    run_workload,
    seed_data,
)
from exporter.demo.servers import PostgresCluster, RedisServer
from exporter.postgres.engine import PostgresTarget

DB = "seed_indexes"


def plan_nodes(plan: dict[str, object]) -> list[dict[str, object]]:
    out = [plan]
    for child in plan.get("Plans", []):  # type: ignore[union-attr]
        out += plan_nodes(child)
    return out


async def test_demo_workload_scans_every_seed_index(pg: PostgresCluster, redis_server: RedisServer) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    pg.psql(f"CREATE DATABASE {DB}")
    engine = create_async_engine(asyncpg_url(pg.dsn_for(db=DB)), pool_size=5)
    try:
        await create_schema(engine)
        # The seed's scale: 200k posts (g * 104729 passes the int4 range from g = 20505 on).
        await seed_data(engine, users=50_000, posts=200_000, follows=50_000)
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM posts")) == 200_000
            sql = str(popular_posts_query(10).compile(
                dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
            raw = await conn.scalar(text("EXPLAIN (FORMAT JSON) " + sql))
        plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
        used = {n.get("Index Name") for n in plan_nodes(plan)}
        assert "idx_posts_engagement_score" in used, json.dumps(plan, indent=1)
        assert not any(n["Node Type"] == "Sort" for n in plan_nodes(plan)), "the index gives the order"

        stop = asyncio.Event()
        async with CachingService(redis_server.url, prefix="seedidx", stats_key="seedidx:stats") as cache:
            task = asyncio.create_task(run_workload(engine, cache, stop=stop, rate=300, seed=3))
            await asyncio.sleep(5)
            stop.set()
            done = await task
        assert done.get("failed", 0) == 0, done
    finally:
        await engine.dispose()

    names = ", ".join(f"'{n}'" for n in SEED_INDEXES)
    query = (f"SELECT string_agg(indexrelname || '=' || idx_scan, ',' ORDER BY indexrelname) "
             f"FROM pg_stat_user_indexes WHERE indexrelname IN ({names})")
    deadline = time.monotonic() + 10
    while True:  # statistics reach the view when the backends flush them
        scans = dict(kv.split("=") for kv in pg.psql(query, db=DB).split(","))
        if all(int(v) > 0 for v in scans.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert sorted(scans) == sorted(SEED_INDEXES)
    assert all(int(v) > 0 for v in scans.values()), scans

    # With every seed index in place, the advisor (HypoPG installed) finds nothing missing in the
    # demo's own workload: no false positive.
    pg.psql("CREATE EXTENSION IF NOT EXISTS hypopg", db=DB)
    cfg = PostgresTargetConfig(name="main", dsn=pg.dsn,  # type: ignore[arg-type]
                               databases=DatabaseSelection(include=(f"^{DB}$",)))
    target = PostgresTarget(cfg)
    try:
        results, failures = await AdvisorCollector(
            target, AdvisorSettings(enabled=True, interval=60, timeout=60)).advise()
    finally:
        await target.dispose()
    assert failures == [] and [r.datname for r in results] == [DB]
    assert results[0].hypopg and results[0].planned >= 5
    assert results[0].advice == [], [(a.table, a.label, a.saving) for a in results[0].advice]
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
