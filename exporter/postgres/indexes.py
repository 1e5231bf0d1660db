"""`indexes`: per-index usage and size in every watched database, and the indexes worth a look:
unused candidates, invalid ones, and redundant ones (covered by another index on the table).

The rules are pure functions over `IndexRow`s (`is_unused_candidate`, `redundant_indexes`), so
the reports reuse them with the same SQL (`indexes_sql`, `STATS_AGE_SQL`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..config import IndexesSettings
from .collector import PostgresCollector
from .engine import PostgresTarget
from .sizes import LOCKED_RELATIONS_CTE, skipped_locked_family

__all__ = [
    "STATS_AGE_SQL",
    "IndexRow",
    "IndexesCollector",
    "index_families",
    "indexes_sql",
    "is_unused_candidate",
    "redundant_indexes",
    "select_indexes",
]

# Statistics count from their last reset; never reset, from the server's start.
STATS_AGE_SQL = """
SELECT extract(epoch FROM now() - coalesce(stats_reset, pg_postmaster_start_time()))::float8 AS age
FROM pg_stat_database WHERE datname = current_database()
"""

# Node trees carry the parse position of each node; without them, equal predicates compare equal.
# (The backslash keeps SQLAlchemy from reading ":location" as a bind parameter.)
_NO_LOCATION = r"regexp_replace(coalesce({}::text, ''), ' \:location -?\d+', '', 'g')"


def indexes_sql(server_version_num: int) -> str:
    """One row per index of a user table; size NULL when the index or its table is locked."""
    last_scan = (
        "extract(epoch FROM s.last_idx_scan)::float8"
        if server_version_num >= 160000 else "NULL::float8"
    )
    return f"""
WITH {LOCKED_RELATIONS_CTE}
SELECT s.indexrelid, s.relid, s.schemaname AS schema, s.relname AS "table", s.indexrelname AS "index",
       s.idx_scan, s.idx_tup_read, s.idx_tup_fetch, {last_scan} AS last_scan,
       i.indisprimary, i.indisunique, i.indisexclusion, i.indisreplident, i.indisvalid,
       i.indnkeyatts, i.indkey::int2[] AS columns, i.indclass::oid[] AS opclasses,
       i.indcollation::oid[] AS collations, i.indoption::int2[] AS options, am.amname,
       {_NO_LOCATION.format("i.indpred")} AS predicate,
       {_NO_LOCATION.format("i.indexprs")} AS expressions,
       lk.locked,
       CASE WHEN NOT lk.locked THEN pg_relation_size(s.indexrelid) END AS size_bytes
