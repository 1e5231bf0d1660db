"""The indexes collector against a real cluster: exact values, the unused-index rule case by case,
invalid and redundant indexes, last scan (PostgreSQL 16+), and sizes skipped under a lock."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
from metrics_text import samples, types, value
from prometheus_client.parser import text_string_to_metric_families

from collectors.collector_harness import (
    builtin,
    collect,
    drop_database,
    fresh_database,
    target_for,
    wait_until,
)
from exporter.config import IndexesSettings
from exporter.demo.servers import PostgresCluster
from exporter.postgres.indexes import IndexesCollector

DB = "idx_known"
SETUP = """
CREATE TABLE items (id int PRIMARY KEY, code text UNIQUE, a int, b int, note text);
INSERT INTO items SELECT g, 'c' || g, g % 100, g % 7, 'n' || (g % 13) FROM generate_series(1, 20000) g;
CREATE INDEX items_a ON items (a);
CREATE INDEX items_a_note ON items (a, note);
CREATE INDEX items_b ON items (b);
CREATE INDEX items_small ON items (a) WHERE a < 0;
"""
ALL = {"items_pkey", "items_code_key", "items_a", "items_a_note", "items_b", "items_small", "items_bad"}


@pytest.fixture(scope="module")
def known(pg: PostgresCluster) -> Iterator[str]:
    fresh_database(pg, DB, SETUP)
    # A failed CREATE INDEX CONCURRENTLY leaves an invalid index behind.
    with pytest.raises(RuntimeError, match="could not create unique index"):
        pg.psql("CREATE UNIQUE INDEX CONCURRENTLY items_bad ON items (a)", db=DB)
    pg.psql("SET enable_seqscan = off; SET enable_bitmapscan = off;"
            "SELECT count(note) FROM items WHERE b = 3", db=DB)
    wait_until(pg, "SELECT idx_scan > 0 FROM pg_stat_user_indexes WHERE indexrelname = 'items_b'", db=DB)
    yield DB
    drop_database(pg, DB)


def flagged(text: str, name: str) -> set[str]:
    return {s.labels["index"] for f in text_string_to_metric_families(text)
            if f.name == name for s in f.samples if s.value == 1}


async def run(pg: PostgresCluster, **kw: object) -> str:
    async with target_for(pg.dsn, include=(f"^{DB}$",)) as t:
        got = await collect(IndexesCollector(t, IndexesSettings(**kw)))  # type: ignore[arg-type]
    assert got.result.partial_errors == []
    return got.text


async def test_index_values_and_types(pg: PostgresCluster, known: str) -> None:
    text = await run(pg, unused_min_stats_age=0, unused_min_size="50kB")
    rows = pg.psql("SELECT indexrelname, idx_scan, idx_tup_read, idx_tup_fetch, pg_relation_size(indexrelid)"
                   " FROM pg_stat_user_indexes", db=known).splitlines()
    assert {r.split("|")[0] for r in rows} == ALL
    for r in rows:
        name, scans, read, fetched, size = r.split("|")
        lv = {"target": "main", "datname": DB, "schema": "public", "table": "items", "index": name}
        assert value(text, "pgcache_index_scans_total", **lv) == float(scans)
        assert value(text, "pgcache_index_tuples_read_total", **lv) == float(read)
        assert value(text, "pgcache_index_tuples_fetched_total", **lv) == float(fetched)
        assert value(text, "pgcache_index_size_bytes", **lv) == float(size)
    assert value(text, "pgcache_index_scans_total", index="items_b") > 0
    t = types(text)
    assert t["pgcache_index_scans"] == t["pgcache_index_tuples_read"] == "counter"
    assert t["pgcache_index_size_bytes"] == t["pgcache_index_unused"] == "gauge"
    assert "pgcache_index_last_scan_timestamp_seconds" not in t  # PostgreSQL 15
    assert value(text, "pgcache_indexes_skipped_locked", datname=DB) == 0


async def test_unused_rule_case_by_case(pg: PostgresCluster, known: str) -> None:
    text = await run(pg, unused_min_stats_age=0, unused_min_size="50kB")
    # items_a, items_a_note: plain, never scanned, big enough -> flagged.
    # items_pkey / items_code_key: primary key and unique, never flagged though never scanned.
    # items_b: used. items_small: below unused_min_size. items_bad: invalid.
    assert flagged(text, "pgcache_index_unused") == {"items_a", "items_a_note"}
    assert flagged(text, "pgcache_index_invalid") == {"items_bad"}
    assert value(text, "pgcache_index_redundant", index="items_a", covered_by="items_a_note") == 1
    assert flagged(text, "pgcache_index_redundant") == {"items_a"}
    age = value(text, "pgcache_database_stats_age_seconds", target="main", datname=DB)
    assert age is not None and age > 0


async def test_statistics_too_young(pg: PostgresCluster, known: str) -> None:
    text = await run(pg, unused_min_stats_age="3650d", unused_min_size=0)
    assert flagged(text, "pgcache_index_unused") == set()
    age = value(text, "pgcache_database_stats_age_seconds", datname=DB)
    assert age is not None and 0 < age < 3650 * 86400


async def test_small_sizes_count_with_a_zero_minimum(pg: PostgresCluster, known: str) -> None:
    text = await run(pg, unused_min_stats_age=0, unused_min_size=0)
    assert flagged(text, "pgcache_index_unused") == {"items_a", "items_a_note", "items_small"}


async def test_limit_keeps_flagged_indexes_first(pg: PostgresCluster, known: str) -> None:
    async with target_for(pg.dsn, include=(f"^{DB}$",)) as t:
        got = await collect(IndexesCollector(t, IndexesSettings(
            unused_min_stats_age=0, unused_min_size="50kB", limit=4)))  # type: ignore[arg-type]
    exported = {s.labels["index"] for f in text_string_to_metric_families(got.text)
                if f.name == "pgcache_index_scans" for s in f.samples}
    assert len(exported) == 4
    # The three cut indexes' series: scans, tuples read, tuples fetched and size each.
    assert got.result.dropped == (len(ALL) - 4) * 4
    kept = {s.labels["index"] for s in samples_of(got.text, "pgcache_index_scans")}
    biggest_other = pg.psql(
        "SELECT indexrelname FROM pg_stat_user_indexes WHERE indexrelname NOT IN"
        " ('items_a', 'items_a_note', 'items_bad') ORDER BY pg_relation_size(indexrelid) DESC LIMIT 1",
        db=known)
    assert kept == {"items_a", "items_a_note", "items_bad", biggest_other}  # flagged, then biggest


def samples_of(text: str, family: str) -> list:  # type: ignore[type-arg]
    return [s for f in text_string_to_metric_families(text) if f.name == family for s in f.samples]


async def test_sizes_skipped_while_a_table_is_locked(pg: PostgresCluster, known: str) -> None:
    holder = await asyncpg.connect(pg.dsn_for(db=known))
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        async with target_for(pg.dsn, include=(f"^{DB}$",)) as t:
            idx = await collect(IndexesCollector(t, IndexesSettings(unused_min_stats_age=0)))  # type: ignore[arg-type]
            tables = await collect(builtin(t, "tables"))
        await tx.rollback()
    finally:
        await holder.close()
    assert idx.result.partial_errors == tables.result.partial_errors == []
    assert value(idx.text, "pgcache_indexes_skipped_locked", target="main", datname=DB) == len(ALL)
    assert samples(idx.text, "pgcache_index_size_bytes") == []
    assert len(samples(idx.text, "pgcache_index_scans_total")) == len(ALL)  # usage needs no lock
    assert value(tables.text, "pgcache_tables_skipped_locked", datname=DB) == 1
    assert samples(tables.text, "pgcache_table_size_bytes", table="items") == []
    assert value(tables.text, "pgcache_table_live_rows", table="items") is not None


async def test_last_scan_on_16_and_later(pg18: PostgresCluster) -> None:
    db = fresh_database(pg18, "idx_last", "CREATE TABLE t (id int PRIMARY KEY);"
                        "INSERT INTO t SELECT generate_series(1, 100)")
    pg18.psql("SELECT * FROM t WHERE id = 5", db=db)
    wait_until(pg18, "SELECT last_idx_scan IS NOT NULL FROM pg_stat_user_indexes", db=db)
    async with target_for(pg18.dsn, include=("^idx_last$",)) as t:
        got = await collect(IndexesCollector(t, IndexesSettings()))
    expected = float(pg18.psql("SELECT extract(epoch FROM last_idx_scan) FROM pg_stat_user_indexes", db=db))
    assert value(got.text, "pgcache_index_last_scan_timestamp_seconds", index="t_pkey") == pytest.approx(expected)
    assert types(got.text)["pgcache_index_last_scan_timestamp_seconds"] == "gauge"
    drop_database(pg18, db)
