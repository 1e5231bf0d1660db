"""`explain` against a real server: plans and findings, $n parameters, and statements that write
refused or rolled back, the data counted before and after every run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from exporter.demo.servers import PostgresCluster
from reports.report_harness import drop_database, fresh_database, run_cli, run_json

DB = "rep_explain"
ROWS = 50_000
SETUP = f"""
CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, note text NOT NULL, made date NOT NULL);
INSERT INTO items SELECT g, g % 50, 'note ' || g, date '2024-01-01' + g % 365
FROM generate_series(1, {ROWS}) g;
ANALYZE items;
CREATE FUNCTION sneaky_insert() RETURNS int LANGUAGE sql
    AS $$ INSERT INTO items VALUES (-1, 0, 'x', date '2024-01-01') RETURNING 1 $$;
CREATE SEQUENCE counter;
"""


@pytest.fixture(scope="module")
def db(pg: PostgresCluster) -> Iterator[str]:
    fresh_database(pg, DB, SETUP)
    yield DB
    drop_database(pg, DB)


def count(pg: PostgresCluster) -> int:
    return int(pg.psql("SELECT count(*) FROM items", db=DB))


def explain(capsys: pytest.CaptureFixture[str], pg: PostgresCluster, *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "explain", *argv, "--postgres-dsn", pg.dsn_for(db=DB))


def test_select_analyzed(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(capsys, "explain", "SELECT count(*) FROM items WHERE grp = 3", "--analyze",
                 "--postgres-dsn", pg.dsn_for(db=DB))
    assert list(r) == ["database", "analyze", "read_write", "statement", "params", "planning_ms",
                       "execution_ms", "total_cost", "plan_rows", "actual_rows", "shared_hit_blocks",
                       "shared_read_blocks", "findings", "top_nodes", "plan"]
    assert r["database"] == DB and r["analyze"] is True and r["read_write"] is False
    assert r["execution_ms"] > 0 and r["planning_ms"] > 0 and r["total_cost"] > 0
    assert r["actual_rows"] == 1
    assert r["shared_hit_blocks"] + r["shared_read_blocks"] > 0
    seq = [f for f in r["findings"] if f["kind"] == "seq_scan"]
    assert seq and "items" in seq[0]["node"] and f"{ROWS:,} rows in the table" in seq[0]["detail"]
    assert r["top_nodes"] and {"node", "exclusive_ms", "percent", "rows", "loops"} == set(r["top_nodes"][0])
    times = [n["exclusive_ms"] for n in r["top_nodes"]]
    assert times == sorted(times, reverse=True)
    assert r["plan"][0]["Plan"]["Node Type"] == "Aggregate"

    code, out, _ = explain(capsys, pg, "SELECT count(*) FROM items WHERE grp = 3", "--analyze")
    assert code == 0
    assert "read-only transaction, rolled back" in out and "Seq Scan on items" in out


def test_plan_only_does_not_execute(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = count(pg)
    r = run_json(capsys, "explain", "DELETE FROM items WHERE grp = 1", "--postgres-dsn", pg.dsn_for(db=DB))
    assert r["analyze"] is False and r["execution_ms"] is None and r["actual_rows"] is None
    assert r["plan"][0]["Plan"]["Node Type"] == "ModifyTable"
    assert count(pg) == before


def test_parameters(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT * FROM items WHERE id = $1 AND note = $2 AND made >= $3"
    r = run_json(capsys, "explain", sql, "--analyze", "--params", '[42, "note 42", "2024-01-01"]',
                 "--postgres-dsn", pg.dsn_for(db=DB))
    assert r["actual_rows"] == 1 and r["params"] == [42, "note 42", "2024-01-01"]
    assert r["plan"][0]["Plan"]["Index Name"] == "items_pkey"
    assert not [f for f in r["findings"] if f["kind"] == "seq_scan"]
    # A quote in a value is data, not SQL.
    r = run_json(capsys, "explain", "SELECT * FROM items WHERE note = $1", "--analyze",
                 "--params", '["x\' OR \'1\'=\'1"]', "--postgres-dsn", pg.dsn_for(db=DB))
    assert r["actual_rows"] == 0

    code, _, err = explain(capsys, pg, sql, "--params", "[42]")
    assert code == 2 and "$1..$3" in err
    code, _, err = explain(capsys, pg, sql)
    assert code == 2 and "--params" in err
    code, _, err = explain(capsys, pg, sql, "--params", '{"a": 1}')
    assert code == 2 and "JSON array" in err


@pytest.mark.parametrize("sql", [
    "DELETE FROM items WHERE grp < 25",
    "UPDATE items SET note = 'changed'",
    "WITH gone AS (DELETE FROM items RETURNING *) SELECT count(*) FROM gone",
    "SELECT * FROM items WHERE id = 1 FOR UPDATE",
    "CREATE TABLE copy AS SELECT * FROM items",
])
def test_writes_refused_without_allow_writes(
    pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str], sql: str
) -> None:
    before = count(pg)
    code, out, err = explain(capsys, pg, sql, "--analyze")
    assert code == 2 and out == ""
    assert "refused" in err and "--allow-writes" in err
    assert count(pg) == before


def test_writes_rolled_back_with_allow_writes(
    pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = count(pg)
    r = run_json(capsys, "explain", "DELETE FROM items WHERE grp < 25", "--analyze", "--allow-writes",
                 "--postgres-dsn", pg.dsn_for(db=DB))
    assert r["read_write"] is True and r["execution_ms"] > 0
    assert r["plan"][0]["Plan"]["Node Type"] == "ModifyTable"
    assert count(pg) == before
    code, out, _ = explain(capsys, pg, "UPDATE items SET note = 'changed' WHERE id < 10",
                           "--analyze", "--allow-writes")
    assert code == 0 and "READ WRITE transaction, rolled back" in out
    assert pg.psql("SELECT count(*) FROM items WHERE note = 'changed'", db=DB) == "0"
    run_json(capsys, "explain", "CREATE TABLE copy AS SELECT * FROM items", "--analyze", "--allow-writes",
             "--postgres-dsn", pg.dsn_for(db=DB))
    assert pg.psql("SELECT to_regclass('copy') IS NULL", db=DB) == "t"


def test_write_hidden_in_a_function_fails_at_run_time(
    pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = count(pg)
    code, _, err = explain(capsys, pg, "SELECT sneaky_insert()", "--analyze")
    assert code == 2 and "refused at run time" in err and "read-only transaction" in err
    code, _, err = explain(capsys, pg, "SELECT nextval('counter')", "--analyze")
    assert code == 2 and "nextval" in err
    code, _, err = explain(capsys, pg, "SELECT sneaky_insert()", "--analyze", "--allow-writes")
    assert code == 0, err
    assert count(pg) == before


@pytest.mark.parametrize("sql", [
    "SELECT 1; DELETE FROM items",
    "SELECT 1; /* ; */ SELECT 2",
    "EXPLAIN SELECT 1",
    "SELECT 'unterminated",
])
def test_malformed_refused(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str], sql: str) -> None:
    before = count(pg)
    code, _, err = explain(capsys, pg, sql, "--analyze", "--allow-writes")
    assert code == 2 and err
    assert count(pg) == before


def test_semicolons_inside_literals_and_a_trailing_one(
    pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    r = run_json(capsys, "explain", "SELECT count(*) FROM items WHERE note <> 'a;b' AND note <> $$;$$; -- done",
                 "--analyze", "--postgres-dsn", pg.dsn_for(db=DB))
    assert r["actual_rows"] == 1


def test_row_estimate_error_and_sort_spill(
    pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # grp and id % 50 are the same column in disguise: the planner multiplies two selectivities.
    r = run_json(capsys, "explain", "SELECT * FROM items WHERE grp = 3 AND id % 50 = 3", "--analyze",
                 "--postgres-dsn", pg.dsn_for(db=DB))
    est = [f for f in r["findings"] if f["kind"] == "row_estimate"]
    assert est and "under-estimate" in est[0]["detail"], r["findings"]
    r = run_json(capsys, "explain", "SELECT * FROM items ORDER BY note DESC, made", "--analyze",
                 "--postgres-dsn", pg.dsn_for(db=DB))
    spill = [f for f in r["findings"] if f["kind"] == "sort_spill"]
    assert spill and "external" in spill[0]["detail"], r["findings"]


def test_errors(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = explain(capsys, pg, "SELECT pg_sleep(5)", "--analyze", "--timeout", "200ms")
    assert code == 1 and "--timeout" in err
    code, _, err = explain(capsys, pg, "SELECT * FROM no_such_table")
    assert code == 2 and "no_such_table" in err and f"database {DB}" in err
    code, _, err = explain(capsys, pg, "SELECT 1", "--database", "no_such_db")
    assert code == 2 and "no_such_db" in err
    code, _, err = explain(capsys, pg, "SELECT 1", "--target", "nope")
    assert code == 2 and "--target nope" in err


# -- findings about the seed's index strategy (the demo blog's schema and data) -----------------

SEED_DB = "rep_explain_seed"


@pytest.fixture(scope="module")
def blog(pg: PostgresCluster) -> Iterator[str]:
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    from exporter.demo.blog import asyncpg_url, create_schema, seed_data

    fresh_database(pg, SEED_DB, "")

    async def setup() -> None:
        engine = create_async_engine(asyncpg_url(pg.dsn_for(db=SEED_DB)))
        try:
            await create_schema(engine)
            await seed_data(engine, users=20_000, posts=60_000, follows=10_000)
        finally:
            await engine.dispose()

    asyncio.run(setup())
    yield SEED_DB
    drop_database(pg, SEED_DB)


def seed_explain(capsys: pytest.CaptureFixture[str], pg: PostgresCluster, sql: str, *argv: str) -> Any:
    return run_json(capsys, "explain", sql, *argv, "--postgres-dsn", pg.dsn_for(db=SEED_DB))


def test_is_false_against_a_partial_index_and_named_params(
    pg: PostgresCluster, blog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The seed's user-stats filter as SQLAlchemy's .is_(False) writes it, with a seed-style :name.
    sql = "SELECT count(posts.id) FROM posts WHERE posts.author_id = :user_id AND posts.is_deleted IS false"
    r = seed_explain(capsys, pg, sql, "--analyze", "--params", '{"user_id": 7}')
    assert r["params"] == {"user_id": 7} and r["statement"].endswith("author_id = $1 AND posts.is_deleted IS false")
    partial = [f for f in r["findings"] if f["kind"] == "partial_predicate"]
    assert any("idx_posts_author_published_created" in f["detail"] and "is_deleted = false" in f["detail"]
               for f in partial), r["findings"]
    # Written as the index's predicate: the index serves it, and nothing is found.
    r = seed_explain(capsys, pg, sql.replace("IS false", "= false"), "--analyze", "--params", '{"user_id": 7}')
    assert not [f for f in r["findings"] if f["kind"] in ("partial_predicate", "seq_scan")], r["findings"]
    assert "idx_posts_author_published_created" in json.dumps(r["plan"])

    code, _, err = explain(capsys, pg, sql, "--params", '{"user": 7}')
    assert code == 2 and "missing: user_id" in err and "not in the statement: user" in err
    code, _, err = explain(capsys, pg, sql, "--params", "[7]")
    assert code == 2 and ":name" in err


def test_order_by_not_the_expression_index_and_no_row_estimate_under_limit(
    pg: PostgresCluster, blog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The seed's popular-posts query: a formula other than the one it indexed, and IS true.
    sql = ("SELECT posts.id FROM posts JOIN users ON posts.author_id = users.id "
           "WHERE posts.is_published IS true AND posts.is_deleted IS false "
           "ORDER BY posts.like_count + posts.view_count * 0.1 DESC LIMIT :limit")
    r = seed_explain(capsys, pg, sql, "--analyze", "--params", '{"limit": 10}')
    kinds = {f["kind"] for f in r["findings"]}
    assert "expression_mismatch" in kinds and "partial_predicate" in kinds, r["findings"]
    mismatch = next(f for f in r["findings"] if f["kind"] == "expression_mismatch")
    assert "idx_posts_engagement_score" in mismatch["detail"] and mismatch["detail"].startswith("ORDER BY")
    assert "row_estimate" not in kinds, r["findings"]  # the nodes under the LIMIT stop early
    # Aligned with the index (expression and predicate): served by it, no finding of either kind.
    fixed = sql.replace("IS true", "= true").replace("IS false", "= false").replace(
        "posts.like_count + posts.view_count * 0.1", "posts.like_count * 2 + posts.view_count * 0.1")
    r = seed_explain(capsys, pg, fixed, "--analyze", "--params", '{"limit": 10}')
    assert "idx_posts_engagement_score" in json.dumps(r["plan"])
    assert not {f["kind"] for f in r["findings"]} & {"expression_mismatch", "partial_predicate"}, r["findings"]


def test_column_inside_a_function_keeps_its_index_unused(
    pg: PostgresCluster, blog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    r = seed_explain(capsys, pg, "SELECT id FROM users WHERE upper(username) = 'USER5'")
    found = [f for f in r["findings"] if f["kind"] == "index_not_usable"]
    assert found and "users_username_key" in found[0]["detail"], r["findings"]
    r = seed_explain(capsys, pg, "SELECT id FROM users WHERE username = 'user5'")
    assert not [f for f in r["findings"] if f["kind"] == "index_not_usable"]
