"""`server` and `wraparound`: settings in base units, a setting pending restart counted, start
time; XID age and the fractions towards wraparound per database, moving as XIDs are used."""

from __future__ import annotations

import asyncio
import time

import pytest
from metrics_text import value

from collectors.collector_harness import (
    builtin,
    collect,
    create_monitor_role,
    promtool_check_metrics,
    target_for,
)
from exporter.demo.servers import PostgresCluster


async def test_settings_and_pending_restart(cluster: PostgresCluster, promtool: str) -> None:
    with PostgresCluster(bindir=cluster.bindir) as pg:
        dsn = create_monitor_role(pg)
        async with target_for(dsn) as t:
            got = (await collect(builtin(t, "server"))).text
            pg.psql("ALTER SYSTEM SET shared_buffers = '32MB'")
            pg.psql("SELECT pg_reload_conf()")
            await asyncio.sleep(0.5)
            pending = (await collect(builtin(t, "server"))).text
    promtool_check_metrics(promtool, got.encode())
    assert value(got, "pgcache_settings_pending_restart") == 0
    assert value(pending, "pgcache_settings_pending_restart") == 1
    assert value(got, "pgcache_setting_shared_buffers_bytes") == 64 * 1024 * 1024  # the test clusters' 64MB
    assert value(got, "pgcache_setting_max_connections") == 100
    assert value(got, "pgcache_setting_work_mem_bytes") == 4 * 1024 * 1024
    assert value(got, "pgcache_setting_max_wal_size_bytes") == 1024 ** 3
    assert value(got, "pgcache_setting_checkpoint_timeout_seconds") == 300
    assert value(got, "pgcache_setting_autovacuum_freeze_max_age") == 200_000_000
    started = value(got, "pgcache_postmaster_start_timestamp_seconds")
    assert started is not None and time.time() - 120 < started <= time.time()
    loaded = value(pending, "pgcache_config_load_timestamp_seconds")
    assert loaded is not None and loaded >= started


async def test_wraparound_age_and_ratio(cluster: PostgresCluster, promtool: str) -> None:
    dsn = create_monitor_role(cluster)
    async with target_for(dsn) as t:
        before = (await collect(builtin(t, "wraparound"))).text
        cluster.psql("DO $$ BEGIN FOR i IN 1..200 LOOP PERFORM pg_current_xact_id(); "
                     "COMMIT; END LOOP; END $$")
        after = (await collect(builtin(t, "wraparound"))).text
    promtool_check_metrics(promtool, after.encode())
    was = value(before, "pgcache_database_xid_age", datname="postgres")
    age = value(after, "pgcache_database_xid_age", datname="postgres")
    assert was is not None and age is not None and age >= was + 200
    assert age == int(cluster.psql("SELECT age(datfrozenxid) FROM pg_database WHERE datname = 'postgres'"))
    assert value(after, "pgcache_database_xid_wraparound_ratio", datname="postgres") == pytest.approx(age / 2**31)
    assert value(after, "pgcache_database_xid_autovacuum_ratio", datname="postgres") == pytest.approx(age / 200_000_000)
    assert value(after, "pgcache_database_mxid_age", datname="postgres") is not None
    assert value(after, "pgcache_database_xid_age", datname="template0") is None  # outside the selection
