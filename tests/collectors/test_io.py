"""`io`: pg_stat_io figures on PostgreSQL 18 (16+), and no io family, without error, on 15."""

from __future__ import annotations

from metrics_text import samples, types, value

from collectors.collector_harness import (
    builtin,
    collect,
    create_monitor_role,
    promtool_check_metrics,
    target_for,
)
from exporter.demo.servers import PostgresCluster


async def test_pg_stat_io_on_16_and_later_only(cluster: PostgresCluster, promtool: str) -> None:
    dsn = create_monitor_role(cluster)
    cluster.psql("CREATE TABLE IF NOT EXISTS io_probe AS SELECT generate_series(1, 10000) AS id")
    cluster.psql("SELECT count(*) FROM io_probe")
    async with target_for(dsn) as t:
        got = await collect(builtin(t, "io"))
    assert got.result.partial_errors == []
    if cluster.major < 16:
        assert got.result.families == [] and "pgcache_io_" not in got.text
        return
    promtool_check_metrics(promtool, got.text.encode())
    version = int(cluster.psql("SHOW server_version_num"))
    assert version >= 160000
    normal = {"backend_type": "client backend", "object": "relation", "context": "normal"}
    hits = value(got.text, "pgcache_io_hits_total", **normal)
    assert hits is not None and hits > 0
    reads = value(got.text, "pgcache_io_reads_total", **normal)
    read_bytes = value(got.text, "pgcache_io_read_bytes_total", **normal)
    # 18 counts bytes itself and may read several blocks in one operation.
    assert reads is not None and read_bytes is not None and read_bytes >= reads * 8192 > 0
    assert types(got.text)["pgcache_io_extends"] == "counter"
    assert sum(samples(got.text, "pgcache_io_extends_total")) > 0
