"""`statements`: per-statement counters from pg_stat_statements, cluster-wide, top `limit` only.

The extension must be installed (CREATE EXTENSION) in the database the target's DSN names and
preloaded; its view then shows the statements of every database. The columns are chosen by the
installed extension version (which is what defines them: `ALTER EXTENSION ... UPDATE` is a separate
step from upgrading the server), not by trial and error.

Statistics are read with `pg_stat_statements(false)` (no query text: the text file can be large),
and texts are fetched only for exported statements whose queryid has not been seen before.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..config import StatementsSettings
from ..definitions import definition
from ..errors import QueryError
from ..families import Family, FamilySpec
from .engine import SQL_MARK, PostgresTarget, is_own_statement
from .queries import DefinitionCollector, driver, render_rows, run_query, sql_for

__all__ = [
    "StatementRow",
    "StatementsCollector",
    "query_text_label",
    "select_statements",
    "statement_families",
    "statements_sql",
]

_DEF = definition("statements")
_STATS, _TEXTS, _INFO = _DEF.query("statements"), _DEF.query("texts"), _DEF.query("info")
_INFO_SPEC: FamilySpec = _DEF.declared("pgcache_statement_info")
_UNCONVERTIBLE_SPEC: FamilySpec = _DEF.declared("pgcache_statement_texts_unconvertible")
_IO_FAMILIES = frozenset({"pgcache_statement_block_read_seconds", "pgcache_statement_block_write_seconds"})

# The borderline: statements whose total time is within BORDER (relative) of the limit-th one's.
# Only there does being exported already count; above it, the true top is always exported.
BORDER = 0.10

# Shown instead of a text that pg_stat_statements cannot convert to the database's encoding.
UNCONVERTIBLE_TEXT = "<text not convertible to the database encoding>"
_CONVERSION_SQLSTATES = ("22021", "22P05")

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
    """The counters query of definitions/statements.yaml for this extension version and schema
    (the reports run it through SQLAlchemy too)."""
    sql = sql_for(_STATS, 0, {"pg_stat_statements": (".".join(map(str, extversion)), schema)})
    assert sql is not None
    return sql


def statement_texts_sql(schema: str) -> str:
    """The texts query, with SQLAlchemy's `:ids` for the reports."""
    sql = sql_for(_TEXTS, 0, {"pg_stat_statements": ("1.0", schema)})
    assert sql is not None
    return sql.replace("$1::bigint[]", ":ids")


def statements_info_sql(schema: str) -> str:
    sql = sql_for(_INFO, 0, {"pg_stat_statements": ("1.9", schema)})
    assert sql is not None
    return sql


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
        """From a row of the counters query (whose role column is called `user`)."""
        ids = ("dbid", "userid", "queryid", "datname")
        values: dict[str, Any] = {
            f: row[f] if f in ids else float(row[f] or 0)
            for f in cls.__dataclass_fields__ if f != "username"
        }
        return cls(username=row["user"], **values)

    @classmethod
    def from_record(cls, row: Sequence[Any]) -> StatementRow:
        """From a row of the counters query in its column order (the dataclass's): the fast path
        for thousands of statements per run."""
        return cls(row[0], row[1], row[2], row[3], row[4],
                   *(0.0 if v is None else v for v in row[5:14]))


def _rank_key(row: StatementRow) -> tuple[float, int, int, bool, int]:
    # Highest total exec time first; ties broken by identity so the order is deterministic.
    return (-row.exec_ms, row.dbid, row.userid, row.queryid is None, row.queryid or 0)


