"""Connections to one PostgreSQL target: a small SQLAlchemy async pool (asyncpg) per database.

Every session the exporter opens is read-only, names itself ``pgcache-exporter`` in
pg_stat_activity, and runs under the collector's ``statement_timeout`` and a short
``lock_timeout``, so a hung or blocked query cannot pile up work on the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import uuid4

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..config import PostgresTargetConfig
from ..errors import ConnectError, QueryError

__all__ = ["APPLICATION_NAME", "PostgresTarget", "describe_error"]

log = logging.getLogger(__name__)

APPLICATION_NAME = "pgcache-exporter"
LOCK_TIMEOUT_MS = 1000

# SQLSTATE classes that mean "we are not (or no longer) talking to a working server".
_CONNECTION_SQLSTATES = ("08", "28", "3D", "53300", "57P01", "57P02", "57P03")


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description of a database error."""
    orig = getattr(exc, "orig", None)
    inner = getattr(orig, "__cause__", None) or orig or exc
    msg = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    sqlstate = getattr(inner, "sqlstate", None)
    name = type(inner).__name__
    return f"{name}: {msg}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError | asyncio.TimeoutError | PoolTimeout | ConnectionError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    inner = getattr(getattr(exc, "orig", None), "__cause__", None) or getattr(exc, "orig", None) or exc
    if isinstance(inner, OSError | asyncpg.exceptions.ConnectionDoesNotExistError |
                  asyncpg.exceptions.InterfaceError):
        return True
    state = getattr(inner, "sqlstate", None) or ""
    return any(state.startswith(p) for p in _CONNECTION_SQLSTATES)


class PostgresTarget:
    """One configured PostgreSQL server, with a lazily created pool per database."""

    def __init__(self, cfg: PostgresTargetConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._dsn = cfg.resolved_dsn()
        parts = urlsplit(self._dsn)
        self.default_database = unquote(parts.path.lstrip("/")) or unquote(parts.username or "") or "postgres"
        self._engines: dict[str, AsyncEngine] = {}
        self.server_version_num: int | None = None

    # -- pools ----------------------------------------------------------------------------------
    def engine(self, datname: str | None = None) -> AsyncEngine:
        db = datname or self.default_database
        eng = self._engines.get(db)
        if eng is None:
            eng = self._engines[db] = self._create_engine(db)
        return eng

    def _create_engine(self, db: str) -> AsyncEngine:
        connect_args: dict[str, Any] = {
            "dsn": self._dsn,
            "database": db,
            "timeout": self.cfg.connect_timeout,
            "command_timeout": None,
            "server_settings": {
                "application_name": APPLICATION_NAME,
                # The exporter never writes to the database it watches.
                "default_transaction_read_only": "on",
                "lock_timeout": str(LOCK_TIMEOUT_MS),
            },
        }
        if self.cfg.pgbouncer:
            # PgBouncer (transaction pooling) hands each transaction to any server connection:
            # no statement cache, and unique names for the prepared statements asyncpg needs.
            connect_args["statement_cache_size"] = 0
            connect_args["prepared_statement_cache_size"] = 0
            connect_args["prepared_statement_name_func"] = lambda: f"__pgcache_{uuid4()}__"
        return create_async_engine(
            "postgresql+asyncpg://",
            connect_args=connect_args,
            pool_size=self.cfg.max_connections,
            max_overflow=0,
            pool_timeout=self.cfg.connect_timeout,
            # A server restart kills pooled connections: test them on checkout and reconnect.
            pool_pre_ping=True,
            pool_recycle=3600,
        )

    async def forget(self, keep: set[str]) -> None:
        """Close the pools of databases that are no longer watched (dropped or excluded)."""
        for db in [d for d in self._engines if d not in keep and d != self.default_database]:
            await self._engines.pop(db).dispose()

    async def dispose(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        for eng in engines:
            await eng.dispose()

    # -- sessions -------------------------------------------------------------------------------
    @asynccontextmanager
    async def session(
        self, datname: str | None = None, *, statement_timeout: float, read_write: bool = False
    ) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction under `statement_timeout` (seconds), rolled back at the end
        unless the caller commits. `read_write` (only `explain --allow-writes`, whose caller always
        rolls back) lifts the read-only default for this one transaction."""
        db = datname or self.default_database
        where = f"target {self.name}, database {db}"
        try:
            conn = await self.engine(db).connect()
        except Exception as e:
            if _is_connection_error(e) or isinstance(e, DBAPIError | InterfaceError | OperationalError):
                self.server_version_num = None
                raise ConnectError(f"{where}: cannot connect: {describe_error(e)}") from None
            raise
        try:
            if read_write:
                # Must be the transaction's first statement (any query fixes the mode).
                await conn.execute(text("SET TRANSACTION READ WRITE"))
            await conn.execute(
                text("SELECT set_config('statement_timeout', :t, true)"),
                {"t": str(max(1, int(statement_timeout * 1000)))},
            )
            if self.server_version_num is None:
                self.server_version_num = int(
                    (await conn.execute(text("SHOW server_version_num"))).scalar_one()
                )
            yield conn
        except (DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            # The generic path reads rows with asyncpg directly: its errors arrive unwrapped.
            if _is_connection_error(e):
                self.server_version_num = None
                raise ConnectError(f"{where}: connection lost: {describe_error(e)}") from None
            raise QueryError(f"{where}: {describe_error(e)}") from None
        except OSError as e:
            self.server_version_num = None
            raise ConnectError(f"{where}: connection lost: {describe_error(e)}") from None
        finally:
            try:
                await asyncio.shield(conn.close())
            except Exception:  # a dead connection: the pool discards it
                pass

    async def databases(self, statement_timeout: float) -> list[str]:
        """The databases the per-database collectors visit now (found again on every run)."""
        sel = self.cfg.databases
        if not sel.auto_discover:
            return [self.default_database] if sel.allows(self.default_database) else []
        async with self.session(statement_timeout=statement_timeout) as conn:
            rows = await conn.execute(
                text(
                    "SELECT datname FROM pg_database "
                    "WHERE datallowconn AND NOT datistemplate ORDER BY datname"
                )
            )
            found = [r[0] for r in rows]
        return [d for d in found if sel.allows(d)]
