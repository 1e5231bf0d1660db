"""`activity`: connections by state from pg_stat_activity, and the oldest transaction and query.

The exporter's own sessions (application_name pgcache-exporter) are left out of every figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..config import ActivitySettings
from .collector import PostgresCollector
from .engine import APPLICATION_NAME, PostgresTarget

__all__ = ["AGES_SQL", "SETTINGS_SQL", "ActivityCollector", "activity_families", "activity_sql"]

# Only these column names ever reach the SQL text (they come from a Literal-typed setting).
LABEL_COLUMNS = ("datname", "usename", "application_name", "state", "wait_event_type")

AGES_SQL = """
SELECT coalesce(datname, '') AS datname, coalesce(state, '') AS state,
       max(extract(epoch FROM now() - xact_start))  AS oldest_xact,
       max(extract(epoch FROM now() - query_start)) FILTER (WHERE state <> 'idle') AS oldest_query
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
  AND application_name IS DISTINCT FROM :app
GROUP BY 1, 2
"""

SETTINGS_SQL = """
SELECT name, setting::int AS value FROM pg_settings
WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')
"""


def activity_sql(labels: Sequence[str]) -> str:
    cols = [c for c in LABEL_COLUMNS if c in labels]
    select = "".join(f"coalesce({c}::text, '') AS {c}, " for c in cols)
    group = f"GROUP BY {', '.join(str(i + 1) for i in range(len(cols)))}" if cols else ""
    return (
        f"SELECT {select}count(*) AS n FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
        f"AND application_name IS DISTINCT FROM :app {group}"
    )


def activity_families(
    target: str,
    labels: Sequence[str],
    counts: Sequence[Mapping[Any, Any]],
    ages: Sequence[Mapping[Any, Any]],
    settings: Mapping[str, int],
) -> list[Metric]:
    cols = [c for c in LABEL_COLUMNS if c in labels]
    conns = GaugeMetricFamily(
        "pgcache_connections",
        "Client connections in pg_stat_activity (the exporter's own excluded).",
        labels=["target", *cols],
    )
    for row in counts:
        conns.add_metric([target, *(row[c] for c in cols)], row["n"])

    max_conns = GaugeMetricFamily(
        "pgcache_connections_max",
        "Connections available to ordinary roles: max_connections minus the reserved slots.",
        labels=["target"],
    )
    if "max_connections" in settings:
        reserved = settings.get("superuser_reserved_connections", 0) + settings.get(
            "reserved_connections", 0
        )
        max_conns.add_metric([target], settings["max_connections"] - reserved)

    xact = GaugeMetricFamily(
        "pgcache_oldest_transaction_age_seconds",
        "Age of the oldest open transaction, by database and state.",
        labels=["target", "datname", "state"],
    )
    query = GaugeMetricFamily(
        "pgcache_oldest_query_age_seconds",
        "Age of the oldest running (or last, when idle in transaction) query, by database and state.",
        labels=["target", "datname", "state"],
    )
    for row in ages:
        if row["oldest_xact"] is not None:
            xact.add_metric([target, row["datname"], row["state"]], max(0.0, float(row["oldest_xact"])))
        if row["oldest_query"] is not None:
            query.add_metric([target, row["datname"], row["state"]], max(0.0, float(row["oldest_query"])))
    return [conns, max_conns, xact, query]


class ActivityCollector(PostgresCollector):
    name = "activity"

    def __init__(self, target: PostgresTarget, settings: ActivitySettings) -> None:
        super().__init__(target, settings)
        self.labels = settings.labels
        self._sql = text(activity_sql(settings.labels))

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        params = {"app": APPLICATION_NAME}
        counts = (await conn.execute(self._sql, params)).mappings().all()
        ages = (await conn.execute(text(AGES_SQL), params)).mappings().all()
        settings = {r.name: r.value for r in await conn.execute(text(SETTINGS_SQL))}
        return CollectResult(activity_families(self.target, self.labels, counts, ages, settings))