def select_statements(
    rows: Sequence[StatementRow], previous: Collection[Key], limit: int
) -> list[StatementRow]:
    """The top `limit` rows by total exec time. Hysteresis decides only the borderline, so the set
    does not flap there: every row whose time is more than BORDER above the limit-th row's is
    exported; the remaining places go to rows within BORDER of it, those exported last time first.
    A row in the true top `limit` is thus always exported unless it is on that borderline."""
    ranked = sorted(rows, key=_rank_key)
    if len(ranked) <= limit:
        return ranked
    cutoff = ranked[limit - 1].exec_ms
    high, low = cutoff * (1 + BORDER), cutoff * (1 - BORDER)
    chosen = [r for r in ranked[:limit] if r.exec_ms > high]
    border = [r for r in ranked if low <= r.exec_ms <= high]
    places = limit - len(chosen)
    keep = [r for r in border if r.key in previous][:places]
    keys = {r.key for r in keep}
    rest = [r for r in border if r.key not in keys][: places - len(keep)]
    return sorted(chosen + keep + rest, key=_rank_key)


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


# StatementRow's fields as the counters query's columns (rendered by the generic path).
_ROW_COLUMNS = [("user" if f.name == "username" else f.name) for f in fields(StatementRow)]
_values = attrgetter(*(f.name for f in fields(StatementRow)))  # astuple deep-copies: too slow


def statement_families(
    target: str,
    rows: Iterable[StatementRow],
    *,
    texts: Mapping[int, str | None] | None = None,
    io_timing: bool = False,
    dealloc: float | None = None,
    stats_reset: float | None = None,
    unconvertible: int | None = None,
) -> list[Family]:
    """Rows -> families. `texts` maps queryid to its (already cut) label text; None: no info."""
    rows = list(rows)
    skip = frozenset() if io_timing else _IO_FAMILIES
    out = render_rows(_DEF, _STATS, _ROW_COLUMNS, [_values(r) for r in rows], [target],
                      server_version_num=0, skip=skip)
    families: list[Family] = list(out.families)
    if texts is not None:
        info = Family.of(_INFO_SPEC)
        for r in rows:
            label = texts.get(r.queryid) if r.queryid is not None else None
            if label is not None:
                info.add_labels(_INFO_SPEC.labels,
                                [target, r.datname, r.username, str(r.queryid), label], 1)
        families.append(info)
    if unconvertible is not None:
        bad = Family.of(_UNCONVERTIBLE_SPEC)
        bad.add_labels(_UNCONVERTIBLE_SPEC.labels, [target], unconvertible)
        families.append(bad)
    if dealloc is not None or stats_reset is not None:
        extra = render_rows(_DEF, _INFO, ["dealloc", "stats_reset"], [(dealloc, stats_reset)],
                            [target], server_version_num=0)
        families += extra.families
    return families


