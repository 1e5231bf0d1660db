"""`locks`: one session holds a lock and two wait behind it. The waiters are counted (2 blocked,
one blocker holding up 2), the wait has an age, and no label names a pid."""

from __future__ import annotations

import asyncio

import asyncpg
from metrics_text import types, value

from collectors.collector_harness import (
    builtin,
    collect,
    create_monitor_role,
    promtool_check_metrics,
    target_for,
)
from exporter.demo.servers import PostgresCluster


async def test_a_lock_held_with_two_waiters(cluster: PostgresCluster, promtool: str) -> None:
    dsn = create_monitor_role(cluster)
    cluster.psql("CREATE TABLE IF NOT EXISTS lock_probe (id int)")
    holder = await asyncpg.connect(cluster.dsn)
    waiters = [await asyncpg.connect(cluster.dsn) for _ in range(2)]
    tasks: list[asyncio.Task[object]] = []
    try:
        async with target_for(dsn) as t:
            idle = (await collect(builtin(t, "locks"))).text
            assert value(idle, "pgcache_lock_waiting_sessions") == 0
            assert value(idle, "pgcache_lock_wait_max_seconds") == 0

            tx = holder.transaction()
            await tx.start()
            await holder.execute("LOCK TABLE lock_probe IN ACCESS EXCLUSIVE MODE")
            tasks = [asyncio.ensure_future(w.fetch("SELECT count(*) FROM lock_probe")) for w in waiters]
            for _ in range(200):
                n = await holder.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                if n == 2:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.1)
            got = (await collect(builtin(t, "locks"))).text
        promtool_check_metrics(promtool, got.encode())
        assert value(got, "pgcache_lock_waiting_sessions") == 2
        assert value(got, "pgcache_lock_blocked_sessions") == 2
        assert value(got, "pgcache_lock_blocking_sessions") == 1
        assert value(got, "pgcache_lock_root_blocking_sessions") == 1
        assert value(got, "pgcache_lock_blocked_by_one_max") == 2
        waited = value(got, "pgcache_lock_wait_max_seconds")
        assert waited is not None and 1.0 <= waited < 60
        assert value(got, "pgcache_locks", mode="AccessExclusiveLock", granted="true") == 1
        assert value(got, "pgcache_locks", mode="AccessShareLock", granted="false") == 2
        assert types(got)["pgcache_locks"] == "gauge"
        assert "pid=" not in got
        await tx.rollback()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        for task in tasks:
            task.cancel()
        for c in (holder, *waiters):
            await c.close()
