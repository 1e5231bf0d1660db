"""`statements`: per-statement counters from pg_stat_statements, cluster-wide, top `limit` only.

The extension must be installed (CREATE EXTENSION) in the database the target's DSN names and
preloaded; its view then shows the statements of every database. The columns are chosen by the
installed extension version (which is what defines them: `ALTER EXTENSION ... UPDATE` is a separate
step from upgrading the server), not by trial and error.

Statistics are read with `pg_stat_statements(false)` (no query text: the text file can be large),
and texts are fetched only for exported statements whose queryid has not been seen before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..config import StatementsSettings
from ..errors import QueryError
from .collector import PostgresCollector
from .engine import PostgresTarget, describe_error

__all__ = [
    "StatementRow",
    "StatementsCollector",
    "query_text_label",
    "select_statements",
    "statement_families",
    "statements_sql",
]

# A statement already exported stays while its rank is within KEEP_FACTOR x limit.
KEEP_FACTOR = 1.5

INSUFFICIENT_PRIVILEGE = "<insufficient privilege>"

HOW_TO_ENABLE = (
    "set shared_preload_libraries = 'pg_stat_statements' in postgresql.conf (restart needed), "
    "then run CREATE EXTENSION pg_stat_statements in database {db}"
)

EXTENSION_SQL = """
SELECT e.extversion, quote_ident(n.nspname) AS schema,
       current_setting('track_io_timing')::bool AS io_timing
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'pg_stat_statements'
"""

Version = tuple[int, int]


def parse_extversion(value: str) -> Version:
    """'1.10' -> (1, 10)."""
    major, _, minor = value.partition(".")
    return int(major), int(minor or 0)


def statements_sql(schema: str, extversion: Version) -> str:
    """Counters summed over `toplevel` (14+), one row per (dbid, userid, queryid).

    1.8 (PG13) renamed total_time to total_exec_time and added planning time; 1.11 (PG17) split
    blk_read_time into shared_/local_ (the old figure covered both, so they are added back up).
    """
    exec_ms = "total_exec_time" if extversion >= (1, 8) else "total_time"
    plan_ms = "total_plan_time" if extversion >= (1, 8) else "0"
    if extversion >= (1, 11):
        read_ms = "shared_blk_read_time + local_blk_read_time"
        write_ms = "shared_blk_write_time + local_blk_write_time"
    else:
        read_ms, write_ms = "blk_read_time", "blk_write_time"
    return f"""
SELECT s.dbid, s.userid, s.queryid,
       coalesce(d.datname, s.dbid::text) AS datname,
       coalesce(r.rolname, s.userid::text) AS username,
       sum(s.calls)::float8 AS calls,
       sum(s.{exec_ms})::float8 AS exec_ms,
       sum({plan_ms})::float8 AS plan_ms,
       sum(s.rows)::float8 AS rows,
       sum(s.shared_blks_hit)::float8 AS shared_blks_hit,
       sum(s.shared_blks_read)::float8 AS shared_blks_read,
       sum(s.temp_blks_written)::float8 AS temp_blks_written,
       sum({read_ms})::float8 AS read_ms,
       sum({write_ms})::float8 AS write_ms
