"""Build a heavy catalog on a throwaway PostgreSQL cluster, for the benchmarks.

    python benchmarks/catalog.py --tables 2000 --statements 5000      # builds, prints the DSN, waits

What it creates in database ``bench`` (generated as one SQL file, loaded with one ``psql -f``):

- N tables ``t_<i>`` (id, a, b, c, d, payload) with 3 indexes each (primary key, ``(a)``, ``(b, c)``),
  so the default N=2,000 gives 6,000 indexes; each holds a handful of rows;
- a few large tables ``big_<k>`` (``--large-rows`` rows each, TOASTed payload, 3 indexes);
- M distinct statements in pg_stat_statements: distinct query shapes over the tables
  (``SELECT a, c FROM t_17 WHERE b = 1`` ...), each run once after the statistics are reset,
  so pg_stat_statements holds M entries from the workload plus whatever the exporters add.

The cluster gets ``pg_stat_statements.max`` above M and autovacuum off (background vacuuming of
thousands of fresh tables would be noise in every measurement).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.demo.servers import PostgresCluster  # noqa: E402

__all__ = ["Catalog", "build_catalog", "catalog_sql", "statement_sql", "start_cluster"]

DB = "bench"
COLS = ("a", "b", "c", "d")
# Every non-empty subset of the columns, as a select list (15 of them).
_SELECTS = [
    ", ".join(combo) for r in range(1, len(COLS) + 1) for combo in itertools.combinations(COLS, r)
]
_WHERES = ("id", *COLS)


@dataclass
class Catalog:
    cluster: PostgresCluster
    tables: int
    indexes: int
    statements: int
    large_tables: int
    build_seconds: float

    @property
    def dsn(self) -> str:
        return self.cluster.dsn_for(db=DB)


def statement_sql(k: int, tables: int) -> str:
    """The k-th distinct statement: table k mod N, then a (select list, where column) shape."""
    table = k % tables
    shape = k // tables
    sel = _SELECTS[shape % len(_SELECTS)]
    where = _WHERES[(shape // len(_SELECTS)) % len(_WHERES)]
    extra = shape // (len(_SELECTS) * len(_WHERES))
    # Beyond 75 shapes per table, LIMIT k makes more distinct texts (constants are normalized,
    # so the LIMIT value itself does not count; the nesting depth does).
    sql = f"SELECT {sel} FROM t_{table} WHERE {where} = 1"
    for _ in range(extra):
        sql = f"SELECT * FROM ({sql}) s"
    return sql + ";"


def catalog_sql(tables: int, large_tables: int, large_rows: int) -> str:
    out = [
        "SET client_min_messages = warning;",
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;",
    ]
    for i in range(tables):
        out.append(
            f"CREATE TABLE t_{i} (id int PRIMARY KEY, a int, b int, c int, d text, payload text);"
            f"CREATE INDEX t_{i}_a ON t_{i} (a);CREATE INDEX t_{i}_bc ON t_{i} (b, c);"
            f"INSERT INTO t_{i} SELECT g, g % 7, g % 11, g, 'x' || g, repeat('p', 40) "
            f"FROM generate_series(1, {1 + i % 9}) g;"
        )
    for k in range(large_tables):
        out.append(
            f"CREATE TABLE big_{k} (id bigint PRIMARY KEY, a int, b int, c int, d text, payload text);"
            f"INSERT INTO big_{k} SELECT g, g % 1000, g % 97, g, md5(g::text), "
            f"CASE WHEN g % 100 = 0 THEN repeat(md5(g::text), 100) ELSE md5(g::text) END "
            f"FROM generate_series(1, {large_rows}) g;"
            f"CREATE INDEX big_{k}_a ON big_{k} (a);CREATE INDEX big_{k}_bc ON big_{k} (b, c);"
        )
    out.append("ANALYZE;")
    return "\n".join(out) + "\n"


def _psql_file(cluster: PostgresCluster, path: Path, db: str) -> None:
    psql = cluster.bindir / "psql"
    if not psql.exists():
        psql = Path("/usr/bin/psql")
    r = cluster._run(  # noqa: SLF001 - runs as the cluster's unprivileged user
        [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(cluster.sockdir),
         "-p", str(cluster.port), "-U", cluster.superuser, "-d", db, "-o", "/dev/null", "-f", str(path)]
    )
    if r.returncode != 0:
        raise RuntimeError(f"psql -f {path.name} failed: {r.stderr.strip()[-2000:]}")


def start_cluster(statements: int, extra: dict[str, str] | None = None) -> PostgresCluster:
    settings = {
        "pg_stat_statements.max": str(max(10000, statements * 2 + 2000)),
        "autovacuum": "off",
        "max_locks_per_transaction": "256",
        "shared_buffers": "128MB",
        "max_connections": "100",
    }
    settings.update(extra or {})
    cluster = PostgresCluster(settings=settings)
    cluster.init().start()
    return cluster


def build_catalog(
    tables: int = 2000,
    statements: int = 5000,
    large_tables: int = 3,
    large_rows: int = 200_000,
    cluster: PostgresCluster | None = None,
) -> Catalog:
    """Start a cluster (unless given one) and build the catalog in database `bench`."""
    t0 = time.monotonic()
    cluster = cluster or start_cluster(statements)
    cluster.psql(f"CREATE DATABASE {DB}")
    cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    work = Path(tempfile.mkdtemp(prefix="pgcache-catalog-"))
    os.chmod(work, 0o755)
    try:
        ddl = work / "catalog.sql"
        ddl.write_text(catalog_sql(tables, large_tables, large_rows))
        _psql_file(cluster, ddl, DB)
        # Forget the DDL, then run the M distinct statements once each.
        cluster.psql("SELECT pg_stat_statements_reset()", db=DB)
        stmts = work / "statements.sql"
        stmts.write_text("\n".join(statement_sql(k, tables) for k in range(statements)) + "\n")
        _psql_file(cluster, stmts, DB)
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    return Catalog(
        cluster=cluster, tables=tables, indexes=3 * (tables + large_tables),
        statements=statements, large_tables=large_tables,
        build_seconds=time.monotonic() - t0,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", type=int, default=2000)
    p.add_argument("--statements", type=int, default=5000)
    p.add_argument("--large-tables", type=int, default=3)
    p.add_argument("--large-rows", type=int, default=200_000)
    args = p.parse_args(argv)
    cat = build_catalog(args.tables, args.statements, args.large_tables, args.large_rows)
    n = cat.cluster.psql("SELECT count(*) FROM pg_stat_statements", db=DB)
    print(f"built in {cat.build_seconds:.1f}s: {cat.tables} tables, {cat.indexes} indexes, "
          f"{n} pg_stat_statements entries")
    print(f"DSN (superuser, trusted on 127.0.0.1): {cat.dsn}")
    print("Ctrl-C removes the cluster.")
    try:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # A job started in the background by a shell ignores SIGINT; Ctrl-C must still clean up.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cat.cluster.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
