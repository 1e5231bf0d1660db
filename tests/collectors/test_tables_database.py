"""The tables and database collectors against a real cluster, database discovery (new, dropped and
refusing databases), and a role with only pg_monitor running every collector."""

from __future__ import annotations

import pytest
from metrics_text import samples, types, value

from collectors.collector_harness import (
    builtin,
    collect,
    drop_database,
    fresh_database,
    target_for,
    wait_until,
)
from exporter.config import (
    IndexesSettings,
    StatementsSettings,
)
from exporter.demo.servers import PostgresCluster
from exporter.postgres.indexes import IndexesCollector
from exporter.postgres.statements import StatementsCollector

TABLES_SETUP = """
CREATE TABLE big (id int PRIMARY KEY, doc text);
INSERT INTO big SELECT g, (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 100) i)
FROM generate_series(1, 300) g;
CREATE TABLE mid (id int);
INSERT INTO mid SELECT generate_series(1, 1000);
DELETE FROM mid WHERE id <= 100;
CREATE TABLE tiny (id int);
"""


async def test_tables_exact_values(pg: PostgresCluster) -> None:
    db = fresh_database(pg, "tbl_known", TABLES_SETUP)
    pg.psql("VACUUM big", db=db)
    pg.psql("ANALYZE mid", db=db)
    pg.psql("SELECT count(*) FROM tiny", db=db)
    wait_until(pg, "SELECT n_dead_tup = 100 AND last_analyze IS NOT NULL FROM pg_stat_user_tables"
               " WHERE relname = 'mid'", db=db)
    wait_until(pg, "SELECT seq_scan > 0 FROM pg_stat_user_tables WHERE relname = 'tiny'", db=db)
    async with target_for(pg.dsn, include=("^tbl_known$",)) as t:
        got = await collect(builtin(t, "tables"))
        cut = await collect(builtin(t, "tables", limit=2))
    rows = pg.psql(
        "SELECT s.relname, pg_table_size(relid) - coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0),"
        " pg_indexes_size(relid), coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0),"
        " n_live_tup, n_dead_tup, seq_scan, coalesce(idx_scan::text, ''),"
        " coalesce(extract(epoch FROM last_vacuum)::text, ''), coalesce(extract(epoch FROM last_analyze)::text, '')"
        " FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid", db=db).splitlines()
    assert len(rows) == 3
    for r in rows:
        name, heap, idx, toast, live, dead, seq, iscan, vac, ana = r.split("|")
        lv = {"target": "main", "datname": db, "schema": "public", "table": name}
        assert value(got.text, "pgcache_table_size_bytes", **lv) == float(heap)
        assert value(got.text, "pgcache_table_indexes_size_bytes", **lv) == float(idx)
        assert value(got.text, "pgcache_table_toast_size_bytes", **lv) == float(toast)
        assert value(got.text, "pgcache_table_live_rows", **lv) == float(live)
        assert value(got.text, "pgcache_table_dead_rows", **lv) == float(dead)
        assert value(got.text, "pgcache_table_seq_scans_total", **lv) == float(seq)
        assert value(got.text, "pgcache_table_index_scans_total", **lv) == (float(iscan) if iscan else None)
        assert value(got.text, "pgcache_table_last_vacuum_timestamp_seconds", **lv) == (
            pytest.approx(float(vac)) if vac else None)
        assert value(got.text, "pgcache_table_last_analyze_timestamp_seconds", **lv) == (
            pytest.approx(float(ana)) if ana else None)
    assert value(got.text, "pgcache_table_toast_size_bytes", table="big") > 0
    assert value(got.text, "pgcache_table_dead_rows", table="mid") == 100
    assert value(got.text, "pgcache_table_live_rows", table="mid") == 900
    t = types(got.text)
    assert t["pgcache_table_seq_scans"] == t["pgcache_table_index_scans"] == "counter"
    assert t["pgcache_table_size_bytes"] == t["pgcache_table_last_autovacuum_timestamp_seconds"] == "gauge"
    assert got.result.dropped == 0
    # limit 2: the smallest table is cut, and its series counted (what the uncut run had for it).
    tiny_series = [line for line in got.text.splitlines() if 'table="tiny"' in line]
    assert len(tiny_series) >= 6
    assert cut.result.dropped == len(tiny_series)
    assert {s for s in ("big", "mid", "tiny") if samples(cut.text, "pgcache_table_live_rows", table=s)} == {"big", "mid"}
    drop_database(pg, db)


