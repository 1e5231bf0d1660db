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
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..errors import CollectError, QueryError
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


def advice_families(
    target: str, results: Sequence[DatabaseAdvice], limit: int
) -> tuple[list[Metric], int]:
    """Advice of every database -> (families, advices and findings cut by `limit`)."""
    labels = ["target", "datname", "schema", "table", "index"]
    saving = GaugeMetricFamily(
        "pgcache_index_advice_saving_ratio",
        "Estimated share of the planner's cost an index on these columns (the index label) would cut "
        "from the statements it helps (proven with a hypothetical index; 0.5 = half).",
        labels=labels,
    )
    share = GaugeMetricFamily(
        "pgcache_index_advice_statement_time_ratio",
        "Share of the database's statement execution time spent in the statements the advised "
        "index would help.",
        labels=labels,
    )
    seq = GaugeMetricFamily(
        "pgcache_index_advice_seq_scan_statement_time_ratio",
        "Without HypoPG: share of the database's statement time in top statements whose plan reads "
        "this large table sequentially (evidence an index may be missing, not proof).",
        labels=["target", "datname", "schema", "table"],
    )
    hypopg = GaugeMetricFamily(
        "pgcache_index_advice_hypopg_available",
        "1 if HypoPG is installed in the database (advice is proven), 0 if only evidence is given.",
        labels=["target", "datname"],
    )
    planned = GaugeMetricFamily(
        "pgcache_index_advice_statements_planned",
        "Top statements the advisor planned in its last run.", labels=["target", "datname"],
    )
    refused = GaugeMetricFamily(
        "pgcache_index_advice_statements_unplannable",
        "Top statements the planner refused (no SELECT privilege on a table, a parameter type it "
        "cannot infer, ...): they get no advice.", labels=["target", "datname"],
    )
    advice = sorted(
        ((r.datname, a) for r in results for a in r.advice),
        key=lambda da: (-(da[1].saving * da[1].time_share), da[0], da[1].schema, da[1].table, da[1].label),
    )
    evidence = sorted(
        ((r.datname, e) for r in results for e in r.evidence),
        key=lambda de: (-de[1].time_share, de[0], de[1].schema, de[1].table),
    )
    for datname, a in advice[:limit]:
        lv = [target, datname, a.schema, a.table, a.label]
        saving.add_metric(lv, round(a.saving, 4))
        share.add_metric(lv, round(a.time_share, 4))
    for datname, e in evidence[:limit]:
        seq.add_metric([target, datname, e.schema, e.table], round(e.time_share, 4))
    for r in results:
        hypopg.add_metric([target, r.datname], 1 if r.hypopg else 0)
        planned.add_metric([target, r.datname], r.planned)
        refused.add_metric([target, r.datname], len(r.unplannable))
    dropped = max(0, len(advice) - limit) + max(0, len(evidence) - limit)
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
