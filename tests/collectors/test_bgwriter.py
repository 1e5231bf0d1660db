"""`bgwriter`, a collector that is only a definition: the same families on PostgreSQL 15
(pg_stat_bgwriter) and 18 (pg_stat_checkpointer split off in 17), with values that move."""

from __future__ import annotations

from metrics_text import types, value

from collectors.collector_harness import (
    builtin,
    collect,
    promtool_check_metrics,
    target_for,
    wait_until,
)
from exporter.demo.servers import PostgresCluster

COUNTERS = ["pgcache_checkpoints_timed", "pgcache_checkpoints_requested",
            "pgcache_checkpoint_write_seconds", "pgcache_checkpoint_sync_seconds",
            "pgcache_checkpoint_buffers_written", "pgcache_bgwriter_buffers_clean",
            "pgcache_bgwriter_maxwritten_clean", "pgcache_bgwriter_buffers_alloc"]


async def test_same_families_on_both_sides_of_the_split(cluster: PostgresCluster, promtool: str) -> None:
    version = int(cluster.psql("SHOW server_version_num"))
    view = "pg_stat_checkpointer" if version >= 170000 else "pg_stat_bgwriter"
    column = "num_requested" if version >= 170000 else "checkpoints_req"
    before = int(cluster.psql(f"SELECT {column} FROM {view}"))
    cluster.psql("CREATE TABLE IF NOT EXISTS bgw_probe (id int); INSERT INTO bgw_probe SELECT generate_series(1, 1000)")
    cluster.psql("CHECKPOINT")
    wait_until(cluster, f"SELECT {column} > {before} FROM {view}")
    async with target_for(cluster.dsn) as t:
        got = await collect(builtin(t, "bgwriter"))
    promtool_check_metrics(promtool, got.text.encode())
    t_ = types(got.text)
    for name in COUNTERS:
        assert t_[name] == "counter", name
        assert value(got.text, name + "_total", target="main") is not None, name
    requested = value(got.text, "pgcache_checkpoints_requested_total", target="main")
    assert requested is not None and requested >= before + 1
    assert requested == int(cluster.psql(f"SELECT {column} FROM {view}"))
    written = value(got.text, "pgcache_checkpoint_buffers_written_total", target="main")
    assert written is not None and written > 0
    assert t_["pgcache_bgwriter_stats_reset_timestamp_seconds"] == "gauge"
