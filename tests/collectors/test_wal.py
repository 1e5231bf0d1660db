"""`wal`: pg_stat_wal counters move with writes, pg_wal's size is reported, and an archiver whose
archive_command fails is counted with the time of its last failure."""

from __future__ import annotations

from metrics_text import types, value

from collectors.collector_harness import (
    builtin,
    collect,
    create_monitor_role,
    promtool_check_metrics,
    target_for,
    wait_until,
)
from exporter.demo.servers import PostgresCluster


async def test_wal_counters_and_a_failing_archiver(cluster: PostgresCluster, promtool: str) -> None:
    settings = {"archive_mode": "on", "archive_command": "'false'"}
    with PostgresCluster(bindir=cluster.bindir, settings=settings) as pg:
        dsn = create_monitor_role(pg)
        async with target_for(dsn) as t:
            before = (await collect(builtin(t, "wal"))).text
            pg.psql("CREATE TABLE wal_probe AS SELECT generate_series(1, 20000) AS id")
            pg.psql("SELECT pg_switch_wal()")
            wait_until(pg, "SELECT failed_count > 0 FROM pg_stat_archiver", timeout=20)
            after = (await collect(builtin(t, "wal"))).text
    promtool_check_metrics(promtool, after.encode())
    for name in ("pgcache_wal_records", "pgcache_wal_bytes", "pgcache_wal_full_page_images",
                 "pgcache_wal_buffers_full", "pgcache_archiver_archived", "pgcache_archiver_failed"):
        assert types(after)[name] == "counter", name
    grew = value(after, "pgcache_wal_bytes_total")
    was = value(before, "pgcache_wal_bytes_total")
    assert grew is not None and was is not None and grew > was + 100_000
    records = value(after, "pgcache_wal_records_total")
    assert records is not None and records > 20_000
    size = value(after, "pgcache_wal_directory_bytes")
    assert size is not None and size >= 16 * 1024 * 1024
    assert value(after, "pgcache_wal_directory_segments") == size / (16 * 1024 * 1024)
    assert value(after, "pgcache_archiver_enabled") == 1
    failed = value(after, "pgcache_archiver_failed_total")
    assert failed is not None and failed >= 1
    assert value(after, "pgcache_archiver_archived_total") == 0
    assert value(after, "pgcache_archiver_last_failed_timestamp_seconds") is not None
    assert value(after, "pgcache_archiver_last_archived_timestamp_seconds") is None  # never archived