class StatementsCollector(DefinitionCollector):
    def __init__(self, target: PostgresTarget, settings: StatementsSettings) -> None:
        super().__init__(target, settings, _DEF)
        self.top = settings.limit
        self.text_length = settings.query_text_length
        self.include_own = settings.include_own_statements
        self._exported: set[Key] = set()
        self._unconvertible = 0
        # queryid -> whether it is the exporter's own statement (for ids run by its role).
        self._own: dict[int, bool] = {}
        # queryid -> label text (None: no usable text); only ids still in the view are kept.
        self._texts: dict[int, str | None] = {}

    def _missing(self, why: str) -> QueryError:
        db = self.pg.default_database
        return QueryError(
            f"target {self.target}, database {db}: pg_stat_statements {why}: "
            + HOW_TO_ENABLE.format(db=db)
        )

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        cols, found = await run_query(conn, EXTENSION_SQL)
        if not found:
            raise self._missing("is not installed in this database (the one the DSN names)")
        ext = found[0]
        version = parse_extversion(ext["extversion"])
        exts = {"pg_stat_statements": (ext["extversion"], ext["schema"])}
        try:
            got = await self.rows(conn, _STATS, exts)
        except asyncpg.PostgresError as e:
            if e.sqlstate == "55000":
                raise self._missing("is not loaded") from None
            raise  # the session names target and database
        assert got is not None
        fast = list(got[0]) == _ROW_COLUMNS  # the definition's column order, as expected
        rows = [StatementRow.from_record(m) if fast else StatementRow.from_mapping(m) for m in got[1]]
        if not self.include_own:
            rows = await self._without_own(conn, exts, rows)

        chosen = select_statements(rows, self._exported, self.top)
        self._exported = {r.key for r in chosen}

        texts: dict[int, str | None] | None = None
        if self.text_length > 0:
            present = {r.queryid for r in rows if r.queryid is not None}
            self._texts = {q: t for q, t in self._texts.items() if q in present}
            new = sorted({r.queryid for r in chosen if r.queryid is not None} - self._texts.keys())
            if new:
                await self._fetch_texts(conn, exts, new)
            texts = self._texts

        dealloc = stats_reset = None
        if version >= (1, 9):
            info = await self.rows(conn, _INFO, exts)
            if info is not None and info[1]:
                dealloc, stats_reset = info[1][0]["dealloc"], info[1][0]["stats_reset"]
        families = statement_families(
            self.target, chosen, texts=texts, io_timing=bool(ext["io_timing"]),
            dealloc=dealloc, stats_reset=stats_reset,
            unconvertible=self._unconvertible,
        )
        skip = 0 if ext["io_timing"] else len(_IO_FAMILIES)
        per_row = len(_STATS.metrics) - skip
        return CollectResult(families, dropped=(len(rows) - len(chosen)) * per_row)

    async def _without_own(self, conn: AsyncConnection, exts: Mapping[str, tuple[str, str]],
                           rows: list[StatementRow]) -> list[StatementRow]:
        """The rows without the exporter's own statements (they would lead the list and fill
        it): those of its role whose text starts with SQL_MARK (or is one its drivers send). Each queryid of the role is
        classified once, by its text (an application sharing the role keeps its statements)."""
        privileges = self.pg.privileges
        if privileges is None:
            return rows
        oid = privileges.role_oid
        candidates = {r.queryid for r in rows if r.userid == oid and r.queryid is not None}
        self._own = {q: v for q, v in self._own.items() if q in candidates}
        unknown = sorted(candidates - self._own.keys())
        if unknown:
            texts = await self._read_texts(conn, exts, unknown)
            for q in unknown:
                self._own[q] = is_own_statement((texts or {}).get(q))
        return [r for r in rows
                if not (r.userid == oid and r.queryid is not None and self._own.get(r.queryid))]

    async def _read_texts(self, conn: AsyncConnection, exts: Mapping[str, tuple[str, str]],
                          ids: list[int]) -> dict[int, str | None] | None:
        """queryid -> text for `ids`. pg_stat_statements converts every text to the database's
        encoding as it reads them, all or nothing: one it cannot convert (a 0xE9 byte run in a
        SQL_ASCII database) fails the read, and then this is None (a savepoint keeps the
        transaction usable)."""
        apg = await driver(conn)
        savepoint = apg.is_in_transaction()
        if savepoint:
            await apg.execute(SQL_MARK + "SAVEPOINT pgcache_texts")
        try:
            got = await self.rows(conn, _TEXTS, exts, ids)
        except asyncpg.PostgresError as e:
            if e.sqlstate not in _CONVERSION_SQLSTATES:
                raise
            if savepoint:
                await apg.execute(SQL_MARK + "ROLLBACK TO SAVEPOINT pgcache_texts")
            return None
        if savepoint:
            await apg.execute(SQL_MARK + "RELEASE SAVEPOINT pgcache_texts")
        assert got is not None
        return {qid: query for qid, query in got[1]}

    async def _fetch_texts(self, conn: AsyncConnection, exts: Mapping[str, tuple[str, str]],
                           new: list[int]) -> None:
        """Texts of the newly exported statements; when they cannot be read (see _read_texts),
        these statements get a placeholder, counted, and the run goes on."""
        texts = await self._read_texts(conn, exts, new)
        if texts is None:
            for qid in new:
                self._texts[qid] = UNCONVERTIBLE_TEXT
            self._unconvertible += len(new)
            return
        for qid in new:
            self._texts[qid] = query_text_label(texts.get(qid), self.text_length)