async def test_database_exact_values(pg: PostgresCluster) -> None:
    db = fresh_database(pg, "db_known")
    pg.psql("SELECT pg_stat_reset()", db=db)
    pg.psql("SET work_mem = '64kB'; SELECT count(*) FROM (SELECT g FROM generate_series(1, 100000) g"
            " ORDER BY g DESC) s", db=db)
    wait_until(pg, "SELECT temp_bytes > 0 FROM pg_stat_database WHERE datname = current_database()", db=db)
    async with target_for(pg.dsn, include=("^db_known$",)) as t:
        got = await collect(builtin(t, "database"))
    size, temp, reset, deadlocks, conflicts = pg.psql(
        "SELECT pg_database_size(datid), temp_bytes, extract(epoch FROM stats_reset), deadlocks, conflicts"
        " FROM pg_stat_database WHERE datname = 'db_known'").split("|")
    lv = {"target": "main", "datname": db}
    assert value(got.text, "pgcache_database_size_bytes", **lv) == float(size)
    assert value(got.text, "pgcache_database_temp_bytes_total", **lv) == float(temp) > 0
    assert value(got.text, "pgcache_database_stats_reset_timestamp_seconds", **lv) == pytest.approx(float(reset))
    assert value(got.text, "pgcache_database_deadlocks_total", **lv) == float(deadlocks) == 0
    assert value(got.text, "pgcache_database_conflicts_total", **lv) == float(conflicts) == 0
    assert value(got.text, "pgcache_database_commits_total", **lv) >= 1
    assert value(got.text, "pgcache_database_blocks_hit_total", **lv) is not None
    # The include regex applies: no other database is reported.
    assert {s for s in ("postgres", "template1", db) if samples(got.text, "pgcache_database_size_bytes", datname=s)} == {db}
    t = types(got.text)
    for name in ("commits", "rollbacks", "blocks_hit", "blocks_read", "deadlocks", "temp_bytes", "conflicts"):
        assert t[f"pgcache_database_{name}"] == "counter", name
    assert t["pgcache_database_size_bytes"] == "gauge"
    drop_database(pg, db)


def datnames(text: str) -> set[str]:
    return {s.labels["datname"] for s in _samples(text, "pgcache_table_live_rows")}


def _samples(text: str, family: str) -> list:  # type: ignore[type-arg]
    from prometheus_client.parser import text_string_to_metric_families
    return [s for f in text_string_to_metric_families(text) if f.name == family for s in f.samples]


async def test_discovery_new_dropped_and_refusing_databases(pg: PostgresCluster, monitor_dsn: str) -> None:
    for name in ("disc_a", "disc_b", "disc_c"):
        fresh_database(pg, name, "CREATE TABLE t (id int)")
    pg.psql("REVOKE CONNECT ON DATABASE disc_c FROM PUBLIC")  # refuses the monitoring role
    try:
        async with target_for(monitor_dsn, include=("^disc_",)) as t:
            collector = builtin(t, "tables")
            first = await collect(collector)
            assert datnames(first.text) == {"disc_a", "disc_b"}
            assert len(first.result.partial_errors) == 1
            assert "disc_c" in first.result.partial_errors[0]

            fresh_database(pg, "disc_d", "CREATE TABLE t (id int)")
            drop_database(pg, "disc_b")
            second = await collect(collector)
            assert datnames(second.text) == {"disc_a", "disc_d"}
    finally:
        for name in ("disc_a", "disc_b", "disc_c", "disc_d"):
            drop_database(pg, name)


async def test_pg_monitor_role_collects_everything(pg: PostgresCluster, monitor_dsn: str) -> None:
    db = fresh_database(pg, "mon_app", "CREATE TABLE t (id int PRIMARY KEY, v text);"
                        "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 1000) g;")
    pg.psql("SELECT v FROM t WHERE id = 7", db=db)
    async with target_for(monitor_dsn, include=("^mon_",)) as t:
        results = {
            c.name: await collect(c) for c in (
                StatementsCollector(t, StatementsSettings()),
                IndexesCollector(t, IndexesSettings()),
                builtin(t, "tables"),
                builtin(t, "database"),
            )
        }
    for name, got in results.items():
        assert got.result.partial_errors == [], name
    stm = results["statements"].text
    # pg_read_all_stats (in pg_monitor) shows other roles' statements with their queryid and text.
    seen = samples(stm, "pgcache_statement_calls_total", datname=db, user="postgres")
    assert seen and samples(stm, "pgcache_statement_calls_total", queryid="") == []
    assert samples(stm, "pgcache_statement_info", datname=db, query="SELECT v FROM t WHERE id = $1") == [1]
    assert value(results["indexes"].text, "pgcache_index_size_bytes", datname=db, index="t_pkey") > 0
    assert value(results["tables"].text, "pgcache_table_size_bytes", datname=db, table="t") > 0
    assert value(results["database"].text, "pgcache_database_size_bytes", datname=db) > 0
    drop_database(pg, db)
