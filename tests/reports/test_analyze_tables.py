"""`analyze-tables`: statistics really written (the transaction commits), names resolved by the
server and never spliced into SQL, and the indexes of the analyzed tables judged afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from exporter.demo.servers import PostgresCluster
from reports.report_harness import drop_database, fresh_database, run_cli, run_json

DB = "rep_analyze"
SETUP = """
CREATE TABLE orders (id int PRIMARY KEY, customer int, total numeric);
INSERT INTO orders SELECT g, g % 100, g * 1.5 FROM generate_series(1, 5000) g;
CREATE INDEX orders_customer ON orders (customer);
CREATE TABLE "Mixed Case" (id int, v text);
INSERT INTO "Mixed Case" SELECT g, 'v' || g FROM generate_series(1, 100) g;
CREATE INDEX "Mixed Index" ON "Mixed Case" (v);
CREATE VIEW order_view AS SELECT * FROM orders;
CREATE ROLE analyze_outsider LOGIN PASSWORD 'outsider-pw';
"""


@pytest.fixture(scope="module")
def db(pg: PostgresCluster) -> Iterator[str]:
    fresh_database(pg, DB, SETUP)
    yield DB
    drop_database(pg, DB)
    pg.psql("DROP ROLE IF EXISTS analyze_outsider")


def stats_rows(pg: PostgresCluster, table: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stats WHERE tablename = '{table}'", db=DB))


def analyze(capsys: pytest.CaptureFixture[str], pg: PostgresCluster, *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "analyze-tables", *argv, "--postgres-dsn", pg.dsn_for(db=DB))


def test_analyze_writes_statistics_and_judges_indexes(
    pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stats_rows(pg, "orders") == 0 and stats_rows(pg, "Mixed Case") == 0
    r = run_json(capsys, "analyze-tables", "orders", '"Mixed Case"', "public.orders",
                 "--min-stats-age", "0s", "--min-size", "0", "--postgres-dsn", pg.dsn_for(db=DB))
    assert list(r) == ["database", "analyzed", "indexes"]
    # public.orders is the same table as orders: analyzed once.
    assert [a["table"] for a in r["analyzed"]] == ["public.orders", 'public."Mixed Case"']
    assert stats_rows(pg, "orders") == 3 and stats_rows(pg, "Mixed Case") == 2
    by_name = {i["index"]: i for i in r["indexes"]}
    assert set(by_name) == {"orders_pkey", "orders_customer", "Mixed Index"}
    assert list(by_name["orders_customer"]) == [
        "datname", "schema", "table", "index", "size_bytes", "scans", "stats_age_seconds",
        "unused_candidate", "reason", "drop_statement"]
    assert by_name["orders_customer"]["unused_candidate"] is True
    assert by_name["Mixed Index"]["drop_statement"] == 'DROP INDEX CONCURRENTLY public."Mixed Index";'
    assert by_name["orders_pkey"]["unused_candidate"] is False
    assert "primary key" in by_name["orders_pkey"]["reason"] and by_name["orders_pkey"]["drop_statement"] is None
    # Candidates first, then by size.
    assert [i["unused_candidate"] for i in r["indexes"]] == [True, True, False]

    code, out, _ = analyze(capsys, pg, "orders")
    assert code == 0 and out.startswith("ANALYZE public.orders: ")
    assert "orders_customer" in out and "statistics are only" in out  # default rule: 7 days


@pytest.mark.parametrize("name, message", [
    ("orders; DROP TABLE orders", "not a valid table name"),
    ('orders"; DROP TABLE orders; --', "not a valid table name"),
    ("no_such_table", "no such table"),
    ("other_schema.orders", "no such table"),
    ("Mixed Case", "not a valid table name"),
    ("order_view", "is a view"),
    ("orders_pkey", "is an index"),
])
def test_bad_names_refused_before_anything_runs(
    pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    before = pg.psql("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'orders'", db=DB)
    code, out, err = analyze(capsys, pg, "orders", name)
    assert code == 2 and out == ""
    assert repr(name) in err and message in err
    assert pg.psql("SELECT to_regclass('orders') IS NOT NULL", db=DB) == "t"
    assert pg.psql("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'orders'", db=DB) == before


def test_role_that_may_not_analyze(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "analyze-tables", "orders",
                           "--postgres-dsn", pg.dsn_for("analyze_outsider", "outsider-pw", db=DB))
    assert code == 2 and "may not ANALYZE public.orders" in err
