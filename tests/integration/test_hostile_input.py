"""Hostile names and query text: quotes, backslashes, newlines, non-ASCII and extreme lengths in
database, schema, table, index and application names and in statements. The exposition stays
valid for promtool and for a real Prometheus scrape, and the values come back exactly."""

from __future__ import annotations

from pathlib import Path

import asyncpg
from daemon_harness import fast_collectors, fetch, next_round, running_daemon, wait_for
from metrics_text import promtool_check_metrics, samples
from prometheus_harness import prometheus_ready, prometheus_server

from exporter.definitions import builtin_definitions
from exporter.demo.servers import PostgresCluster


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def cut(name: str, limit: int = 63) -> str:
    """PostgreSQL keeps at most 63 bytes of an identifier (never splitting a character)."""
    out = name.encode()[:limit]
    while True:
        try:
            return out.decode()
        except UnicodeDecodeError:
            out = out[:-1]


DB = cut('we"ird\\db\nname ü')
SCHEMA = cut('s"ch\\ema\n✓')
TABLE = cut("t'a\"b\\le\nñ " + "長" * 30)  # multi-byte, cut at 63 bytes
INDEX = cut('i"dx\\\n' + "x" * 80)
APP = 'app "quoted" \\ back'  # application_name keeps printable ASCII only
COMMENT = '"quoted" \\ back\nnewline ü ' + "y" * 5000


async def test_hostile_names_survive_promtool_and_prometheus(
    pg_private: PostgresCluster, promtool: str, tmp_path: Path
) -> None:
    admin = await asyncpg.connect(pg_private.dsn)
    await admin.execute(f"CREATE DATABASE {ident(DB)}")
    await admin.close()
    conn = await asyncpg.connect(pg_private.dsn, database=DB, server_settings={"application_name": APP})
    await conn.execute(f"CREATE SCHEMA {ident(SCHEMA)}")
    await conn.execute(f"CREATE TABLE {ident(SCHEMA)}.{ident(TABLE)} (id int PRIMARY KEY, v text)")
    await conn.execute(f"CREATE INDEX {ident(INDEX)} ON {ident(SCHEMA)}.{ident(TABLE)} (v)")
    await conn.execute(f"INSERT INTO {ident(SCHEMA)}.{ident(TABLE)} SELECT g, g::text FROM generate_series(1, 100) g")
    await conn.execute(f"SELECT count(*) /* {COMMENT} */ FROM {ident(SCHEMA)}.{ident(TABLE)}")
    await conn.close()  # a backend flushes its table statistics when it ends
    conn = await asyncpg.connect(pg_private.dsn, database=DB, server_settings={"application_name": APP})
    try:
        config = {
            "postgres": [{"name": "hostile", "dsn": pg_private.dsn}],
            "collectors": {
                **fast_collectors(statements={"query_text_length": 10000},
                                  indexes={"unused_min_stats_age": "0s", "unused_min_size": 0}),
                "cache": {"enabled": False},
            },
        }
        async with running_daemon(config) as d:
            for collector in [d.name for d in builtin_definitions() if d.enabled]:
                await next_round(d, collector)
            _, body = await fetch(d)
            promtool_check_metrics(promtool, body.encode())
            labels = dict(target="hostile", datname=DB, schema=SCHEMA, table=TABLE)
            assert samples(body, "pgcache_table_live_rows", **labels) == [100.0]
            assert samples(body, "pgcache_index_unused", index=INDEX, **labels) == [1.0]
            assert samples(body, "pgcache_connections", application_name=APP, datname=DB)
            queries = [q for q in _label_values(body, "pgcache_statement_info", "query") if "/* " in q and "quoted" in q]
            assert queries and "newline ü" in queries[0]  # newlines collapsed, the rest intact

            host, port = d.bound or ("", 0)
            with prometheus_server(tmp_path, f"{host}:{port}") as prom:
                await prometheus_ready(prom)

                async def scraped_ok() -> bool:
                    targets = await prom.targets()
                    return bool(targets) and targets[0]["health"] == "up" and targets[0]["lastError"] == ""

                await wait_for(scraped_ok, timeout=20, what="a clean Prometheus scrape")
                result = await prom.query('pgcache_table_live_rows{target="hostile"}')
                stored = {(r["metric"]["datname"], r["metric"]["schema"], r["metric"]["table"]) for r in result}
                assert (DB, SCHEMA, TABLE) in stored
                result = await prom.query('pgcache_index_unused{target="hostile"}')
                assert INDEX in {r["metric"]["index"] for r in result}
    finally:
        await conn.close()


def _label_values(body: str, name: str, label: str) -> list[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return [s.labels[label] for fam in text_string_to_metric_families(body) for s in fam.samples
            if s.name == name and label in s.labels]
