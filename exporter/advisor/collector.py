"""`advisor`: on a slow interval, the indexes the workload is missing, proven with hypothetical
indexes; where HypoPG is not installed, the evidence only (large tables read by sequential scans,
with the statements that do it).

One run: the top statements of every database from pg_stat_statements (read where the extension
is installed, the target's own database), then one read-only session per watched database that
plans them (exporter/advisor/planner.py). Databases are visited one after the other: this is
background work and should stay gentle.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..definitions import definition
from ..errors import CollectError, QueryError
from ..families import Family, label_block
from ..postgres.collector import STATEMENT_TIMEOUT_SHARE, PostgresCollector
from ..postgres.engine import PostgresTarget
from .settings import AdvisorSettings

if TYPE_CHECKING:
    from .planner import DatabaseAdvice, TopStatement

__all__ = ["AdvisorCollector", "advice_families"]

log = logging.getLogger(__name__)

HYPOPG_MISSING = (
    "HypoPG is not installed in database {db}: index advice falls back to evidence only (large "
    "tables read by sequential scans). Install it (Debian: postgresql-NN-hypopg) and run "
    "CREATE EXTENSION hypopg in that database for advice proven by the planner."
)


_DEF = definition("advisor")
_SAVING, _SHARE, _SEQ, _HYPOPG, _PLANNED, _REFUSED = (_DEF.declared(f"pgcache_index_advice_{n}") for n in (
    "saving_ratio", "statement_time_ratio", "seq_scan_statement_time_ratio", "hypopg_available",
    "statements_planned", "statements_unplannable"))


def advice_families(
    target: str, results: Sequence[DatabaseAdvice], limit: int
) -> tuple[list[Family], int]:
    """Advice of every database -> (families, series cut by `limit`)."""
    saving, share, seq, hypopg, planned, refused = (
        Family.of(s) for s in (_SAVING, _SHARE, _SEQ, _HYPOPG, _PLANNED, _REFUSED))
    advice = sorted(
        ((r.datname, a) for r in results for a in r.advice),
        key=lambda da: (-(da[1].saving * da[1].time_share), da[0], da[1].schema, da[1].table, da[1].label),
    )
    evidence = sorted(
        ((r.datname, e) for r in results for e in r.evidence),
        key=lambda de: (-de[1].time_share, de[0], de[1].schema, de[1].table),
    )
    for datname, a in advice[:limit]:
        block = label_block(_SAVING.labels, [target, datname, a.schema, a.table, a.label])
        saving.add(block, round(a.saving, 4))
        share.add(block, round(a.time_share, 4))
    for datname, e in evidence[:limit]:
        seq.add_labels(_SEQ.labels, [target, datname, e.schema, e.table], round(e.time_share, 4))
    for r in results:
        block = label_block(_HYPOPG.labels, [target, r.datname])
        hypopg.add(block, 1 if r.hypopg else 0)
        planned.add(block, r.planned)
        refused.add(block, len(r.unplannable))
    # Series cut: two per advice (saving, share), one per finding.
    dropped = 2 * max(0, len(advice) - limit) + max(0, len(evidence) - limit)
    return [saving, share, seq, hypopg, planned, refused], dropped


class AdvisorCollector(PostgresCollector):
    name = "advisor"

    def __init__(self, target: PostgresTarget, settings: AdvisorSettings) -> None:
        super().__init__(target, settings)
        self.advisor = settings
        self._told_no_hypopg: set[str] = set()
        self._tops: dict[str, list[TopStatement]] = {}

    async def collect(self) -> CollectResult:
        results, failures = await self.advise()
        families, dropped = advice_families(self.target, results, self.advisor.limit)
        return CollectResult(families, dropped=dropped, partial_errors=failures)

    async def advise(self, database: str | None = None) -> tuple[list[DatabaseAdvice], list[str]]:
        """Advice for every watched database (or only `database`), and the databases that failed."""
        from .planner import top_statements  # pglast loads here, on the first run

        timeout = self.settings.timeout * STATEMENT_TIMEOUT_SHARE
        async with self.pg.session(statement_timeout=timeout) as conn:
            tops = await top_statements(conn, self.advisor.top_statements)
        if tops is None:
            raise QueryError(
                f"target {self.target}, database {self.pg.default_database}: pg_stat_statements is "
                "not installed: the advisor reads the statements that cost the most from it "
                "(CREATE EXTENSION pg_stat_statements, with it in shared_preload_libraries)"
            )
        self._tops = tops
        watched = [database] if database is not None else await self.pg.databases(timeout)
        databases = [db for db in watched if db in tops]
        results: list[DatabaseAdvice] = []
        failures: list[str] = []
        for db in databases:
            try:
                async with self.pg.session(db, statement_timeout=timeout) as conn:
                    results.append(await self._advise(conn, db))
            except CollectError as e:
                failures.append(str(e))
        if databases and not results:
            raise QueryError(failures[0])
        return results, failures

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        db = datname or self.pg.default_database
        families, dropped = advice_families(self.target, [await self._advise(conn, db)], self.advisor.limit)
        return CollectResult(families, dropped=dropped)

    async def _advise(self, conn: AsyncConnection, db: str) -> DatabaseAdvice:
        from .planner import advise_database

        try:
            result = await advise_database(
                conn, db, self._tops.get(db, []),
                min_saving=self.advisor.min_saving, min_table_rows=self.advisor.min_table_rows,
            )
        except asyncpg.PostgresError as e:  # raised by the driver connection the planner uses
            raise QueryError(f"target {self.target}, database {db}: {e}") from None
        if not result.hypopg and db not in self._told_no_hypopg:
            self._told_no_hypopg.add(db)
            log.warning("target %s: %s", self.target, HYPOPG_MISSING.format(db=db))
        elif result.hypopg:
            self._told_no_hypopg.discard(db)
        for st, why in result.unplannable:
            log.debug("target %s, database %s: advisor cannot plan queryid %s: %s",
                      self.target, db, st.queryid, why)
        return result
