"""`database`: size and cumulative counters of each database, from one cluster-wide query on
pg_stat_database. The target's `databases` selection (include/exclude, auto_discover) applies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..config import DatabaseSettings
from .collector import PostgresCollector
from .engine import PostgresTarget

__all__ = ["DATABASE_SQL", "DatabaseCollector", "database_families"]

# pg_database_size() needs CONNECT on the database or pg_read_all_stats; without either the size
# is left out rather than failing the whole query. (The row with a NULL datname is shared objects.)
DATABASE_SQL = """
SELECT d.datname,
       CASE WHEN has_database_privilege(d.oid, 'CONNECT')
                 OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
            THEN pg_database_size(d.oid) END AS size_bytes,
       s.xact_commit, s.xact_rollback, s.blks_hit, s.blks_read, s.deadlocks, s.temp_bytes,
       s.conflicts, extract(epoch FROM s.stats_reset)::float8 AS stats_reset
FROM pg_database d JOIN pg_stat_database s ON s.datid = d.oid
ORDER BY d.datname
"""

# family name, type, column, help
_COUNTERS = (
    ("pgcache_database_commits", "xact_commit", "Transactions committed."),
    ("pgcache_database_rollbacks", "xact_rollback", "Transactions rolled back."),
    ("pgcache_database_blocks_hit", "blks_hit", "Blocks found in shared buffers."),
    ("pgcache_database_blocks_read", "blks_read", "Blocks read from disk (or the OS cache)."),
    ("pgcache_database_deadlocks", "deadlocks", "Deadlocks detected."),
    ("pgcache_database_temp_bytes", "temp_bytes", "Bytes written to temporary files by queries."),
    ("pgcache_database_conflicts", "conflicts",
     "Queries cancelled by conflicts with recovery (standbys only)."),
)


def database_families(target: str, rows: Sequence[Mapping[Any, Any]]) -> list[Metric]:
    labels = ["target", "datname"]
    size = GaugeMetricFamily("pgcache_database_size_bytes", "Disk space of the database.", labels=labels)
    counters = [(CounterMetricFamily(name, doc, labels=labels), col) for name, col, doc in _COUNTERS]
    reset = GaugeMetricFamily(
        "pgcache_database_stats_reset_timestamp_seconds",
        "When the database's statistics were last reset (absent if never).", labels=labels,
    )
    for row in rows:
        lv = [target, row["datname"]]
        if row["size_bytes"] is not None:
            size.add_metric(lv, row["size_bytes"])
        for fam, col in counters:
            fam.add_metric(lv, row[col] or 0)
        if row["stats_reset"] is not None:
            reset.add_metric(lv, row["stats_reset"])
    return [size, *(fam for fam, _ in counters), reset]


class DatabaseCollector(PostgresCollector):
    name = "database"

    def __init__(self, target: PostgresTarget, settings: DatabaseSettings) -> None:
        super().__init__(target, settings)

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        sel = self.pg.cfg.databases
        rows = [
            r for r in (await conn.execute(text(DATABASE_SQL))).mappings()
            if r["datname"] is not None and sel.allows(r["datname"])
            and (sel.auto_discover or r["datname"] == self.pg.default_database)
        ]
        return CollectResult(database_families(self.target, rows))
