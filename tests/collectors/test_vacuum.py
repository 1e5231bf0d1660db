"""`vacuum_progress` and `autovacuum`: a vacuum slowed by cost delay is seen per table with its
phase and heap progress while it runs, and gone when it ends; the autovacuum workers' count and
limit are reported."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from metrics_text import samples, value

from collectors.collector_harness import (
    builtin,
    collect,
    create_monitor_role,
    drop_database,
    fresh_database,
    promtool_check_metrics,
    target_for,
)
from exporter.demo.servers import PostgresCluster


@pytest.fixture
def vacdb(cluster: PostgresCluster) -> Iterator[str]:
    name = fresh_database(cluster, "vac_probe",
                          "CREATE TABLE big (id int, pad text) WITH (autovacuum_enabled = off);"
                          "INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g;"
                          "DELETE FROM big WHERE id % 2 = 0")
    yield name
    drop_database(cluster, name)


async def test_a_running_vacuum_per_table(cluster: PostgresCluster, vacdb: str, promtool: str) -> None:
    dsn = create_monitor_role(cluster)
    conn = await asyncpg.connect(cluster.dsn_for(db=vacdb))
    try:
        await conn.execute("SET vacuum_cost_delay = '20ms'; SET vacuum_cost_limit = 1")
        running = asyncio.ensure_future(conn.execute("VACUUM big"))
        async with target_for(dsn, include=(f"^{vacdb}$",)) as t:
            got = ""
            for _ in range(100):
                got = (await collect(builtin(t, "vacuum_progress"))).text
                scanned = samples(got, "pgcache_vacuum_heap_blocks_scanned", relname="big")
                if scanned and scanned[0] > 0:
                    break
                await asyncio.sleep(0.1)
            promtool_check_metrics(promtool, got.encode())
            at = {"datname": vacdb, "schemaname": "public", "relname": "big", "kind": "manual"}
            assert samples(got, "pgcache_vacuum_running", **at) == [1]
            (total,) = samples(got, "pgcache_vacuum_heap_blocks", **at)
            (scanned,) = samples(got, "pgcache_vacuum_heap_blocks_scanned", **at)
            assert total > 1000 and 0 < scanned <= total
            (age,) = samples(got, "pgcache_vacuum_age_seconds", **at)
            assert age >= 0
            await cluster_cancel(cluster, vacdb)
            with pytest.raises(asyncpg.QueryCanceledError):
                await running
            done = (await collect(builtin(t, "vacuum_progress"))).text
            assert samples(done, "pgcache_vacuum_running") == []
            workers = (await collect(builtin(t, "autovacuum"))).text
        assert value(workers, "pgcache_autovacuum_workers_max") == 3
        busy = value(workers, "pgcache_autovacuum_workers_busy")
        assert busy is not None and 0 <= busy <= 3
    finally:
        await conn.close()


async def cluster_cancel(cluster: PostgresCluster, db: str) -> None:
    await asyncio.to_thread(
        cluster.psql,
        f"SELECT pg_cancel_backend(pid) FROM pg_stat_progress_vacuum WHERE datname = '{db}'",
    )
