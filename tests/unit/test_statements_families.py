"""Pure logic of the statements collector: SQL by extension version, stable top-N selection,
query text labels, and the families built from rows."""

from __future__ import annotations

from metrics_text import samples
from prometheus_client.parser import text_string_to_metric_families

from exporter.postgres.statements import (
    StatementRow,
    parse_extversion,
    query_text_label,
    select_statements,
    statement_families,
    statements_sql,
)
from exporter.snapshot import render_text


def row(qid: int | None, exec_ms: float, *, dbid: int = 1, userid: int = 10) -> StatementRow:
    return StatementRow(dbid=dbid, userid=userid, queryid=qid, datname="app",
                        username="web" if userid == 10 else f"role{userid}",
                        calls=3, exec_ms=exec_ms)


def test_sql_follows_the_extension_version() -> None:
    assert parse_extversion("1.10") == (1, 10)
    old = statements_sql("public", (1, 7))
    assert "total_time" in old and "total_exec_time" not in old and "total_plan_time" not in old
    pg13 = statements_sql("public", parse_extversion("1.8"))
    assert "total_exec_time" in pg13 and "total_plan_time" in pg13 and "shared_blk_read_time" not in pg13
    assert "s.blk_read_time" in pg13
    pg17 = statements_sql('"my schema"', (1, 11))
    assert "s.shared_blk_read_time + s.local_blk_read_time" in pg17 and "s.blk_read_time" not in pg17
    assert '"my schema".pg_stat_statements(false)' in pg17


def test_top_n_by_exec_time_and_dropped() -> None:
    rows = [row(i, float(i)) for i in range(1, 11)]
    chosen = select_statements(rows, set(), 3)
    assert [r.queryid for r in chosen] == [10, 9, 8]


def test_new_heaviest_statements_are_exported_at_once() -> None:
    limit = 4
    first = select_statements([row(i, float(100 - i)) for i in range(1, 11)], set(), limit)
    assert [r.queryid for r in first] == [1, 2, 3, 4]
    # Two newcomers overtake clearly: they are in the true top 4, so they are exported now (the
    # old rule kept 3 and 4 while they ranked within 1.5 x limit and left the newcomers out).
    rows = [row(i, float(100 - i)) for i in range(1, 11)] + [row(50, 1000.0), row(51, 999.0)]
    second = select_statements(rows, {r.key for r in first}, limit)
    assert {r.queryid for r in second} == {50, 51, 1, 2}


def test_hysteresis_decides_only_the_borderline() -> None:
    limit = 3
    # 4 was exported; 5 now ranks 3rd by a hair (within BORDER of the cutoff): 4 keeps its place.
    rows = [row(1, 100.0), row(2, 90.0), row(5, 50.5), row(4, 50.0), row(6, 10.0)]
    held = select_statements(rows, {(1, 10, 1), (1, 10, 2), (1, 10, 4)}, limit)
    assert {r.queryid for r in held} == {1, 2, 4}
    # Without a previous selection the true top wins the tie.
    assert {r.queryid for r in select_statements(rows, set(), limit)} == {1, 2, 5}
    # Clearly ahead (more than BORDER): 5 replaces 4 at once.
    rows[2] = row(5, 60.0)
    assert {r.queryid for r in select_statements(rows, {(1, 10, 1), (1, 10, 2), (1, 10, 4)}, limit)} \
        == {1, 2, 5}


def test_null_queryid_never_collides() -> None:
    rows = [row(None, 5.0), row(None, 4.0, userid=11), row(7, 3.0)]
    text = render_text(statement_families("main", rows, texts={7: "SELECT $1"})).decode()
    keys = [(s.labels["user"], s.labels["queryid"]) for f in text_string_to_metric_families(text)
            if f.name == "pgcache_statement_calls" for s in f.samples]
    assert len(keys) == len(set(keys)) == 3
    assert ("web", "") in keys and ("web", "7") in keys
    info = [s.labels for f in text_string_to_metric_families(text)
            if f.name == "pgcache_statement_info" for s in f.samples]
    assert info == [{"target": "main", "datname": "app", "user": "web", "queryid": "7", "query": "SELECT $1"}]


def test_query_text_label() -> None:
    assert query_text_label("SELECT\n  a,\tb\r\nFROM t", 200) == "SELECT a, b FROM t"
    assert query_text_label("SELECT ünï", 8) == "SELECT ü"
    assert query_text_label("<insufficient privilege>", 200) is None
    assert query_text_label("SELECT 1", 0) is None
    assert query_text_label(None, 200) is None


def test_units_and_optional_families() -> None:
    r = StatementRow(dbid=1, userid=1, queryid=1, datname="d", username="u", exec_ms=1500,
                     plan_ms=250, read_ms=20, write_ms=10)
    names = {f.name for f in statement_families("m", [r])}
    assert "pgcache_statement_block_read_seconds" not in names  # track_io_timing off
    assert "pgcache_statement_info" not in names  # texts off
    assert "pgcache_statements_deallocations" not in names  # before 1.9
    text = render_text(statement_families("m", [r], io_timing=True, dealloc=3, stats_reset=1.5e9))
    assert samples(text, "pgcache_statement_exec_seconds_total") == [1.5]
    assert samples(text, "pgcache_statement_plan_seconds_total") == [0.25]
    assert samples(text, "pgcache_statement_block_read_seconds_total") == [0.02]
    assert samples(text, "pgcache_statements_deallocations_total") == [3]
    assert samples(text, "pgcache_statements_stats_reset_timestamp_seconds") == [1.5e9]
