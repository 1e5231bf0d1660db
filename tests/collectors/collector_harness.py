"""Helpers for the collector tests: databases of known content, waiting for statistics, and one
call that runs a collector and returns its result with the rendered exposition."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from metrics_text import promtool_check_metrics  # noqa: F401 - re-exported for the collector tests

from exporter.collector import CollectResult
from exporter.config import DatabaseSelection, PostgresTargetConfig, collector_settings
from exporter.daemon import postgres_collector
from exporter.definitions import builtin_definitions, definition
from exporter.demo.servers import PostgresCluster
from exporter.postgres.collector import PostgresCollector
from exporter.postgres.engine import PostgresTarget
from exporter.snapshot import render_text

MONITOR_USER, MONITOR_PASSWORD = "exporter_mon", "mon-secret-1"


def create_monitor_role(pg: PostgresCluster) -> str:
    """A login role with nothing but pg_monitor; its DSN."""
    if pg.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{MONITOR_USER}'") != "1":
        pg.psql(f"CREATE ROLE {MONITOR_USER} LOGIN PASSWORD '{MONITOR_PASSWORD}' IN ROLE pg_monitor")
    return pg.dsn_for(MONITOR_USER, MONITOR_PASSWORD)


def fresh_database(pg: PostgresCluster, name: str, setup: str = "") -> str:
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg.psql(f"CREATE DATABASE {name}")
    if setup:
        pg.psql(setup, db=name)
    return name


def drop_database(pg: PostgresCluster, name: str) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def wait_until(pg: PostgresCluster, sql: str, db: str = "postgres", timeout: float = 10) -> None:
    """Cumulative statistics reach the shared view when a backend flushes them (at the latest
    when it exits, which may be just after psql returns): poll until `sql` says 't'."""
    deadline = time.monotonic() + timeout
    while pg.psql(sql, db=db) != "t":
        assert time.monotonic() < deadline, f"timed out waiting for: {sql}"
        time.sleep(0.05)


@asynccontextmanager
async def target_for(
    dsn: str, *, include: tuple[str, ...] = (), name: str = "main", auto_discover: bool = True
) -> AsyncIterator[PostgresTarget]:
    cfg = PostgresTargetConfig(
        name=name, dsn=dsn,  # type: ignore[arg-type]
        databases=DatabaseSelection(include=include, auto_discover=auto_discover),
    )
    target = PostgresTarget(cfg)
    try:
        yield target
    finally:
        await target.dispose()


def builtin(target: PostgresTarget, name: str, **settings: Any) -> PostgresCollector:
    """A built-in collector as the daemon builds it (its definition, its settings model)."""
    collector = postgres_collector(target, definition(name), collector_settings(name, **settings))
    assert isinstance(collector, PostgresCollector)
    return collector


def builtin_names() -> list[str]:
    """Every built-in PostgreSQL collector, from the definitions."""
    return [d.name for d in builtin_definitions()]


@dataclass
class Collected:
    result: CollectResult
    text: str


async def collect(collector: PostgresCollector) -> Collected:
    result = await collector.collect()
    return Collected(result, render_text(result.families).decode())


def database_name(request: pytest.FixtureRequest, prefix: str) -> str:
    return (prefix + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()))[:50]


def one(samples: list[Any]) -> Any:
    assert len(samples) == 1, samples
    return samples[0]
