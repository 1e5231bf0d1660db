"""`indexes`: per-index usage and size in every watched database, and the indexes worth a look:
unused candidates, invalid ones, and redundant ones (covered by another index on the table).

The rules are pure functions over `IndexRow`s (`is_unused_candidate`, `redundant_indexes`), so
the reports reuse them with the same SQL (`indexes_sql`, `STATS_AGE_SQL`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..config import IndexesSettings
from ..definitions import definition
from ..families import Family
from .engine import PostgresTarget
from .queries import DefinitionCollector, count_series, render_rows, sql_for

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

_DEF = definition("indexes")
_INDEXES, _STATS_AGE = _DEF.query("indexes"), _DEF.query("stats_age")
_SKIPPED = _DEF.declared("pgcache_indexes_skipped_locked")


def _sqlalchemy_text(sql: str) -> str:
    """Escape `:name` so SQLAlchemy's text() does not read it as a bind parameter."""
    return re.sub(r"(?<![:\\]):(?=[A-Za-z_])", r"\\:", sql)


def indexes_sql(server_version_num: int) -> str:
    """One row per index of a user table (definitions/indexes.yaml), for SQLAlchemy's text()."""
    sql = sql_for(_INDEXES, server_version_num, {})
    assert sql is not None
    return _sqlalchemy_text(sql)


STATS_AGE_SQL = _STATS_AGE.sql[0].query


_ARRAYS = ("columns", "opclasses", "collations", "options")
_COUNTS = ("idx_scan", "idx_tup_read", "idx_tup_fetch")


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
        have = set(row.keys())  # last_scan only from PostgreSQL 16
        values = {f: row[f] for f in cls.__dataclass_fields__ if f in have}
        for f in _ARRAYS:
            values[f] = tuple(values[f] or ())
        for f in _COUNTS:
            values[f] = values[f] or 0
        return cls(**values)

    @classmethod
    def reader(cls, columns: Sequence[str]) -> Callable[[Sequence[Any]], IndexRow]:
        """A fast maker of IndexRows from rows with these columns (thousands per run)."""
        names = [f for f in cls.__dataclass_fields__ if f in columns]
        pos = [columns.index(f) for f in names]
        arrays = {i for i, f in enumerate(names) if f in _ARRAYS}
        counts = {i for i, f in enumerate(names) if f in _COUNTS}

        def read(row: Sequence[Any]) -> IndexRow:
            values = [row[p] for p in pos]
            for i in arrays:
                values[i] = tuple(values[i] or ())
            for i in counts:
                values[i] = values[i] or 0
            return cls(**dict(zip(names, values, strict=True)))

        return read

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


_FLAGS = ["unused", "invalid", "redundant", "covered_by"]
_FIELDS = [f.name for f in fields(IndexRow)]
_COLUMNS = _FIELDS + _FLAGS
_values = attrgetter(*_FIELDS)  # dataclasses.astuple deep-copies: far too slow per row


def index_families(
    target: str,
    datname: str,
    rows: Sequence[IndexRow],
    *,
    stats_age: float | None,
    settings: IndexesSettings,
    last_scan: bool,
) -> tuple[list[Family], int]:
    """Rows of one database -> (families, series cut by the limit)."""
    unused = {
        r.indexrelid for r in rows
        if is_unused_candidate(r, stats_age, settings.unused_min_stats_age, settings.unused_min_size)
    }
    invalid = {r.indexrelid for r in rows if not r.indisvalid}
    redundant = redundant_indexes(rows)
    chosen = select_indexes(rows, unused | invalid | redundant.keys(), settings.limit)

    def as_row(r: IndexRow) -> tuple[Any, ...]:
        cover = redundant.get(r.indexrelid)
        return (*_values(r), 1 if r.indexrelid in unused else None,
                1 if r.indexrelid in invalid else None,
                1 if cover is not None else None, cover.index if cover is not None else None)

    version = 160000 if last_scan else 0
    fixed = [target, datname]
    out = render_rows(_DEF, _INDEXES, _COLUMNS, [as_row(r) for r in chosen], fixed,
                      server_version_num=version)
    chosen_ids = {r.indexrelid for r in chosen}
    cut = [as_row(r) for r in rows if r.indexrelid not in chosen_ids]
    dropped = count_series(_INDEXES, _COLUMNS, cut, version)
    families = list(out.families)
    if stats_age is not None:
        families += render_rows(_DEF, _STATS_AGE, ["age"], [(stats_age,)], fixed,
                                server_version_num=version).families
    skipped = Family.of(_SKIPPED)
    skipped.add_labels(_SKIPPED.labels, fixed, sum(r.locked for r in rows))
    families.append(skipped)
    return families, dropped


class IndexesCollector(DefinitionCollector):
    def __init__(self, target: PostgresTarget, settings: IndexesSettings) -> None:
        super().__init__(target, settings, _DEF)
        self.index_settings = settings

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        version = self.pg.server_version_num or 0
        got = await self.rows(conn, _INDEXES, {})
        assert got is not None
        read = IndexRow.reader(got[0])
        rows = [read(m) for m in got[1]]
        age = await self.rows(conn, _STATS_AGE, {})
        stats_age = age[1][0]["age"] if age is not None and age[1] else None
        families, dropped = index_families(
            self.target, datname or self.pg.default_database, rows,
            stats_age=stats_age, settings=self.index_settings, last_scan=version >= 160000,
        )
        return CollectResult(families, dropped=dropped)
