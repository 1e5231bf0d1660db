"""The shape every PostgreSQL collector shares: a session under the collector's timeout, once
for the whole cluster or once per watched database, with per-database failures kept apart."""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from typing import ClassVar

from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import Collector, CollectResult
from ..config import CollectorSettings
from ..errors import CollectError, ConnectError
from .engine import ConnectionLost, PostgresTarget

__all__ = ["PostgresCollector"]

log = logging.getLogger(__name__)

# Databases visited at once by a per-database collector (the target's connection budget bounds
# every collector's connections together).
DATABASE_CONCURRENCY = 2
STATEMENT_TIMEOUT_SHARE = 0.8


class PostgresCollector(Collector):
    """Subclasses set `name`, optionally `per_database = True`, and implement `collect_one`."""

    per_database: ClassVar[bool] = False

    def __init__(self, target: PostgresTarget, settings: CollectorSettings) -> None:
        super().__init__(target.name)
        self.pg = target
        self.settings = settings

    def visit(self, databases: list[str]) -> list[str]:
        """Which of the watched databases this collector visits (all, unless it narrows them)."""
        return databases

    @abstractmethod
    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        """Query one database (datname None: the cluster-wide view) and build its families."""

    async def _attempt(self, db: str | None, statement_timeout: float) -> CollectResult:
        """One database's part of the run; a connection lost mid-run (a terminated backend, a
        failover) is retried once on a new connection before the part fails."""
        try:
            async with self.pg.session(db, statement_timeout=statement_timeout) as conn:
                return await self.collect_one(conn, db)
        except ConnectionLost as e:
            log.debug("target %s: collector %s: %s; retrying once", self.target, self.name, e)
        async with self.pg.session(db, statement_timeout=statement_timeout) as conn:
            return await self.collect_one(conn, db)

    async def collect(self) -> CollectResult:
        # The server cancels a slow statement a little before the job's own timeout fires, so the
        # connection goes back to the pool cleanly instead of being cut mid-query.
        timeout = self.settings.timeout * STATEMENT_TIMEOUT_SHARE
        if not self.per_database:
            return await self._attempt(None, timeout)

        databases = await self.pg.databases(timeout)
        await self.pg.forget(set(databases))
        databases = self.visit(databases)
        sem = asyncio.Semaphore(DATABASE_CONCURRENCY)

        async def one(db: str) -> CollectResult | CollectError:
            async with sem:
                try:
                    return await self._attempt(db, timeout)
                except CollectError as e:
                    return e

        outcomes = await asyncio.gather(*(one(db) for db in databases))
        results = [o for o in outcomes if isinstance(o, CollectResult)]
        failures = [str(o) for o in outcomes if isinstance(o, CollectError)]
        if databases and not results and all(isinstance(o, ConnectError) for o in outcomes):
            raise ConnectError(failures[0])
        return CollectResult(
            # Same-named families of several databases become one group when rendered.
            families=[f for r in results for f in r.families],
            dropped=sum(r.dropped for r in results),
            partial_errors=failures + [e for r in results for e in r.partial_errors],
        )
