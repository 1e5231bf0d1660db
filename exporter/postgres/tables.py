"""`tables`: sizes (heap, indexes, TOAST), rows, scans and maintenance times of user tables in
every watched database; the top `limit` tables by total size, the rest counted as dropped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..config import TablesSettings
from .collector import PostgresCollector
from .engine import PostgresTarget
from .sizes import LOCKED_RELATIONS_CTE, skipped_locked_family

__all__ = ["TABLES_SQL", "TableRow", "TablesCollector", "select_tables", "table_families"]

# Sizes are NULL for a table when it, its TOAST table or any of their indexes is locked: the
# size functions open all of them. The heap figure includes the free space and visibility maps.
TABLES_SQL = f"""
WITH {LOCKED_RELATIONS_CTE}
SELECT s.relid, s.schemaname AS schema, s.relname AS "table",
       s.n_live_tup AS live_rows, s.n_dead_tup AS dead_rows, s.seq_scan, s.idx_scan,
       extract(epoch FROM s.last_vacuum)::float8 AS last_vacuum,
       extract(epoch FROM s.last_autovacuum)::float8 AS last_autovacuum,
       extract(epoch FROM s.last_analyze)::float8 AS last_analyze,
       extract(epoch FROM s.last_autoanalyze)::float8 AS last_autoanalyze,
       lk.locked,
       CASE WHEN NOT lk.locked THEN pg_table_size(s.relid) - sz.toast END AS heap_bytes,
       CASE WHEN NOT lk.locked THEN pg_indexes_size(s.relid) END AS indexes_bytes,
       CASE WHEN NOT lk.locked THEN sz.toast END AS toast_bytes
FROM pg_stat_user_tables s
JOIN pg_class c ON c.oid = s.relid
CROSS JOIN LATERAL (
    SELECT EXISTS (SELECT 1 FROM locked WHERE locked.oid IN (c.oid, c.reltoastrelid))
        OR EXISTS (SELECT 1 FROM pg_index i JOIN locked ON locked.oid = i.indexrelid
                   WHERE i.indrelid IN (c.oid, c.reltoastrelid)) AS locked
) lk
CROSS JOIN LATERAL (
    SELECT CASE WHEN c.reltoastrelid <> 0 AND NOT lk.locked
                THEN pg_total_relation_size(c.reltoastrelid) ELSE 0 END AS toast
) sz
"""


@dataclass(frozen=True)
class TableRow:
    schema: str
    table: str
    relid: int = 0
    live_rows: int = 0
    dead_rows: int = 0
    seq_scan: int = 0
    idx_scan: int | None = None  # None: the table has no index
    last_vacuum: float | None = None
    last_autovacuum: float | None = None
    last_analyze: float | None = None
    last_autoanalyze: float | None = None
    locked: bool = False
    heap_bytes: int | None = None
    indexes_bytes: int | None = None
    toast_bytes: int | None = None

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any]) -> TableRow:
        return cls(**{f: row[f] for f in cls.__dataclass_fields__})

    @property
    def total_bytes(self) -> int | None:
        if self.heap_bytes is None:
            return None
        return self.heap_bytes + (self.indexes_bytes or 0) + (self.toast_bytes or 0)


def select_tables(rows: Sequence[TableRow], limit: int) -> list[TableRow]:
    """The `limit` biggest tables (locked ones, of unknown size, last)."""
    return sorted(rows, key=lambda r: (-(r.total_bytes if r.total_bytes is not None else -1),
                                       r.schema, r.table))[:limit]


def table_families(
    target: str, datname: str, rows: Sequence[TableRow], limit: int
) -> tuple[list[Metric], int]:
    """Rows of one database -> (families, tables cut by the limit)."""
    chosen = select_tables(rows, limit)
    labels = ["target", "datname", "schema", "table"]

    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=labels)

    heap = gauge("pgcache_table_size_bytes",
                 "Disk space of the table itself (all forks), without indexes and TOAST.")
    idx = gauge("pgcache_table_indexes_size_bytes", "Disk space of all indexes on the table.")
    toast = gauge("pgcache_table_toast_size_bytes", "Disk space of the table's TOAST table and its index.")
    live = gauge("pgcache_table_live_rows", "Estimated live rows.")
    dead = gauge("pgcache_table_dead_rows", "Estimated dead rows (waiting for vacuum).")
    seq = CounterMetricFamily("pgcache_table_seq_scans", "Sequential scans of the table.", labels=labels)
    iscan = CounterMetricFamily(
        "pgcache_table_index_scans", "Index scans on the table (absent when it has no index).", labels=labels
    )
    times = {
        "last_vacuum": gauge("pgcache_table_last_vacuum_timestamp_seconds",
                             "When the table was last vacuumed by hand (absent if never)."),
        "last_autovacuum": gauge("pgcache_table_last_autovacuum_timestamp_seconds",
                                 "When autovacuum last vacuumed the table (absent if never)."),
        "last_analyze": gauge("pgcache_table_last_analyze_timestamp_seconds",
                              "When the table was last analyzed by hand (absent if never)."),
        "last_autoanalyze": gauge("pgcache_table_last_autoanalyze_timestamp_seconds",
                                  "When autovacuum last analyzed the table (absent if never)."),
    }
    for r in chosen:
        lv = [target, datname, r.schema, r.table]
        if r.heap_bytes is not None:
            heap.add_metric(lv, r.heap_bytes)
        if r.indexes_bytes is not None:
            idx.add_metric(lv, r.indexes_bytes)
        if r.toast_bytes is not None:
            toast.add_metric(lv, r.toast_bytes)
        live.add_metric(lv, r.live_rows)
        dead.add_metric(lv, r.dead_rows)
        seq.add_metric(lv, r.seq_scan or 0)
        if r.idx_scan is not None:
            iscan.add_metric(lv, r.idx_scan)
        for attr, fam in times.items():
            value = getattr(r, attr)
            if value is not None:
                fam.add_metric(lv, value)
    families: list[Metric] = [heap, idx, toast, live, dead, seq, iscan, *times.values()]
    families.append(skipped_locked_family(
        "pgcache_tables_skipped_locked", "Tables", target, datname, sum(r.locked for r in rows)
    ))
    return families, len(rows) - len(chosen)


class TablesCollector(PostgresCollector):
    name = "tables"
    per_database = True

    def __init__(self, target: PostgresTarget, settings: TablesSettings) -> None:
        super().__init__(target, settings)
        self.limit = settings.limit

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        rows = [TableRow.from_mapping(m) for m in (await conn.execute(text(TABLES_SQL))).mappings()]
        families, dropped = table_families(
            self.target, datname or self.pg.default_database, rows, self.limit
        )
        return CollectResult(families, dropped=dropped)
