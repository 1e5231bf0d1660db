"""One full collection round of our exporter, timed in-process, against the raw SQL floor.

The round: every PostgreSQL collector's `collect()` (the code the daemon schedules: session set-up,
SQL, rows to families), one after another, summed, in steady state (pools warm, the statements
collector's query-text cache filled by a warm-up round).

The floor: the same data statements, run directly with one asyncpg connection, sequentially,
every row fetched, summed. It leaves out what the exporter adds around them (pool checkout and
pre-ping, the statement_timeout set-up, transaction begin/rollback, building families).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import asyncpg

from exporter.config import build_config
from exporter.daemon import build_jobs
from exporter.definitions import builtin_definitions
from exporter.postgres.queries import EXTENSIONS_SQL, sql_for
from exporter.postgres.statements import EXTENSION_SQL

__all__ = ["RoundResult", "measure_round_vs_floor", "ours_config"]

# Every built-in PostgreSQL collector, from the definitions.
COLLECTORS = tuple(d.name for d in builtin_definitions() if d.enabled)


def ours_config(dsn: str, intervals: dict[str, float] | None = None, listen: str | None = None,
                ) -> dict:
    """Our config for the benchmark: one target, the DSN's database only, every table and index
    exported (limits above the catalog), the statements collector at its default limit (200)."""
    intervals = intervals or {}
    collectors: dict[str, dict] = {"cache": {"enabled": False}}
    for d in builtin_definitions():
        iv = intervals.get(d.name, d.interval)
        collectors[d.name] = {"interval": iv, "timeout": min(d.timeout, iv)}
    collectors["tables"]["limit"] = 1_000_000
    collectors["indexes"]["limit"] = 1_000_000
    cfg: dict = {
        "log": {"level": "warning"},
        "postgres": [{"name": "bench", "dsn": dsn, "databases": {"auto_discover": False}}],
        "collectors": collectors,
    }
    if listen:
        cfg["web"] = {"listen_address": listen}
    return cfg


@dataclass
class RoundResult:
    tables: int
    round_s: float  # median over rounds of the sequential sum
    floor_s: float  # median over rounds of the sequential sum
    per_collector_s: dict[str, float] = field(default_factory=dict)
    per_statement_floor_s: dict[str, float] = field(default_factory=dict)
    rounds: int = 0

    @property
    def ratio(self) -> float:
        return self.round_s / self.floor_s if self.floor_s else float("nan")


async def _floor_statements(conn: asyncpg.Connection) -> list[tuple[str, str, tuple]]:
    """Every data statement of a round, as the definitions give it for this server (the texts
    query runs only for statements not seen before, so not in a steady round)."""
    server = int(await conn.fetchval("SHOW server_version_num"))
    exts = {r["extname"]: (r["extversion"], r["schema"]) for r in await conn.fetch(EXTENSIONS_SQL)}
    stmts: list[tuple[str, str, tuple]] = [("statements: extension", EXTENSION_SQL, ())]
    for d in builtin_definitions():
        if not d.enabled:
            continue  # off by default (the advisor): not part of a round
        for q in d.queries:
            sql = sql_for(q, server, exts)
            if sql is not None and q.name != "texts":
                args = tuple(d.settings[p].default for p in q.params)
                stmts.append((f"{d.name}: {q.name}", sql, args))
    return stmts


async def measure_round_vs_floor(
    ours_dsn: str, floor_dsn: str, tables: int, rounds: int = 5,
) -> RoundResult:
    config = build_config(ours_config(ours_dsn))
    targets, jobs = build_jobs(config)
    jobs = [j for j in jobs if j.collector.name in COLLECTORS]
    conn = await asyncpg.connect(floor_dsn, server_settings={"application_name": "pgcache-floor"})
    try:
        stmts = await _floor_statements(conn)
        # Warm-up: pools, prepared statements, the statements collector's text cache, catalogs.
        for j in jobs:
            await j.collector.collect()
        for _, sql, args in stmts:
            await conn.fetch(sql, *args)
        round_totals, floor_totals = [], []
        per_c: dict[str, list[float]] = {j.collector.name: [] for j in jobs}
        per_s: dict[str, list[float]] = {name: [] for name, _, _ in stmts}
        for _ in range(rounds):
            # Alternate: our round, then the floor, so drift on the machine hits both.
            total = 0.0
            for j in jobs:
                t0 = time.perf_counter()
                await j.collector.collect()
                dt = time.perf_counter() - t0
                per_c[j.collector.name].append(dt)
                total += dt
            round_totals.append(total)
            total = 0.0
            for name, sql, args in stmts:
                t0 = time.perf_counter()
                await conn.fetch(sql, *args)
                dt = time.perf_counter() - t0
                per_s[name].append(dt)
                total += dt
            floor_totals.append(total)
    finally:
        await conn.close()
        for j in jobs:
            await j.collector.close()
        for t in targets:
            await t.dispose()
    return RoundResult(
        tables=tables,
        round_s=statistics.median(round_totals),
        floor_s=statistics.median(floor_totals),
        per_collector_s={k: statistics.median(v) for k, v in per_c.items()},
        per_statement_floor_s={k: statistics.median(v) for k, v in per_s.items()},
        rounds=rounds,
    )


def run_round_vs_floor(ours_dsn: str, floor_dsn: str, tables: int, rounds: int = 5) -> RoundResult:
    return asyncio.run(measure_round_vs_floor(ours_dsn, floor_dsn, tables, rounds))
