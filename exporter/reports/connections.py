"""`report connections`: client connections by database, user, application and state, against
the connection limit, and the oldest open transaction and running query, with the activity
collector's SQL (`activity_sql`, `AGES_SQL`, `SETTINGS_SQL`). The exporter's own sessions are
left out, as in the metrics."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text

from ..postgres.activity import AGES_SQL, LABEL_COLUMNS, SETTINGS_SQL, activity_sql
from ..postgres.engine import APPLICATION_NAME, PostgresTarget
from .render import Column, format_age, format_count, render_table

__all__ = ["ConnectionCount", "ConnectionsReport", "OldestActivity", "connections", "connections_text"]


@dataclass(frozen=True)
class ConnectionCount:
    datname: str
    user: str
    application_name: str
    state: str
    wait_event_type: str
    count: int


@dataclass(frozen=True)
class OldestActivity:
    datname: str
    state: str
    oldest_transaction_seconds: float | None
    oldest_query_seconds: float | None  # running (or, idle in transaction, the last) query


@dataclass(frozen=True)
class ConnectionsReport:
    total: int
    max_connections: int | None  # max_connections minus the reserved slots
    connections: list[ConnectionCount]
    oldest: list[OldestActivity]


async def connections(
    target: PostgresTarget, *, database: str | None, limit: int, statement_timeout: float
) -> ConnectionsReport:
    params = {"app": APPLICATION_NAME}
    async with target.session(statement_timeout=statement_timeout) as conn:
        counts = (await conn.execute(text(activity_sql(LABEL_COLUMNS)), params)).mappings().all()
        ages = (await conn.execute(text(AGES_SQL), params)).mappings().all()
        settings = {r.name: r.value for r in await conn.execute(text(SETTINGS_SQL))}
    rows = [
        ConnectionCount(c["datname"], c["usename"], c["application_name"], c["state"],
                        c["wait_event_type"], int(c["n"]))
        for c in counts if database is None or c["datname"] == database
    ]
    rows.sort(key=lambda r: (-r.count, r.datname, r.user, r.application_name, r.state, r.wait_event_type))
    oldest = [
        OldestActivity(a["datname"], a["state"],
                       None if a["oldest_xact"] is None else max(0.0, float(a["oldest_xact"])),
                       None if a["oldest_query"] is None else max(0.0, float(a["oldest_query"])))
        for a in ages if database is None or a["datname"] == database
    ]
    oldest = [o for o in oldest if o.oldest_transaction_seconds is not None or o.oldest_query_seconds is not None]
    oldest.sort(key=lambda o: (-(o.oldest_transaction_seconds or 0), o.datname, o.state))
    max_conns = None
    if "max_connections" in settings:
        max_conns = settings["max_connections"] - settings.get("superuser_reserved_connections", 0) \
            - settings.get("reserved_connections", 0)
    total = sum(r.count for r in rows)
    return ConnectionsReport(total, max_conns, rows[:limit] if limit > 0 else rows, oldest)


def connections_text(report: ConnectionsReport, width: int | None = None) -> str:
    if report.max_connections:
        pct = 100 * report.total / report.max_connections
        head = (f"{report.total} client connections of {report.max_connections} available "
                f"({pct:.0f}%; the exporter's own excluded)\n")
    else:
        head = f"{report.total} client connections (the exporter's own excluded)\n"
    out = [head]
    if report.connections:
        out.append("\n" + render_table(report.connections, [
            Column("COUNT", lambda r: format_count(r.count), ">"),
            Column("STATE", lambda r: r.state or "-"),
            Column("WAITING ON", lambda r: r.wait_event_type or "-"),
            Column("DATABASE", lambda r: r.datname or "-", flex=True, min_width=8),
            Column("USER", lambda r: r.user or "-", flex=True, min_width=8),
            Column("APPLICATION", lambda r: r.application_name or "-", flex=True, min_width=12),
        ], width))
    if report.oldest:
        out.append("\n" + render_table(report.oldest, [
            Column("OLDEST TRANSACTION", lambda r: format_age(r.oldest_transaction_seconds), ">"),
            Column("OLDEST QUERY", lambda r: format_age(r.oldest_query_seconds), ">"),
            Column("STATE", lambda r: r.state or "-"),
            Column("DATABASE", lambda r: r.datname or "-", flex=True, min_width=8),
        ], width))
    return "".join(out)
