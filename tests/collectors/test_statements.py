"""The statements collector against real clusters (PostgreSQL 15 and 18): exact values, labels and
types; the limit and its stable selection; hostile query text; a missing extension; hidden rows."""

from __future__ import annotations

import pytest
from metrics_text import samples, types, value
from prometheus_client.parser import text_string_to_metric_families

from collectors.collector_harness import (
    collect,
    fresh_database,
    one,
    promtool_check_metrics,
    target_for,
)
from exporter.config import StatementsSettings
from exporter.demo.servers import PostgresCluster
from exporter.errors import QueryError
from exporter.postgres.statements import StatementsCollector


def settings(**kw: object) -> StatementsSettings:
    return StatementsSettings(**kw)  # type: ignore[arg-type]


async def test_known_statements_exact_values(cluster: PostgresCluster) -> None:
    db = fresh_database(cluster, "stm_known", "CREATE TABLE items (id int PRIMARY KEY, v text);"
                        "INSERT INTO items SELECT g, 'v' FROM generate_series(1, 100) g")
    cluster.psql("SELECT pg_stat_statements_reset()")
    cluster.psql("SELECT count(*) FROM items WHERE id < 10", db=db)
    cluster.psql("SELECT count(*) FROM items WHERE id < 50", db=db)

    async with target_for(cluster.dsn) as t:
        got = await collect(StatementsCollector(t, settings()))

    read_col = ("shared_blk_read_time + local_blk_read_time" if cluster.major >= 17
                else "blk_read_time")
    row = cluster.psql(
        "SELECT queryid, sum(calls), sum(rows), sum(total_exec_time) / 1000, sum(total_plan_time) / 1000,"
        f" sum(shared_blks_hit), sum(shared_blks_read), sum(temp_blks_written), sum({read_col}) / 1000"
        " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
        " WHERE d.datname = 'stm_known' AND query = 'SELECT count(*) FROM items WHERE id < $1'"
        " GROUP BY queryid"
    ).split("|")
    qid = row[0]
    lv = {"target": "main", "datname": "stm_known", "user": "postgres", "queryid": qid}
    assert value(got.text, "pgcache_statement_calls_total", **lv) == 2 == float(row[1])
    assert value(got.text, "pgcache_statement_rows_total", **lv) == 2 == float(row[2])
    assert value(got.text, "pgcache_statement_exec_seconds_total", **lv) == pytest.approx(float(row[3]), rel=1e-12)
    assert value(got.text, "pgcache_statement_plan_seconds_total", **lv) == pytest.approx(float(row[4]), rel=1e-12)
    assert value(got.text, "pgcache_statement_shared_blocks_hit_total", **lv) == float(row[5])
    assert value(got.text, "pgcache_statement_shared_blocks_read_total", **lv) == float(row[6])
    assert value(got.text, "pgcache_statement_temp_blocks_written_total", **lv) == float(row[7]) == 0
    # track_io_timing is on in the test clusters, so block I/O time is exported.
    assert value(got.text, "pgcache_statement_block_read_seconds_total", **lv) == pytest.approx(float(row[8]), rel=1e-12)
    assert value(got.text, "pgcache_statement_block_write_seconds_total", **lv) is not None
    assert value(got.text, "pgcache_statement_info", **lv, query="SELECT count(*) FROM items WHERE id < $1") == 1

    t = types(got.text)
    for name in ("calls", "exec_seconds", "plan_seconds", "rows", "shared_blocks_hit",
                 "shared_blocks_read", "temp_blocks_written", "block_read_seconds"):
        assert t[f"pgcache_statement_{name}"] == "counter", name
    assert t["pgcache_statement_info"] == "gauge"
    assert t["pgcache_statements_deallocations"] == "counter"
    assert value(got.text, "pgcache_statements_deallocations_total", target="main") == 0
    reset = float(cluster.psql("SELECT extract(epoch FROM stats_reset) FROM pg_stat_statements_info"))
    assert value(got.text, "pgcache_statements_stats_reset_timestamp_seconds", target="main") == pytest.approx(reset)
    # Rows are summed over toplevel: one series per (database, user, queryid), never two.
    keys = [tuple(s.labels[k] for k in ("datname", "user", "queryid"))
            for f in text_string_to_metric_families(got.text) if f.name == "pgcache_statement_calls"
            for s in f.samples]
    assert len(keys) == len(set(keys))
    assert got.result.dropped == 0


def _distinct_keys(pg: PostgresCluster) -> int:
    sql = "SELECT count(*) FROM (SELECT DISTINCT dbid, userid, queryid FROM pg_stat_statements) s"
    pg.psql(sql)  # the count query itself becomes a statement: count again with it in
    return int(pg.psql(sql))


