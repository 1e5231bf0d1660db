"""Churn of the statements top-N on a steady workload: how many statements enter the exported set
per run (each entry is a new series, each exit a series that goes stale), for the selection in
exporter/postgres/statements.py against the rule it replaced (keep an exported statement while
its rank is within 1.5 x limit) and against no hysteresis at all. Also: how many runs a new
heaviest statement waits before it is exported.

    python benchmarks/statement_churn.py [--statements 1000] [--limit 200] [--runs 1000]

A steady workload: every statement runs at its own rate (log-normal across statements, as real
workloads are skewed), each run adds rate x interval x (1 + noise) to its total time, noise
normal with a 30 % standard deviation (bursty calls). Pure simulation: no server is involved,
the selection function is the collector's own.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.postgres.statements import Key, StatementRow, _rank_key, select_statements  # noqa: E402

Select = Callable[[Sequence[StatementRow], Collection[Key], int], list[StatementRow]]


def old_select(rows: Sequence[StatementRow], previous: Collection[Key], limit: int) -> list[StatementRow]:
    """The rule before issue 16: exported rows within 1.5 x limit first, then the rest by rank."""
    ranked = sorted(rows, key=_rank_key)
    chosen = [r for r in ranked[: math.ceil(limit * 1.5)] if r.key in previous][:limit]
    keys = {r.key for r in chosen}
    for r in ranked:
        if len(chosen) >= limit:
            break
        if r.key not in keys:
            chosen.append(r)
            keys.add(r.key)
    return chosen


def strict_select(rows: Sequence[StatementRow], previous: Collection[Key], limit: int) -> list[StatementRow]:
    return sorted(rows, key=_rank_key)[:limit]


def simulate(select: Select, statements: int, limit: int, runs: int, seed: int) -> tuple[float, int | None]:
    """(mean entries per run after warm-up, runs a new heaviest statement waited)."""
    rnd = random.Random(seed)
    rates = [rnd.lognormvariate(0, 1.5) for _ in range(statements)]
    totals = [0.0] * statements
    exported: set[Key] = set()
    entries = 0
    counted = 0
    warm = runs // 10
    newcomer_at = runs // 2
    waited: int | None = None
    for run in range(runs):
        if run == newcomer_at:
            rates.append(max(rates) * 3)  # a new statement, the heaviest from now on
            totals.append(0.0)
        for i, rate in enumerate(rates):
            totals[i] += max(0.0, rate * 30 * (1 + rnd.gauss(0, 0.3)))
        rows = [StatementRow(dbid=1, userid=10, queryid=i, datname="app", username="app",
                             calls=1, exec_ms=t) for i, t in enumerate(totals)]
        chosen = select(rows, exported, limit)
        keys = {r.key for r in chosen}
        if run >= warm:
            entries += len(keys - exported)
            counted += 1
        exported = keys
        if run >= newcomer_at and waited is None and (1, 10, statements) in keys:
            waited = run - newcomer_at
    return entries / max(1, counted), waited


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--statements", type=int, default=1000)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=16)
    args = p.parse_args(argv)
    print(f"{args.statements} statements, limit {args.limit}, {args.runs} runs (seed {args.seed})")
    for name, fn in (("current (true top, borderline hysteresis)", select_statements),
                     ("before issue 16 (keep within 1.5 x limit)", old_select),
                     ("no hysteresis", strict_select)):
        churn, waited = simulate(fn, args.statements, args.limit, args.runs, args.seed)
        wait = "never" if waited is None else f"{waited} run(s)"
        print(f"  {name:44s} entries/run {churn:6.3f}   new heaviest exported after {wait}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
