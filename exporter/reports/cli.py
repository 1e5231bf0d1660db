"""The operator commands: `report ...`, `explain` and `analyze-tables`, added to the main parser
by `add_commands` (exporter/cli.py). Exit codes: 0 ok, 1 the server failed us, 2 bad input
(unknown target, database or table, a refused statement, bad flags or configuration)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import Config, IndexesSettings, parse_duration, parse_size
from ..errors import CollectError, ConfigError
from ..postgres.engine import PostgresTarget
from .analyze import analyze_tables, analyzed_text
from .connections import connections, connections_text
from .explain import explain, explain_text
from .indexes import (
    UnusedRule,
    redundant_indexes_report,
    redundant_table,
    unused_indexes,
    unused_table,
)
from .missing_indexes import missing_indexes, missing_indexes_text
from .render import format_age, format_bytes, to_json
from .slow_queries import slow_queries, slow_queries_table
from .statement import StatementError, parse_params, read_statement
from .tables import table_sizes, table_sizes_table
from .targets import ReportInputError, choose_target, is_privilege_error, privilege_hint

__all__ = ["add_commands"]

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]
# (target, config, args) -> text to print
Body = Callable[[PostgresTarget, Config, argparse.Namespace], Awaitable[str]]

REPORTS = ("slow-queries", "unused-indexes", "redundant-indexes", "table-sizes", "connections",
           "missing-indexes")


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except Exception as e:  # PydanticCustomError carries the message
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except Exception as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _limit(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a count (0 or more; 0 = no limit)")
    return n


def _target_flags(p: argparse.ArgumentParser, *, database_help: str) -> None:
    p.add_argument("--target", metavar="NAME", help="configured PostgreSQL target (default: the first)")
    p.add_argument("--database", metavar="DB", help=database_help)
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="a table fitted to the terminal (default), or JSON for scripts")


def _rule_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-stats-age", type=_duration, metavar="DURATION",
                   help="statistics age before an index can count as unused "
                        "(default: collectors.indexes.unused_min_stats_age, 7d)")
    p.add_argument("--min-size", type=_size, metavar="SIZE",
                   help="smallest index to report as unused (default: collectors.indexes.unused_min_size, 1MB)")


def _rule(config: Config, args: argparse.Namespace) -> UnusedRule:
    s: IndexesSettings = config.collectors.indexes
    return UnusedRule(
        s.unused_min_stats_age if args.min_stats_age is None else args.min_stats_age,
        s.unused_min_size if args.min_size is None else args.min_size,
    )


def _timeout(args: argparse.Namespace, default: float) -> float:
    return default if args.timeout is None else float(args.timeout)


def _run(args: argparse.Namespace, body: Body) -> int:
    from exporter.cli import config_loader  # here: exporter.cli imports this module

    try:
        config = config_loader(args)()
        target_cfg = choose_target(config, args.target)
    except ConfigError as e:
        print(f"pgcache-exporter: configuration error:\n{e}", file=sys.stderr)
        return EXIT_INPUT
    except ReportInputError as e:
        print(f"pgcache-exporter: {e}", file=sys.stderr)
        return EXIT_INPUT

    async def main() -> str:
        target = PostgresTarget(target_cfg, log_privileges=False)
        try:
            return await body(target, config, args)
        finally:
            warning = target.privileges.warning(target.name) if target.privileges else None
            if warning is not None:  # the figures below are incomplete: say so, on stderr
                print(f"pgcache-exporter: warning: {warning}", file=sys.stderr)
            await target.dispose()

    try:
        out = asyncio.run(main())
    except (ReportInputError, StatementError, CollectError) as e:
        # A privilege the role lacks is the server's answer, not a usage error: exit 1, with
        # what to grant.
        if is_privilege_error(e):
            print(f"pgcache-exporter: {e}\n{privilege_hint(args, target_cfg)}", file=sys.stderr)
            return EXIT_FAILED
        print(f"pgcache-exporter: {e}", file=sys.stderr)
        return EXIT_FAILED if isinstance(e, CollectError) else EXIT_INPUT
    sys.stdout.write(out)
    sys.stdout.flush()
    return EXIT_OK


# -- report ----------------------------------------------------------------------------------------

async def _slow_queries(target: PostgresTarget, config: Config, args: argparse.Namespace) -> str:
    rows = await slow_queries(target, database=args.database, limit=args.limit,
                              statement_timeout=_timeout(args, config.collectors.statements.timeout),
                              include_own=config.collectors.statements.include_own_statements)
    return to_json(rows) if args.format == "json" else slow_queries_table(rows)


async def _unused(target: PostgresTarget, config: Config, args: argparse.Namespace) -> str:
    rule = _rule(config, args)
    rows, ages = await unused_indexes(target, database=args.database, rule=rule, limit=args.limit,
                                      statement_timeout=_timeout(args, config.collectors.indexes.timeout))
    young = [db for db, age in ages.items() if age is None or age < rule.min_stats_age]
    for db in young:
        # Said on stderr so JSON output stays clean: "none" may only mean "too early to tell".
        print(f"pgcache-exporter: database {db}: statistics are {format_age(ages[db])} old, under "
              f"--min-stats-age {format_age(rule.min_stats_age)}: no index there can count as unused yet",
              file=sys.stderr)
    if args.format == "json":
        return to_json(rows)
    if not rows:
        return (f"no unused-index candidates (no scans, statistics at least "
                f"{format_age(rule.min_stats_age)} old, at least {format_bytes(rule.min_size)}, "
                "backing no constraint, valid)\n")
    return unused_table(rows)


async def _redundant(target: PostgresTarget, config: Config, args: argparse.Namespace) -> str:
    rows = await redundant_indexes_report(target, database=args.database, limit=args.limit,
                                          statement_timeout=_timeout(args, config.collectors.indexes.timeout))
    return to_json(rows) if args.format == "json" else redundant_table(rows)


async def _table_sizes(target: PostgresTarget, config: Config, args: argparse.Namespace) -> str:
    rows = await table_sizes(target, database=args.database, limit=args.limit,
                             statement_timeout=_timeout(args, config.collectors.tables.timeout))
    return to_json(rows) if args.format == "json" else table_sizes_table(rows)


async def _connections(target: PostgresTarget, config: Config, args: argparse.Namespace) -> str:
    report = await connections(target, database=args.database, limit=args.limit,
                               statement_timeout=_timeout(args, config.collectors.activity.timeout))
    return to_json(report) if args.format == "json" else connections_text(report)


async def _missing(target: PostgresTarget, config: Config, args: argparse.Namespace) -> str:
    settings = config.collectors.advisor.model_copy(update={
        "timeout": _timeout(args, config.collectors.advisor.timeout),
        **({"limit": args.limit} if args.limit else {}),
    })
    report = await missing_indexes(target, settings, database=args.database)
    return to_json(report) if args.format == "json" else missing_indexes_text(report)


_REPORT_BODIES: dict[str, Body] = {
    "missing-indexes": _missing,
    "slow-queries": _slow_queries,
    "unused-indexes": _unused,
    "redundant-indexes": _redundant,
    "table-sizes": _table_sizes,
    "connections": _connections,
}


def cmd_report(args: argparse.Namespace) -> int:
    return _run(args, _REPORT_BODIES[args.report])


# -- explain ---------------------------------------------------------------------------------------

async def _explain(target: PostgresTarget, config: Config, args: argparse.Namespace) -> str:
    statement = read_statement(args.sql)
    literals = parse_params(args.params, statement)
    raw: list[Any] | dict[str, Any] | None = None
    if args.params is not None:
        import json

        raw = json.loads(args.params)
    report = await explain(
        target, statement, params=literals, raw_params=raw, analyze=args.analyze,
        allow_writes=args.allow_writes, database=args.database, statement_timeout=args.timeout,
        seq_scan_rows=args.seq_scan_rows,
    )
    return to_json(report) if args.format == "json" else explain_text(report)


def cmd_explain(args: argparse.Namespace) -> int:
    return _run(args, _explain)


# -- analyze-tables --------------------------------------------------------------------------------

async def _analyze(target: PostgresTarget, config: Config, args: argparse.Namespace) -> str:
    report = await analyze_tables(target, args.tables, database=args.database,
                                  rule=_rule(config, args), statement_timeout=args.timeout)
    return to_json(report) if args.format == "json" else analyzed_text(report)


def cmd_analyze_tables(args: argparse.Namespace) -> int:
    return _run(args, _analyze)


def add_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: Callable[[argparse.ArgumentParser], None],
) -> dict[str, Handler]:
    """Add `report`, `explain` and `analyze-tables` to the main parser; their handlers by name."""
    report = sub.add_parser(
        "report", help="slow queries, unused or redundant indexes, table sizes, connections",
        description="Read-only reports on a PostgreSQL target.",
    )
    common(report)
    kinds = report.add_subparsers(dest="report", metavar="REPORT", required=True)
    helps = {
        "slow-queries": "statements by total execution time (pg_stat_statements)",
        "unused-indexes": "indexes never scanned, with the reason and a DROP statement to review",
        "redundant-indexes": "indexes another index on the same table covers",
        "table-sizes": "tables by total size (table, indexes, TOAST)",
        "connections": "client connections by database, user, application and state",
        "missing-indexes": "indexes the top statements need, proven with hypothetical indexes "
                           "(HypoPG); prints CREATE INDEX CONCURRENTLY to review, creates nothing",
    }
    default_limits = {"slow-queries": 20, "unused-indexes": 0, "redundant-indexes": 0,
                      "table-sizes": 20, "connections": 0, "missing-indexes": 0}
    for name in REPORTS:
        p = kinds.add_parser(name, help=helps[name], description=helps[name])
        common(p)
        per_db = "every watched database" if name in (
            "unused-indexes", "redundant-indexes", "table-sizes", "missing-indexes") \
            else "all databases"
        _target_flags(p, database_help=f"only this database (default: {per_db})")
        p.add_argument("--limit", type=_limit, default=default_limits[name], metavar="N",
                       help=f"at most N rows, 0 for all (default: {default_limits[name] or 'all'})")
        p.add_argument("--timeout", type=_duration, metavar="DURATION",
                       help="statement timeout (default: the matching collector's timeout)")
        if name == "unused-indexes":
            _rule_flags(p)

    e = sub.add_parser(
        "explain", help="EXPLAIN a statement safely (never changes data)",
        description="EXPLAIN (FORMAT JSON) a statement, or with --analyze run it under EXPLAIN "
                    "(ANALYZE, BUFFERS) in a read-only transaction that is rolled back.",
    )
    common(e)
    e.add_argument("sql", metavar="SQL", help="one statement; $1, $2... for parameters")
    e.add_argument("--analyze", action="store_true", help="execute it (read-only, rolled back)")
    e.add_argument("--params", metavar="JSON",
                   help="a JSON array of values for $1..$n, e.g. '[42, \"2024-01-31\"]'")
    e.add_argument("--allow-writes", action="store_true",
                   help="with --analyze, run a writing statement READ WRITE (still rolled back)")
    e.add_argument("--timeout", type=_duration, default=30.0, metavar="DURATION",
                   help="statement timeout (default 30s)")
    e.add_argument("--seq-scan-rows", type=_limit, default=10_000, metavar="N",
                   help="flag sequential scans of tables with at least N rows (default 10000)")
    _target_flags(e, database_help="database to run in (default: the DSN's)")

    a = sub.add_parser(
        "analyze-tables", help="ANALYZE tables, then show their unused indexes",
        description="ANALYZE the given tables (names checked against the catalog), then judge "
                    "their indexes by the unused-index rule. Drops nothing.",
    )
    common(a)
    a.add_argument("tables", nargs="+", metavar="TABLE",
                   help='table or schema.table; "MixedCase" in double quotes')
    a.add_argument("--timeout", type=_duration, default=300.0, metavar="DURATION",
                   help="statement timeout for the whole run (default 5m)")
    _target_flags(a, database_help="database of the tables (default: the DSN's)")
    _rule_flags(a)
    return {"report": cmd_report, "explain": cmd_explain, "analyze-tables": cmd_analyze_tables}
