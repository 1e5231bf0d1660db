"""The activity collector against a real PostgreSQL: states, ages, vanishing label sets."""

from __future__ import annotations

import asyncio

import asyncpg
from daemon_harness import all_off_except, fast_collectors, fetch, next_round, running_daemon
from metrics_text import samples, types, value

from exporter.demo.servers import PostgresCluster


def config(pg: PostgresCluster, **activity: object) -> dict:
    cols = all_off_except("activity")
    return {"postgres": [{"name": "main", "dsn": pg.dsn}],
            "collectors": {**fast_collectors(activity=activity), **cols}}


async def connect(pg: PostgresCluster, app: str) -> asyncpg.Connection:
    return await asyncpg.connect(pg.dsn, server_settings={"application_name": app})


async def test_connections_by_state_and_ages(pg: PostgresCluster) -> None:
    idle = await connect(pg, "t-idle")
    in_tx = await connect(pg, "t-tx")
    busy = await connect(pg, "t-busy")
    await in_tx.execute("BEGIN; SELECT 1")
    sleeper = asyncio.create_task(busy.execute("SELECT pg_sleep(30)"))
    try:
        await asyncio.sleep(1.2)  # ages above one second
        async with running_daemon(config(pg)) as d:
            await next_round(d, "activity")
            _, text = await fetch(d)
            assert types(text)["pgcache_connections"] == "gauge"
            assert value(text, "pgcache_connections", target="main", application_name="t-idle", state="idle", datname="postgres", usename="postgres") == 1
            assert value(text, "pgcache_connections", application_name="t-tx", state="idle in transaction") == 1
            assert value(text, "pgcache_connections", application_name="t-busy", state="active", wait_event_type="Timeout") == 1
            # The exporter's own sessions are not counted anywhere.
            assert samples(text, "pgcache_connections", application_name="pgcache-exporter") == []
            # max_connections 100 minus 3 superuser-reserved slots.
            assert value(text, "pgcache_connections_max", target="main") == 97
            tx_age = value(text, "pgcache_oldest_transaction_age_seconds", datname="postgres", state="idle in transaction")
            assert tx_age is not None and 1.0 <= tx_age < 60
            q_age = value(text, "pgcache_oldest_query_age_seconds", datname="postgres", state="active")
            assert q_age is not None and 1.0 <= q_age < 60
            # An idle session has no running query: no query age for state idle.
            assert value(text, "pgcache_oldest_query_age_seconds", datname="postgres", state="idle") is None

            # A label set that vanishes from the server vanishes at the next collection.
            await in_tx.close()
            await next_round(d, "activity")
            _, text = await fetch(d)
            assert samples(text, "pgcache_connections", application_name="t-tx") == []
            assert value(text, "pgcache_oldest_transaction_age_seconds", state="idle in transaction") is None
            assert value(text, "pgcache_connections", application_name="t-idle") == 1
    finally:
        sleeper.cancel()
        for c in (idle, busy):
            await c.close(timeout=2)
        if not in_tx.is_closed():
            await in_tx.close()


async def test_labels_are_configurable(pg: PostgresCluster) -> None:
    conns = [await connect(pg, f"app-{i}") for i in range(3)]
    try:
        async with running_daemon(config(pg, labels=["datname", "state"])) as d:
            await next_round(d, "activity")
            _, text = await fetch(d)
            # application_name is gone as a label: the three idle sessions fold into one series.
            idle = samples(text, "pgcache_connections", datname="postgres", state="idle")
            assert idle == [3.0] or (len(idle) == 1 and idle[0] >= 3)
            assert all("application_name" not in line for line in text.splitlines() if line.startswith("pgcache_connections{"))
    finally:
        for c in conns:
            await c.close()