FROM {schema}.pg_stat_statements(false) s
LEFT JOIN pg_database d ON d.oid = s.dbid
LEFT JOIN pg_roles r ON r.oid = s.userid
GROUP BY s.dbid, s.userid, s.queryid, d.datname, r.rolname
"""


def statement_texts_sql(schema: str) -> str:
    # Reading texts loads the whole query-text file, so this runs only for unseen queryids.
    return (
        f"SELECT DISTINCT ON (queryid) queryid, query FROM {schema}.pg_stat_statements(true) "
        "WHERE queryid = ANY(:ids)"
    )


def statements_info_sql(schema: str) -> str:
    """pg_stat_statements_info exists from 1.9 (PG14)."""
    return f"SELECT dealloc, extract(epoch FROM stats_reset)::float8 AS stats_reset FROM {schema}.pg_stat_statements_info"


Key = tuple[int, int, int | None]  # (dbid, userid, queryid); queryid None: hidden from us


@dataclass(frozen=True)
class StatementRow:
    dbid: int
    userid: int
    queryid: int | None
    datname: str
    username: str
    calls: float = 0.0
    exec_ms: float = 0.0
    plan_ms: float = 0.0
    rows: float = 0.0
    shared_blks_hit: float = 0.0
    shared_blks_read: float = 0.0
    temp_blks_written: float = 0.0
    read_ms: float = 0.0
    write_ms: float = 0.0

    @property
    def key(self) -> Key:
        return (self.dbid, self.userid, self.queryid)

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any]) -> StatementRow:
        ids = ("dbid", "userid", "queryid", "datname", "username")
        values: dict[str, Any] = {f: row[f] if f in ids else float(row[f] or 0) for f in cls.__dataclass_fields__}
        return cls(**values)


def _rank_key(row: StatementRow) -> tuple[float, int, int, bool, int]:
    # Highest total exec time first; ties broken by identity so the order is deterministic.
    return (-row.exec_ms, row.dbid, row.userid, row.queryid is None, row.queryid or 0)


def select_statements(
    rows: Sequence[StatementRow], previous: Collection[Key], limit: int
) -> list[StatementRow]:
    """The top `limit` rows by total exec time, with hysteresis: a row exported last time stays
    while its rank is within KEEP_FACTOR x limit, so the set does not flap at the boundary."""
    ranked = sorted(rows, key=_rank_key)
    keep_within = math.ceil(limit * KEEP_FACTOR)
    chosen = [r for r in ranked[:keep_within] if r.key in previous][:limit]
    keys = {r.key for r in chosen}
    for r in ranked:
        if len(chosen) >= limit:
            break
        if r.key not in keys:
            chosen.append(r)
            keys.add(r.key)
    return sorted(chosen, key=_rank_key)


# pg_stat_statements does not normalize every utility statement: `CREATE ROLE x PASSWORD '...'`
# and connection strings passed to dblink/postgres_fdw keep their literals. Scrub them before the
# text becomes a label that anyone who can scrape /metrics reads.
_PASSWORD_LITERAL = re.compile(
    r"(?i)\b(PASSWORD\s+)(?:E'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\$\w*\$.*?\$\w*\$)", re.S
)
_CONNINFO_PASSWORD = re.compile(r"(?i)\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']+)")
_URL_PASSWORD = re.compile(r"(://[^:/@\s']*:)[^@\s']+@")


def scrub_secrets(query: str) -> str:
    query = _PASSWORD_LITERAL.sub(r"\1'***'", query)
    query = _CONNINFO_PASSWORD.sub(r"\1***", query)
    return _URL_PASSWORD.sub(r"\1***@", query)


def query_text_label(query: str | None, length: int) -> str | None:
    """Secrets scrubbed, whitespace runs (newlines included) collapsed to one space, cut to
    `length` characters. None when there is no text to show (off, unknown, or hidden from us)."""
    if length <= 0 or query is None or query == INSUFFICIENT_PRIVILEGE:
        return None
    return " ".join(scrub_secrets(query).split())[:length]


def statement_families(
    target: str,
    rows: Iterable[StatementRow],
    *,
    texts: Mapping[int, str | None] | None = None,
    io_timing: bool = False,
    dealloc: float | None = None,
    stats_reset: float | None = None,
) -> list[Metric]:
    """Rows -> families. `texts` maps queryid to its (already cut) label text; None: no info."""
    labels = ["target", "datname", "user", "queryid"]

    def counter(name: str, doc: str) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=labels)

    calls = counter("pgcache_statement_calls", "Times the statement was executed.")
    exec_s = counter("pgcache_statement_exec_seconds", "Time spent executing the statement.")
    plan_s = counter(
        "pgcache_statement_plan_seconds",
        "Time spent planning the statement (0 unless pg_stat_statements.track_planning is on).",
    )
    rows_f = counter("pgcache_statement_rows", "Rows retrieved or affected by the statement.")
    hit = counter("pgcache_statement_shared_blocks_hit", "Shared buffer hits of the statement.")
    read = counter("pgcache_statement_shared_blocks_read", "Shared blocks read by the statement.")
    temp = counter("pgcache_statement_temp_blocks_written", "Temp blocks written by the statement.")
    families: list[Metric] = [calls, exec_s, plan_s, rows_f, hit, read, temp]
    if io_timing:
        read_s = counter(
            "pgcache_statement_block_read_seconds",
            "Time the statement spent reading data file blocks (track_io_timing).",
        )
        write_s = counter(
            "pgcache_statement_block_write_seconds",
            "Time the statement spent writing data file blocks (track_io_timing).",
        )
        families += [read_s, write_s]
    info = GaugeMetricFamily(
        "pgcache_statement_info",
        "The statement's normalized query text (whitespace collapsed, truncated), always 1.",
        labels=[*labels, "query"],
    )

    for r in rows:
        # A NULL queryid is the sum of what this role may not see: label "" never collides.
        lv = [target, r.datname, r.username, "" if r.queryid is None else str(r.queryid)]
        calls.add_metric(lv, r.calls)
        exec_s.add_metric(lv, r.exec_ms / 1000)
        plan_s.add_metric(lv, r.plan_ms / 1000)
        rows_f.add_metric(lv, r.rows)
        hit.add_metric(lv, r.shared_blks_hit)
        read.add_metric(lv, r.shared_blks_read)
        temp.add_metric(lv, r.temp_blks_written)
        if io_timing:
            read_s.add_metric(lv, r.read_ms / 1000)
            write_s.add_metric(lv, r.write_ms / 1000)
        if texts is not None and r.queryid is not None:
            label = texts.get(r.queryid)
            if label is not None:
                info.add_metric([*lv, label], 1)
    if texts is not None:
        families.append(info)

    if dealloc is not None:
        d = CounterMetricFamily(
            "pgcache_statements_deallocations",
            "Times pg_stat_statements evicted its least-used entries (pg_stat_statements.max reached).",
            labels=["target"],
        )
        d.add_metric([target], dealloc)
        families.append(d)
    if stats_reset is not None:
        reset = GaugeMetricFamily(
            "pgcache_statements_stats_reset_timestamp_seconds",
            "When all pg_stat_statements statistics were last reset.",
            labels=["target"],
        )
        reset.add_metric([target], stats_reset)
        families.append(reset)
    return families


class StatementsCollector(PostgresCollector):
    name = "statements"

    def __init__(self, target: PostgresTarget, settings: StatementsSettings) -> None:
        super().__init__(target, settings)
        self.limit = settings.limit
        self.text_length = settings.query_text_length
        self._exported: set[Key] = set()
        # queryid -> label text (None: no usable text); only ids still in the view are kept.
        self._texts: dict[int, str | None] = {}

    def _missing(self, why: str) -> QueryError:
        db = self.pg.default_database
        return QueryError(
            f"target {self.target}, database {db}: pg_stat_statements {why}: "
            + HOW_TO_ENABLE.format(db=db)
        )

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        ext = (await conn.execute(text(EXTENSION_SQL))).mappings().first()
        if ext is None:
            raise self._missing("is not installed in this database (the one the DSN names)")
        version = parse_extversion(ext["extversion"])
        schema = ext["schema"]
        try:
            result = await conn.execute(text(statements_sql(schema, version)))
        except DBAPIError as e:
            if getattr(getattr(e.orig, "__cause__", None), "sqlstate", None) == "55000":
                raise self._missing("is not loaded") from None
            raise QueryError(
                f"target {self.target}, database {self.pg.default_database}: {describe_error(e)}"
            ) from None
        rows = [StatementRow.from_mapping(m) for m in result.mappings()]

        chosen = select_statements(rows, self._exported, self.limit)
        self._exported = {r.key for r in chosen}

        texts: dict[int, str | None] | None = None
        if self.text_length > 0:
            present = {r.queryid for r in rows if r.queryid is not None}
            self._texts = {q: t for q, t in self._texts.items() if q in present}
            new = sorted({r.queryid for r in chosen if r.queryid is not None} - self._texts.keys())
            if new:
                found = await conn.execute(text(statement_texts_sql(schema)), {"ids": new})
                for qid, query in found:
                    self._texts[qid] = query_text_label(query, self.text_length)
                for qid in new:
                    self._texts.setdefault(qid, None)
            texts = self._texts

        dealloc = stats_reset = None
        if version >= (1, 9):
            info = (await conn.execute(text(statements_info_sql(schema)))).mappings().first()
            if info is not None:
                dealloc, stats_reset = info["dealloc"], info["stats_reset"]
        families = statement_families(
            self.target, chosen, texts=texts, io_timing=bool(ext["io_timing"]),
            dealloc=dealloc, stats_reset=stats_reset,
        )
        return CollectResult(families, dropped=len(rows) - len(chosen))