async def test_limit_cuts_are_counted_and_selection_is_stable(pg: PostgresCluster) -> None:
    pg.psql("SELECT pg_stat_statements_reset()")
    # Eight statements of distinct shape, the k-th sleeping k x 5 ms.
    for k in range(1, 9):
        pg.psql(f"SELECT pg_sleep({k * 0.005})" + ", 1" * k)
    async with target_for(pg.dsn) as t:
        for _ in range(2):  # the exporter's own statements exist from now on
            await collect(StatementsCollector(t, settings(limit=1000)))
        total = _distinct_keys(pg)

        # Own statements are in `total` too: every row is either exported or cut.
        collector = StatementsCollector(t, settings(limit=3, include_own_statements=True))
        runs = [await collect(collector) for _ in range(2)]
    assert _distinct_keys(pg) == total  # nothing new appeared while we looked

    for run in runs:
        # Nine series per statement (the test cluster has track_io_timing on).
        assert run.result.dropped == (total - 3) * 9
        queries = sorted(s.labels["query"] for f in text_string_to_metric_families(run.text)
                         if f.name == "pgcache_statement_info" for s in f.samples)
        assert queries == sorted("SELECT pg_sleep($1)" + "".join(f", ${i}" for i in range(2, k + 2))
                                 for k in (6, 7, 8))
    ids = [sorted(s.labels["queryid"] for f in text_string_to_metric_families(r.text)
                  if f.name == "pgcache_statement_calls" for s in f.samples) for r in runs]
    assert len(ids[0]) == 3 and ids[0] == ids[1]


HOSTILE = (
    "SELECT 1 AS \"quo\"\"te\", 'it''s' AS x /* back\\slash \\n \"dq\" 'sq'\nnew\r\nline\tünï ☃ 𝄞 "
    + "x" * 10_000 + " */"
)


async def test_hostile_query_text_gives_a_valid_exposition(pg: PostgresCluster, promtool: str) -> None:
    pg.psql("SELECT pg_stat_statements_reset()")
    pg.psql(HOSTILE)
    async with target_for(pg.dsn) as t:
        got = await collect(StatementsCollector(t, settings(query_text_length=10_000)))
    promtool_check_metrics(promtool, got.text.encode())
    label = one([s.labels["query"] for f in text_string_to_metric_families(got.text)
                 if f.name == "pgcache_statement_info" for s in f.samples
                 if 'AS "quo""te"' in s.labels["query"]])
    expected = " ".join(HOSTILE.replace("1 AS", "$1 AS").replace("'it''s'", "$2").split())[:10_000]
    assert label == expected
    assert "ünï ☃ 𝄞" in label and "\\slash" in label and "\n" not in label


async def test_query_text_off(pg: PostgresCluster) -> None:
    async with target_for(pg.dsn) as t:
        got = await collect(StatementsCollector(t, settings(query_text_length=0)))
    assert "pgcache_statement_info" not in types(got.text)
    assert samples(got.text, "pgcache_statement_calls_total")


async def test_extension_not_installed_in_the_dsn_database(pg: PostgresCluster) -> None:
    db = fresh_database(pg, "stm_noext")
    async with target_for(pg.dsn_for(db=db)) as t:
        with pytest.raises(QueryError, match="not installed.*CREATE EXTENSION pg_stat_statements in database stm_noext"):
            await StatementsCollector(t, settings()).collect()


async def test_extension_not_preloaded() -> None:
    with PostgresCluster(settings={"shared_preload_libraries": "''"}) as bare:
        async with target_for(bare.dsn) as t:
            with pytest.raises(QueryError, match="not loaded: set shared_preload_libraries = 'pg_stat_statements'"):
                await StatementsCollector(t, settings()).collect()


async def test_hidden_statements_get_their_own_label(pg: PostgresCluster) -> None:
    """A role without pg_read_all_stats sees other users' rows with a NULL queryid."""
    if pg.psql("SELECT 1 FROM pg_roles WHERE rolname = 'stm_plain'") != "1":
        pg.psql("CREATE ROLE stm_plain LOGIN PASSWORD 'plain-secret-1'")
    pg.psql("SELECT pg_stat_statements_reset()")
    pg.psql("SELECT 42 AS answer")
    async with target_for(pg.dsn_for("stm_plain", "plain-secret-1")) as t:
        got = await collect(StatementsCollector(t, settings()))
    hidden = samples(got.text, "pgcache_statement_calls_total", user="postgres", queryid="")
    assert len(hidden) == 1 and hidden[0] >= 2  # the reset and the SELECT, at least
    assert samples(got.text, "pgcache_statement_info", queryid="") == []
    assert all(s.labels["queryid"] == "" or s.labels["user"] == "stm_plain"
               for f in text_string_to_metric_families(got.text) if f.name == "pgcache_statement_calls"
               for s in f.samples)
