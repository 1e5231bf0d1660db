"""`replication` and `replication_slots` on real servers: a primary with a streaming standby
(pg_basebackup -R). Standby lag rises while the standby's replay is paused and falls back to 0
after resume; an idle primary shows no lag on either side (postgres_exporter #385, #907); a
physical slot without a consumer retains more and more WAL. Read under pg_monitor only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from metrics_text import value

from collectors.collector_harness import (
    MONITOR_PASSWORD,
    MONITOR_USER,
    builtin,
    collect,
    create_monitor_role,
    promtool_check_metrics,
    target_for,
    wait_until,
)
from collectors.standby import StandbyCluster, allow_replication
from exporter.demo.servers import PostgresCluster

STANDBY = {"application_name": "walreceiver", "state": "streaming", "sync_state": "async"}


@pytest.fixture
def pair(cluster: PostgresCluster) -> Iterator[tuple[PostgresCluster, StandbyCluster]]:
    """A throwaway primary of the version under test and its streaming standby."""
    with PostgresCluster(bindir=cluster.bindir) as primary:
        allow_replication(primary)
        create_monitor_role(primary)
        primary.psql("CREATE TABLE ticks (id serial PRIMARY KEY, at timestamptz DEFAULT now())")
        with StandbyCluster(primary) as standby:
            wait_until(primary, "SELECT count(*) = 1 FROM pg_stat_replication WHERE state = 'streaming'", timeout=30)
            yield primary, standby


CAUGHT_UP = "SELECT pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()"


async def scrape(pg: PostgresCluster, name: str) -> str:
    # The standby is a copy of the primary: the pg_monitor role exists there too.
    async with target_for(pg.dsn_for(MONITOR_USER, MONITOR_PASSWORD)) as t:
        return (await collect(builtin(t, name))).text


def tick(primary: PostgresCluster, rows: int = 200) -> None:
    primary.psql(f"INSERT INTO ticks (at) SELECT now() FROM generate_series(1, {rows})")


async def test_standby_lag_rises_while_paused_and_returns_to_zero(
    pair: tuple[PostgresCluster, StandbyCluster], promtool: str
) -> None:
    primary, standby = pair
    tick(primary)
    wait_until(standby, "SELECT count(*) = 200 FROM ticks")
    wait_until(standby, CAUGHT_UP)

    # Idle primary: no lag on either side, however long it has been since the last commit.
    await asyncio.sleep(1.5)
    on_standby = await scrape(standby, "replication")
    promtool_check_metrics(promtool, on_standby.encode())
    assert value(on_standby, "pgcache_in_recovery") == 1
    assert value(on_standby, "pgcache_standby_replay_paused") == 0
    assert value(on_standby, "pgcache_standby_streaming") == 1
    assert value(on_standby, "pgcache_standby_replay_lag_bytes") == 0
    assert value(on_standby, "pgcache_standby_replay_lag_seconds") == 0
    last_replay = value(on_standby, "pgcache_standby_last_replay_timestamp_seconds")
    assert last_replay is not None and time.time() - last_replay >= 1.5  # what a naive lag would report
    on_primary = await scrape(primary, "replication")
    promtool_check_metrics(promtool, on_primary.encode())
    assert value(on_primary, "pgcache_in_recovery") == 0
    assert value(on_primary, "pgcache_standby_replay_lag_seconds") is None  # standby-only families
    for kind in ("sent", "write", "flush", "replay"):
        assert value(on_primary, f"pgcache_replication_{kind}_lag_bytes", **STANDBY) == 0, kind
    for kind in ("write", "flush", "replay"):
        assert value(on_primary, f"pgcache_replication_{kind}_lag_seconds", **STANDBY) == 0, kind

    # Replay paused while the primary writes: the lag rises, in bytes and in seconds.
    standby.psql("SELECT pg_wal_replay_pause()")
    wait_until(standby, "SELECT pg_get_wal_replay_pause_state() = 'paused'")
    tick(primary)
    wait_until(standby, "SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()")
    first = await scrape(standby, "replication")
    assert value(first, "pgcache_standby_replay_paused") == 1
    lag1 = value(first, "pgcache_standby_replay_lag_bytes")
    assert lag1 is not None and lag1 > 0
    seconds1 = value(first, "pgcache_standby_replay_lag_seconds")
    assert seconds1 is not None and seconds1 > 0
    tick(primary, 2000)
    wait_until(primary, "SELECT bool_and(flush_lsn = pg_current_wal_lsn()) FROM pg_stat_replication")
    await asyncio.sleep(0.5)
    second = await scrape(standby, "replication")
    lag2 = value(second, "pgcache_standby_replay_lag_bytes")
    seconds2 = value(second, "pgcache_standby_replay_lag_seconds")
    assert lag2 is not None and lag2 > lag1
    assert seconds2 is not None and seconds2 > seconds1
    from_primary = await scrape(primary, "replication")
    replay_bytes = value(from_primary, "pgcache_replication_replay_lag_bytes", **STANDBY)
    assert replay_bytes is not None and replay_bytes > 0

    # Resumed: back to 0 on both sides.
    standby.psql("SELECT pg_wal_replay_resume()")
    wait_until(standby, "SELECT count(*) = 2400 FROM ticks")
    wait_until(standby, CAUGHT_UP)
    wait_until(primary, "SELECT bool_and(replay_lsn = pg_current_wal_lsn()) FROM pg_stat_replication")
    after = await scrape(standby, "replication")
    assert value(after, "pgcache_standby_replay_paused") == 0
    assert value(after, "pgcache_standby_replay_lag_bytes") == 0
    assert value(after, "pgcache_standby_replay_lag_seconds") == 0
    from_primary = await scrape(primary, "replication")
    assert value(from_primary, "pgcache_replication_replay_lag_bytes", **STANDBY) == 0
    assert value(from_primary, "pgcache_replication_replay_lag_seconds", **STANDBY) == 0


async def test_slot_without_consumer_retains_more_and_more_wal(cluster: PostgresCluster, promtool: str) -> None:
    dsn = create_monitor_role(cluster)
    cluster.psql("SELECT pg_create_physical_replication_slot('pgcache_idle_slot', true)")
    try:
        cluster.psql("CREATE TABLE IF NOT EXISTS slot_probe (v text)")
        async with target_for(dsn) as t:
            first = (await collect(builtin(t, "replication_slots"))).text
            cluster.psql("INSERT INTO slot_probe SELECT repeat('x', 100) FROM generate_series(1, 5000)")
            cluster.psql("CHECKPOINT")  # synchronous_commit is off here: have the WAL written out
            second = (await collect(builtin(t, "replication_slots"))).text
        promtool_check_metrics(promtool, second.encode())
        slot = {"slot_name": "pgcache_idle_slot", "slot_type": "physical", "database": ""}
        assert value(second, "pgcache_replication_slot_active", **slot) == 0
        before = value(first, "pgcache_replication_slot_retained_wal_bytes", **slot)
        after = value(second, "pgcache_replication_slot_retained_wal_bytes", **slot)
        assert before is not None and after is not None and after > before + 500_000
        assert value(second, "pgcache_replication_slot_wal_status", wal_status="reserved", **slot) == 1
        for other in ("extended", "unreserved", "lost"):
            assert value(second, "pgcache_replication_slot_wal_status", wal_status=other, **slot) == 0
        # No max_slot_wal_keep_size: no safe size to report.
        assert value(second, "pgcache_replication_slot_safe_wal_size_bytes", **slot) is None
    finally:
        cluster.psql("SELECT pg_drop_replication_slot('pgcache_idle_slot')")
