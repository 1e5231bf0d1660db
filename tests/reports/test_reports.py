"""`report ...` against a database of known content: rows, order and JSON shape of each report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from exporter.demo.servers import PostgresCluster
from reports.report_harness import drop_database, fresh_database, run_cli, run_json

DB = "rep_known"
SETUP = """
CREATE TABLE users (id int PRIMARY KEY, name text, email text);
INSERT INTO users SELECT g, 'user' || g, 'user' || g || '@example.com' FROM generate_series(1, 20000) g;
CREATE INDEX users_name ON users (name);
CREATE INDEX users_name_email ON users (name, email);
CREATE INDEX users_email ON users (email);
CREATE TABLE "Odd Table" (id int, v text);
INSERT INTO "Odd Table" SELECT g, 'v' || g FROM generate_series(1, 2000) g;
CREATE INDEX "Odd Index" ON "Odd Table" (v);
CREATE TABLE small (id int);
INSERT INTO small VALUES (1), (2);
"""


def wait_until(pg: PostgresCluster, sql: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while pg.psql(sql, db=DB) != "t":
        assert time.monotonic() < deadline, f"timed out waiting for: {sql}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def db(pg: PostgresCluster) -> Iterator[str]:
    fresh_database(pg, DB, SETUP)
    pg.psql("SET enable_seqscan = off; SELECT count(*) FROM users WHERE email = 'user5@example.com'", db=DB)
    wait_until(pg, "SELECT idx_scan > 0 FROM pg_stat_user_indexes WHERE indexrelname = 'users_email'")
    # Two statements with known cost: b costs more in total (4 x 0.25 s), a more per call.
    pg.psql("SELECT pg_sleep(0.6), count(*) FROM small", db=DB)
    for _ in range(4):
        pg.psql("SELECT pg_sleep(0.25), count(*) FROM users WHERE id < 10", db=DB)
    yield DB
    drop_database(pg, DB)


def report(capsys: pytest.CaptureFixture[str], pg: PostgresCluster, *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "report", *argv, "--postgres-dsn", pg.dsn)


def report_json(capsys: pytest.CaptureFixture[str], pg: PostgresCluster, *argv: str) -> object:
    return run_json(capsys, "report", *argv, "--postgres-dsn", pg.dsn)


def test_slow_queries(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = report_json(capsys, pg, "slow-queries", "--database", DB, "--limit", "2")
    assert isinstance(rows, list) and len(rows) == 2
    assert list(rows[0]) == ["datname", "user", "queryid", "calls", "total_exec_ms", "mean_exec_ms",
                             "rows", "hit_percent", "shared_blks_hit", "shared_blks_read",
                             "temp_blks_written", "query"]
    b, a = rows
    assert "FROM users WHERE id < $2" in b["query"] and b["calls"] == 4 and b["rows"] == 4
    assert "FROM small" in a["query"] and a["calls"] == 1
    assert b["total_exec_ms"] >= 1000 > a["total_exec_ms"] >= 600
    assert b["mean_exec_ms"] == pytest.approx(b["total_exec_ms"] / 4)
    assert 0 <= b["hit_percent"] <= 100 and b["datname"] == DB and b["user"] == "postgres"
    assert isinstance(b["queryid"], int)

    code, out, _ = report(capsys, pg, "slow-queries", "--database", DB, "--limit", "2")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:5] == ["TOTAL", "MEAN", "CALLS", "ROWS", "HIT"]
    assert "FROM users" in lines[1] and "FROM small" in lines[2] and len(lines) == 3


def test_slow_queries_never_show_password_literals(pg: PostgresCluster, capsys: pytest.CaptureFixture[str]) -> None:
    pg.psql("CREATE ROLE report_leak_check LOGIN PASSWORD 'Leak-Me-7'")
    try:
        code, out, _ = run_cli(capsys, "report", "slow-queries", "--limit", "0", "--format", "json",
                               "--postgres-dsn", pg.dsn)
        assert code == 0
        created = [r for r in json.loads(out) if "report_leak_check" in (r["query"] or "")]
        assert created and "PASSWORD '***'" in created[0]["query"]
        assert "Leak-Me-7" not in out
        code, out, _ = report(capsys, pg, "slow-queries", "--limit", "0")
        assert code == 0 and "Leak-Me-7" not in out
    finally:
        pg.psql("DROP ROLE report_leak_check")


def test_table_width_fits_the_terminal(
    pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = report(capsys, pg, "slow-queries", "--database", DB, "--limit", "2")
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" in out


def test_unused_indexes(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = report_json(capsys, pg, "unused-indexes", "--database", DB, "--min-stats-age", "0s", "--min-size", "0")
    assert isinstance(rows, list)
    # Never scanned, biggest first; the scanned one and the primary key are not candidates.
    assert [r["index"] for r in rows] == ["users_name_email", "users_name", "Odd Index"]
    assert list(rows[0]) == ["datname", "schema", "table", "index", "size_bytes", "scans",
                             "stats_age_seconds", "reason", "definition", "drop_statement"]
    sizes = [r["size_bytes"] for r in rows]
    assert sizes == sorted(sizes, reverse=True) and all(isinstance(s, int) and s > 0 for s in sizes)
    assert rows[0]["drop_statement"] == "DROP INDEX CONCURRENTLY public.users_name_email;"
    assert rows[2]["drop_statement"] == 'DROP INDEX CONCURRENTLY public."Odd Index";'
    assert rows[2]["table"] == "Odd Table"
    assert "no scans since statistics began" in rows[0]["reason"] and "backs no constraint" in rows[0]["reason"]
    assert rows[0]["definition"].startswith("CREATE INDEX users_name_email ON public.users")

    # The size threshold (here: bigger than the small index), as the collector applies it.
    big = report_json(capsys, pg, "unused-indexes", "--database", DB, "--min-stats-age", "0s",
                      "--min-size", str(rows[2]["size_bytes"] + 1))
    assert [r["index"] for r in big] == ["users_name_email", "users_name"]

    code, out, _ = report(capsys, pg, "unused-indexes", "--database", DB, "--min-stats-age", "0s", "--min-size", "0")
    assert code == 0 and 'DROP INDEX CONCURRENTLY public."Odd Index";' in out and "drops nothing" in out
    assert pg.psql("SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'", db=DB) == "5"  # nothing dropped


def test_unused_indexes_wait_for_old_enough_statistics(
    pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = report(capsys, pg, "unused-indexes", "--database", DB, "--min-stats-age", "3650d",
                            "--min-size", "0")
    assert code == 0 and "no unused-index candidates" in out
    assert f"database {DB}: statistics are" in err


def test_redundant_indexes(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = report_json(capsys, pg, "redundant-indexes", "--database", DB)
    assert isinstance(rows, list) and len(rows) == 1
    r = rows[0]
    assert (r["index"], r["covered_by"], r["table"]) == ("users_name", "users_name_email", "users")
    assert r["covered_by_definition"].endswith("(name, email)")
    assert r["drop_statement"] == "DROP INDEX CONCURRENTLY public.users_name;"


def test_table_sizes(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = report_json(capsys, pg, "table-sizes", "--database", DB, "--limit", "0")
    assert isinstance(rows, list)
    assert [r["table"] for r in rows] == ["users", "Odd Table", "small"]
    assert list(rows[0]) == ["datname", "schema", "table", "total_bytes", "heap_bytes", "indexes_bytes",
                             "toast_bytes", "live_rows", "dead_rows", "seq_scans", "index_scans"]
    users = rows[0]
    assert users["total_bytes"] == int(pg.psql("SELECT pg_total_relation_size('users')", db=DB))
    assert users["indexes_bytes"] == int(pg.psql("SELECT pg_indexes_size('users')", db=DB))
    assert rows[2]["index_scans"] is None  # no index on small
    assert len(report_json(capsys, pg, "table-sizes", "--database", DB, "--limit", "2")) == 2  # type: ignore[arg-type]

    code, out, _ = report(capsys, pg, "table-sizes", "--database", DB)
    lines = out.splitlines()
    assert code == 0 and lines[1].endswith("public.users") and "MiB" in lines[1]


def test_every_watched_database_by_default(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = report_json(capsys, pg, "table-sizes", "--limit", "0")
    assert isinstance(rows, list) and {"users", "small"} <= {r["table"] for r in rows if r["datname"] == DB}


def test_connections(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A session left idle in a transaction, as an application would.
    with subprocess.Popen(
        [sys.executable, "-c", (
            "import asyncio, sys, asyncpg\n"
            "async def main():\n"
            f"    c = await asyncpg.connect({pg.dsn_for(db=DB)!r}, server_settings={{'application_name': 'holder'}})\n"
            "    await c.execute('BEGIN; SELECT 1')\n"
            "    print('ready', flush=True)\n"
            "    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)\n"
            "asyncio.run(main())\n"
        )],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        r = report_json(capsys, pg, "connections", "--database", DB)
        assert isinstance(r, dict) and list(r) == ["total", "max_connections", "connections", "oldest"]
        assert r["max_connections"] == 97  # 100 minus 3 reserved for superusers
        assert r["connections"] == [{
            "datname": DB, "user": "postgres", "application_name": "holder",
            "state": "idle in transaction", "wait_event_type": "Client", "count": 1,
        }]
        assert r["total"] == 1
        oldest = [o for o in r["oldest"] if o["state"] == "idle in transaction"]
        assert oldest and oldest[0]["oldest_transaction_seconds"] >= 0
        code, out, _ = report(capsys, pg, "connections", "--database", DB)
        assert code == 0 and out.startswith("1 client connections of 97 available") and "holder" in out
    # Leaving the with block closes stdin (the holder exits) and waits for it.


def test_bad_input(pg: PostgresCluster, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = report(capsys, pg, "table-sizes", "--database", "no_such_db")
    assert code == 2 and "--database no_such_db" in err
    code, _, err = run_cli(capsys, "report", "table-sizes")
    assert code == 2 and "no PostgreSQL target" in err
    code, _, err = report(capsys, pg, "unused-indexes", "--min-size", "lots")
    assert code == 2 and "--min-size" in err