FROM pg_stat_user_indexes s
JOIN pg_index i ON i.indexrelid = s.indexrelid
JOIN pg_class c ON c.oid = s.indexrelid
JOIN pg_am am ON am.oid = c.relam
CROSS JOIN LATERAL (
    SELECT EXISTS (SELECT 1 FROM locked WHERE locked.oid IN (s.indexrelid, s.relid)) AS locked
) lk
"""


@dataclass(frozen=True)
class IndexRow:
    schema: str
    table: str
    index: str
    indexrelid: int = 0
    relid: int = 0
    idx_scan: int = 0
    idx_tup_read: int = 0
    idx_tup_fetch: int = 0
    last_scan: float | None = None
    indisprimary: bool = False
    indisunique: bool = False
    indisexclusion: bool = False
    indisreplident: bool = False
    indisvalid: bool = True
    indnkeyatts: int = 1
    columns: tuple[int, ...] = (1,)  # attnums; 0 is an expression column
    opclasses: tuple[int, ...] = (0,)
    collations: tuple[int, ...] = (0,)
    options: tuple[int, ...] = (0,)
    amname: str = "btree"
    predicate: str = ""
    expressions: str = ""
    locked: bool = False
    size_bytes: int | None = None  # None: not read (locked)

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any]) -> IndexRow:
        values = {f: row[f] for f in cls.__dataclass_fields__}
        for f in ("columns", "opclasses", "collations", "options"):
            values[f] = tuple(values[f] or ())
        for f in ("idx_scan", "idx_tup_read", "idx_tup_fetch"):
            values[f] = values[f] or 0
        return cls(**values)

    @property
    def enforces_constraint(self) -> bool:
        """Dropping it would change behaviour, not only speed."""
        return self.indisprimary or self.indisunique or self.indisexclusion

    @property
    def key(self) -> tuple[tuple[int, int, int, int], ...]:
        """The key columns with what decides their order (operator class, collation, ASC/DESC)."""
        n = self.indnkeyatts
        return tuple(zip(self.columns[:n], self.opclasses[:n], self.collations[:n],
                         self.options[:n], strict=False))


def is_unused_candidate(
    row: IndexRow, stats_age: float | None, min_stats_age: float, min_size: int
) -> bool:
    """No scan since the statistics were reset, statistics old enough to mean something, big
    enough to matter, and nothing else depends on it (constraint, replica identity, validity)."""
    return (
        row.idx_scan == 0
        and stats_age is not None and stats_age >= min_stats_age
        and row.size_bytes is not None and row.size_bytes >= min_size
        and not row.enforces_constraint
        and not row.indisreplident
        and row.indisvalid
    )


def _covers(wide: IndexRow, narrow: IndexRow) -> bool:
    """`wide` answers every query `narrow` answers: same table, method and predicate, and
    narrow's key columns are a leading prefix of wide's (its INCLUDE columns all in wide)."""
    if (wide.relid, wide.amname, wide.predicate) != (narrow.relid, narrow.amname, narrow.predicate):
        return False
    if not wide.indisvalid:
        return False
    nk, wk = narrow.key, wide.key
    if narrow.amname == "btree":
        if wk[: len(nk)] != nk:
            return False
    elif wk != nk:  # other methods: only exact duplicates
        return False
    if 0 in narrow.columns and narrow.expressions != wide.expressions:
        return False  # expression columns: only when the expressions are the same
    if not set(narrow.columns) <= set(wide.columns):
        return False
    if wk == nk and set(wide.columns) == set(narrow.columns):
        # Exact duplicates: flag one of the two (a unique one is the keeper, else the first name).
        return wide.enforces_constraint or wide.index < narrow.index
    return True


def redundant_indexes(rows: Sequence[IndexRow]) -> dict[int, IndexRow]:
    """indexrelid -> the index that covers it, for valid non-constraint indexes only."""
    by_table: dict[int, list[IndexRow]] = {}
    for r in rows:
        by_table.setdefault(r.relid, []).append(r)
    out: dict[int, IndexRow] = {}
    for group in by_table.values():
        for narrow in group:
            if narrow.enforces_constraint or not narrow.indisvalid:
                continue
            covering = [w for w in group if w.indexrelid != narrow.indexrelid and _covers(w, narrow)]
            if covering:
                # The closest cover (fewest columns), then by name, so the label is stable.
                out[narrow.indexrelid] = min(covering, key=lambda w: (len(w.columns), w.index))
    return out


def select_indexes(
    rows: Sequence[IndexRow], flagged: set[int], limit: int
) -> list[IndexRow]:
    """Flagged indexes first, then the biggest (unknown sizes last), at most `limit`."""
    ranked = sorted(
        rows,
        key=lambda r: (r.indexrelid not in flagged, -(r.size_bytes or -1), r.schema, r.table, r.index),
    )
    return ranked[:limit]


def index_families(
    target: str,
    datname: str,
    rows: Sequence[IndexRow],
    *,
    stats_age: float | None,
    settings: IndexesSettings,
    last_scan: bool,
) -> tuple[list[Metric], int]:
    """Rows of one database -> (families, indexes cut by the limit)."""
    unused = {
        r.indexrelid for r in rows
        if is_unused_candidate(r, stats_age, settings.unused_min_stats_age, settings.unused_min_size)
    }
    invalid = {r.indexrelid for r in rows if not r.indisvalid}
    redundant = redundant_indexes(rows)
    chosen = select_indexes(rows, unused | invalid | redundant.keys(), settings.limit)

    labels = ["target", "datname", "schema", "table", "index"]
    scans = CounterMetricFamily("pgcache_index_scans", "Index scans initiated on the index.", labels=labels)
    tup_read = CounterMetricFamily(
        "pgcache_index_tuples_read", "Index entries returned by scans of the index.", labels=labels
    )
    tup_fetch = CounterMetricFamily(
        "pgcache_index_tuples_fetched",
        "Live table rows fetched by simple index scans of the index.", labels=labels,
    )
    size = GaugeMetricFamily(
        "pgcache_index_size_bytes", "Disk space of the index (absent while it is locked).", labels=labels
    )
    unused_f = GaugeMetricFamily(
        "pgcache_index_unused",
        "1 for an unused-index candidate: no scan since the statistics were reset, statistics at "
        "least unused_min_stats_age old, at least unused_min_size, backing no constraint.",
        labels=labels,
    )
    invalid_f = GaugeMetricFamily(
        "pgcache_index_invalid",
        "1 for an invalid index (a failed CREATE INDEX CONCURRENTLY): maintained, never used.",
        labels=labels,
    )
    redundant_f = GaugeMetricFamily(
        "pgcache_index_redundant",
        "1 for an index whose key columns are a leading prefix of another index on the same "
        "table with the same predicate (covered_by names it).",
        labels=[*labels, "covered_by"],
    )
    families: list[Metric] = [scans, tup_read, tup_fetch, size, unused_f, invalid_f, redundant_f]
    if last_scan:
        last = GaugeMetricFamily(
            "pgcache_index_last_scan_timestamp_seconds",
            "When the index was last scanned (PostgreSQL 16+; absent if never).", labels=labels,
        )
        families.append(last)
    for r in chosen:
        lv = [target, datname, r.schema, r.table, r.index]
        scans.add_metric(lv, r.idx_scan)
        tup_read.add_metric(lv, r.idx_tup_read)
        tup_fetch.add_metric(lv, r.idx_tup_fetch)
        if r.size_bytes is not None:
            size.add_metric(lv, r.size_bytes)
        if r.indexrelid in unused:
            unused_f.add_metric(lv, 1)
        if r.indexrelid in invalid:
            invalid_f.add_metric(lv, 1)
        cover = redundant.get(r.indexrelid)
        if cover is not None:
            redundant_f.add_metric([*lv, cover.index], 1)
        if last_scan and r.last_scan is not None:
            last.add_metric(lv, r.last_scan)

    age = GaugeMetricFamily(
        "pgcache_database_stats_age_seconds",
        "Age of the database's cumulative statistics (since their reset, else the server's start): "
        "an index counts as unused only once this reaches unused_min_stats_age.",
        labels=["target", "datname"],
    )
    if stats_age is not None:
        age.add_metric([target, datname], stats_age)
    families.append(age)
    families.append(skipped_locked_family(
        "pgcache_indexes_skipped_locked", "Indexes", target, datname, sum(r.locked for r in rows)
    ))
    return families, len(rows) - len(chosen)


class IndexesCollector(PostgresCollector):
    name = "indexes"
    per_database = True

    def __init__(self, target: PostgresTarget, settings: IndexesSettings) -> None:
        super().__init__(target, settings)
        self.index_settings = settings

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        version = self.pg.server_version_num or 0
        result = await conn.execute(text(indexes_sql(version)))
        rows = [IndexRow.from_mapping(m) for m in result.mappings()]
        stats_age = (await conn.execute(text(STATS_AGE_SQL))).scalar()
        families, dropped = index_families(
            self.target, datname or self.pg.default_database, rows,
            stats_age=stats_age, settings=self.index_settings, last_scan=version >= 160000,
        )
        return CollectResult(families, dropped=dropped)
