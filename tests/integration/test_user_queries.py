"""User-defined queries in the daemon, against a real PostgreSQL: two queries run on their own
schedule under the exporter's read-only sessions, their series appear on /metrics and pass
promtool; a broken one fails alone, with an error naming the collector and the column."""

from __future__ import annotations

from daemon_harness import all_off_except, fast_collectors, fetch, next_round, running_daemon
from metrics_text import promtool_check_metrics, samples, value

from exporter.demo.servers import PostgresCluster

APP_SETUP = """
CREATE TABLE orders (id serial PRIMARY KEY, status text NOT NULL);
INSERT INTO orders (status) SELECT (ARRAY['new', 'paid', 'shipped'])[1 + g % 3] FROM generate_series(1, 30) g;
INSERT INTO orders (status) VALUES ('paid'), ('paid');
"""

QUERIES = [
    {   # A business table, in the databases that have it.
        "name": "orders_by_status", "scope": "database", "databases": ["^uq_app$"],
        "interval": "1s", "timeout": "1s",
        "sql": "SELECT status, count(*) AS orders FROM orders GROUP BY status",
        "labels": ["status"],
        "metrics": [{"column": "orders", "name": "pgcache_app_orders", "type": "gauge",
                     "help": "Orders by status."}],
    },
    {   # A view only some server versions have: pg_stat_recovery_prefetch (15+); older: nothing.
        "name": "recovery_prefetch", "interval": "1s", "timeout": "1s",
        "sql": [{"min_version": 15, "query":
                 "SELECT prefetch, hit, skip_init FROM pg_stat_recovery_prefetch"}],
        "metrics": [
            {"column": "prefetch", "name": "pgcache_recovery_prefetch_blocks", "type": "counter",
             "help": "Blocks prefetched during recovery."},
            {"column": "hit", "name": "pgcache_recovery_prefetch_hits", "type": "counter",
             "help": "Blocks not prefetched because they were already in the buffer pool."},
        ],
    },
    {   # Broken: the mapping names a column the SQL does not return.
        "name": "broken", "interval": "1s", "timeout": "1s",
        "sql": "SELECT 1 AS one",
        "metrics": [{"column": "two", "name": "pgcache_broken_two", "type": "gauge", "help": "Two."}],
    },
]


async def test_user_queries_run_and_a_broken_one_fails_alone(pg: PostgresCluster, promtool: str) -> None:
    pg.psql("DROP DATABASE IF EXISTS uq_app WITH (FORCE)")
    pg.psql("CREATE DATABASE uq_app")
    pg.psql(APP_SETUP, db="uq_app")
    config = {
        "postgres": [{"name": "main", "dsn": pg.dsn}],
        "collectors": {**fast_collectors(), **all_off_except("database")},
        "queries": QUERIES,
    }
    try:
        async with running_daemon(config) as d:
            for name in ("orders_by_status", "recovery_prefetch", "broken", "database"):
                await next_round(d, name)
            _, text = await fetch(d)
            _, landing = await fetch(d, "/")
    finally:
        pg.psql("DROP DATABASE IF EXISTS uq_app WITH (FORCE)")
    promtool_check_metrics(promtool, text.encode())
    # Per database, only where the query's databases regex allows (uq_app, not postgres).
    assert value(text, "pgcache_app_orders", target="main", datname="uq_app", status="paid") == 12
    assert value(text, "pgcache_app_orders", target="main", datname="uq_app", status="new") == 10
    assert samples(text, "pgcache_app_orders", datname="postgres") == []
    assert value(text, "pgcache_recovery_prefetch_blocks_total", target="main") == 0
    for ok in ("orders_by_status", "recovery_prefetch", "database"):
        assert value(text, "pgcache_collector_success", target="main", collector=ok) == 1, ok
    assert value(text, "pgcache_collector_success", target="main", collector="broken") == 0
    assert value(text, "pgcache_up", target="main") == 1  # a broken query is not a down target
    status = d.snapshot.status[("main", "broken")]
    assert status.last_error is not None
    assert "collector broken: column 'two' is not in the query's result (it has: one)" in status.last_error
    assert "column &#x27;two&#x27;" in landing or "column 'two'" in landing


async def test_every_reads_a_query_on_every_nth_run_only(pg: PostgresCluster) -> None:
    from collectors.collector_harness import collect, target_for

    from exporter.config import CollectorSettings
    from exporter.definitions import Definition
    from exporter.postgres.queries import DefinitionCollector

    defn = Definition.model_validate({
        "name": "clock", "interval": "1s", "timeout": "1s",
        "queries": [
            {"name": "fast", "sql": "SELECT extract(epoch FROM clock_timestamp())::float8 AS t",
             "metrics": [{"column": "t", "name": "pgcache_clock_fast", "type": "gauge", "help": "t"}]},
            {"name": "slow", "every": 2,
             "sql": "SELECT extract(epoch FROM clock_timestamp())::float8 AS t",
             "metrics": [{"column": "t", "name": "pgcache_clock_slow", "type": "gauge", "help": "t"}]},
        ],
    })
    async with target_for(pg.dsn) as t:
        collector = DefinitionCollector(t, CollectorSettings(interval=1, timeout=1), defn)
        runs = [await collect(collector) for _ in range(3)]
    fast = [value(r.text, "pgcache_clock_fast") for r in runs]
    slow = [value(r.text, "pgcache_clock_slow") for r in runs]
    assert fast[0] < fast[1] < fast[2]  # read on every run
    assert slow[0] == slow[1] < slow[2]  # read on runs 1 and 3; run 2 repeats run 1's figure
