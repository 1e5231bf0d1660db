"""Connections to one PostgreSQL target, under one connection budget for all its databases.

Every session the exporter opens is read-only, names itself ``pgcache-exporter`` in
pg_stat_activity, and runs under the collector's ``statement_timeout`` and a short
``lock_timeout``, so a hung or blocked query cannot pile up work on the server.

The budget (``postgres[].max_connections``, 3 by default) bounds the connections the exporter
holds open to the server at once, idle ones included, across every database it visits. A
connection is opened for a run and kept idle for at most IDLE_GRACE seconds afterwards (the next
run of a collector on the same database reuses it); a connection that failed, timed out or was
cancelled mid-operation is terminated on the spot (never handed out again: a connection reused in
the middle of an operation is what asyncpg reports as "cannot switch to state 12"), so a run ends
within its timeout even on a hung server. One slot is kept for the `pgcache_up` probe: the
collectors together use at most ``max_connections - 1``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import uuid4

import asyncpg
from sqlalchemy import NullPool, event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..config import PostgresTargetConfig
from ..errors import ConnectError, QueryError

__all__ = ["APPLICATION_NAME", "SQL_MARK", "ConnectionLost", "is_own_statement", "PostgresTarget", "Privileges",
           "describe_error"]

log = logging.getLogger(__name__)

APPLICATION_NAME = "pgcache-exporter"
# Leads every statement the exporter sends: pg_stat_statements keeps it in the text, which is how
# the exporter tells its own statements from those of an application sharing its role.
SQL_MARK = "/* pgcache-exporter */ "
# What the drivers send on their own (SQLAlchemy's dialect set-up, asyncpg's type introspection,
# transaction control): the exporter's too when its role ran them.
_DRIVER_STATEMENTS = (
    "WITH RECURSIVE typeinfo_tree", "select current_schema()", "show standard_conforming_strings",
    "select pg_catalog.version()", "SELECT current_setting($1) AS cur, set_config(",
    "show transaction isolation level", "BEGIN", "ROLLBACK",
)


def is_own_statement(query: str | None) -> bool:
    """Whether a pg_stat_statements text of the exporter's role is the exporter's own."""
    if query is None:
        return False
    query = " ".join(query.split())
    return query.startswith(SQL_MARK.strip()) or query.startswith(_DRIVER_STATEMENTS)
LOCK_TIMEOUT_MS = 1000
# How long a connection stays open, idle, after its run (reused by the next run on that database).
IDLE_GRACE = 5.0
# A graceful close (Terminate message) that takes longer than this is cut short.
CLOSE_TIMEOUT = 1.0

# asyncpg's "cannot switch to state N; another operation is in progress": the protocol is not idle
# where it should be (our backend was terminated between two statements, its FATAL message
# arrived while idle). The connection is unusable: a connection lost.
_BROKEN = asyncpg.exceptions.InternalClientError

# SQLSTATE classes that mean "we are not (or no longer) talking to a working server".
_CONNECTION_SQLSTATES = ("08", "28", "3D", "53300", "57P01", "57P02", "57P03")

PRIVILEGES_SQL = """
SELECT current_setting('server_version_num')::int AS version,
       r.oid AS role_oid, r.rolname, r.rolsuper,
       pg_has_role(current_user, 'pg_monitor', 'USAGE') AS monitor
FROM pg_roles r WHERE r.rolname = current_user
"""

HIDDEN_WITHOUT_MONITOR = (
    "other roles' sessions (pgcache_connections counts only its own role's), their statements' "
    "texts and their query ids in pg_stat_statements, and the sizes of tables it cannot read"
)


class ConnectionLost(ConnectError):
    """The server went away in the middle of a run (the run may be retried once)."""


@dataclass(frozen=True)
class Privileges:
    """What the exporter's role may see on the target."""

    role: str
    role_oid: int
    superuser: bool
    monitor: bool  # has pg_monitor's privileges (a member with INHERIT)

    @property
    def sufficient(self) -> bool:
        return self.superuser or self.monitor

    def warning(self, target: str) -> str | None:
        if self.sufficient:
            return None
        return (
            f"target {target}: role {self.role} is neither superuser nor a member of pg_monitor: "
            f"the figures leave out {HIDDEN_WITHOUT_MONITOR}; grant it with "
            f"GRANT pg_monitor TO {self.role}"
        )


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description of a database error."""
    orig = getattr(exc, "orig", None)
    inner = getattr(orig, "__cause__", None) or orig or exc
    if isinstance(inner, TimeoutError):
        return "TimeoutError: no answer in time"
    if isinstance(inner, _BROKEN):
        # asyncpg's wording ("cannot switch to state N") describes its protocol, not the cause.
        return "the server ended the session in the middle of an operation"
    msg = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    sqlstate = getattr(inner, "sqlstate", None)
    name = type(inner).__name__
    return f"{name}: {msg}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError | asyncio.TimeoutError | ConnectionError | _BROKEN):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    inner = getattr(getattr(exc, "orig", None), "__cause__", None) or getattr(exc, "orig", None) or exc
    if isinstance(inner, OSError | asyncpg.exceptions.ConnectionDoesNotExistError |
                  asyncpg.exceptions.InterfaceError):
        return True
    state = getattr(inner, "sqlstate", None) or ""
    return any(state.startswith(p) for p in _CONNECTION_SQLSTATES)


@dataclass
class _Idle:
    db: str
    conn: AsyncConnection
    driver: Any  # the asyncpg connection under it (reachable even once SQLAlchemy gave up on it)
    since: float


class PostgresTarget:
    """One configured PostgreSQL server and the connections the exporter holds to it."""

    def __init__(self, cfg: PostgresTargetConfig, *, log_privileges: bool = True) -> None:
        self.cfg = cfg
        self._log_privileges = log_privileges
        self.name = cfg.name
        self._dsn = cfg.resolved_dsn()
        parts = urlsplit(self._dsn)
        self.default_database = unquote(parts.path.lstrip("/")) or unquote(parts.username or "") or "postgres"
        self._engines: dict[str, AsyncEngine] = {}
        self.server_version_num: int | None = None
        self.privileges: Privileges | None = None
        self.budget = cfg.max_connections
        # Connections open now (in use or idle); those idle, oldest first.
        self.open_connections = 0
        self._idle: list[_Idle] = []
        self._changed = asyncio.Condition()
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._warned_privileges: bool | None = None
        self._probe_in_use = 0

    # -- engines (one per database, no pool of their own: the budget below is the pool) ---------
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
        engine = create_async_engine("postgresql+asyncpg://", connect_args=connect_args,
                                     poolclass=NullPool)
        event.listen(engine.sync_engine, "before_cursor_execute", _mark, retval=True)
        return engine

    async def forget(self, keep: set[str]) -> None:
        """Forget the engines of databases that are no longer watched (dropped or excluded)."""
        gone = [d for d in self._engines if d not in keep and d != self.default_database]
        for idle in [i for i in self._idle if i.db in gone]:
            self._idle.remove(idle)
            self.open_connections -= 1
            await self._close(idle.conn, idle.driver)
        for db in gone:
            await self._engines.pop(db).dispose()

    async def dispose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        idle, self._idle = self._idle, []
        for i in idle:
            self.open_connections -= 1
            await self._close(i.conn, i.driver)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=CLOSE_TIMEOUT * 2)
        engines, self._engines = list(self._engines.values()), {}
        for eng in engines:
            await eng.dispose()

    # -- the budget -----------------------------------------------------------------------------
    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def _acquire(
        self, db: str, *, probe: bool, connect_timeout: float
    ) -> tuple[AsyncConnection, Any, bool]:
        """A connection to `db` within the budget: an idle one to that database, else a new one
        (closing an idle one to another database to make room), else wait for a slot."""
        limit = self.budget if probe else max(1, self.budget - 1)
        async with self._changed:
            while True:
                for i in reversed(self._idle):
                    if i.db == db:
                        self._idle.remove(i)
                        if i.conn.closed or i.conn.invalidated:
                            self._drop_slot_locked()
                            break
                        return i.conn, i.driver, True
                else:
                    in_use = self.open_connections - len(self._idle)
                    # The probe's own connection does not count against the collectors' share.
                    if (in_use if probe else in_use - self._probe_in_use) < limit:
                        if self.open_connections >= self.budget and self._idle:
                            oldest = self._idle.pop(0)  # make room: close an idle one
                            self.open_connections -= 1
                            self._close_soon(oldest.conn, oldest.driver)
                        if self.open_connections < self.budget:
                            self.open_connections += 1
                            break
                    await self._changed.wait()
                    continue
        try:
            async with asyncio.timeout(connect_timeout):
                conn = await self.engine(db).connect()
                raw = await conn.get_raw_connection()
                return conn, raw.driver_connection, False
        except BaseException:
            await self._release_slot()
            raise

    def _drop_slot_locked(self) -> None:
        self.open_connections -= 1
        self._changed.notify_all()

    async def _release_slot(self) -> None:
        async with self._changed:
            self._drop_slot_locked()

    async def _give_back(self, db: str, conn: AsyncConnection, driver: Any) -> None:
        async with self._changed:
            self._idle.append(_Idle(db, conn, driver, time.monotonic()))
            self._changed.notify_all()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Close connections idle for longer than IDLE_GRACE; ends when none is idle."""
        while self._idle:
            await asyncio.sleep(IDLE_GRACE / 2)
            now = time.monotonic()
            async with self._changed:
                old = [i for i in self._idle if now - i.since >= IDLE_GRACE]
                for i in old:
                    self._idle.remove(i)
                    self.open_connections -= 1
                if old:
                    self._changed.notify_all()
            for i in old:
                await self._close(i.conn, i.driver)

    def _close_soon(self, conn: AsyncConnection, driver: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._close(conn, driver))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(conn: AsyncConnection, driver: Any) -> None:
        """Close gracefully (the server logs no error), but never wait long for a hung server."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await conn.close()
        except Exception:
            await _terminate(conn, driver)

    # -- sessions -------------------------------------------------------------------------------
    @asynccontextmanager
    async def session(
        self, datname: str | None = None, *, statement_timeout: float, read_write: bool = False,
        probe: bool = False,
    ) -> AsyncIterator[AsyncConnection]:
        """A read-only session under `statement_timeout` (seconds); what runs through SQLAlchemy
        runs in a transaction, rolled back at the end unless the caller commits. `read_write` (only `explain --allow-writes`, whose caller always
        rolls back) lifts the read-only default for this one transaction. Connecting takes at most
        `statement_timeout` too (and at most the target's connect_timeout)."""
        db = datname or self.default_database
        where = f"target {self.name}, database {db}"
        connect_timeout = min(self.cfg.connect_timeout, max(statement_timeout, 0.1))
        for attempt in (1, 2):
            try:
                conn, driver, reused = await self._acquire(db, probe=probe,
                                                           connect_timeout=connect_timeout)
            except Exception as e:
                if _is_connection_error(e) or isinstance(e, DBAPIError | InterfaceError | OperationalError):
                    self.server_version_num = None
                    raise ConnectError(f"{where}: cannot connect: {describe_error(e)}") from None
                raise
            self._probe_in_use += probe
            try:
                await self._begin(conn, driver, statement_timeout, read_write)
                break
            except BaseException as e:
                self._probe_in_use -= probe
                await _terminate(conn, driver)
                await self._release_slot()
                if not isinstance(e, DBAPIError | asyncpg.PostgresError | asyncpg.InterfaceError | OSError
                                  | _BROKEN):
                    raise
                if reused and attempt == 1 and _is_connection_error(e):
                    continue  # an idle connection the server closed meanwhile: a new one
                self.server_version_num = None
                raise ConnectError(f"{where}: cannot connect: {describe_error(e)}") from None
        healthy = False
        try:
            try:
                yield conn
            except (DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                # The generic path reads rows with asyncpg directly: its errors arrive unwrapped.
                if _is_connection_error(e):
                    self.server_version_num = None
                    raise ConnectionLost(f"{where}: connection lost: {describe_error(e)}") from None
                raise QueryError(f"{where}: {describe_error(e)}") from None
            except (OSError, _BROKEN) as e:
                self.server_version_num = None
                raise ConnectionLost(f"{where}: connection lost: {describe_error(e)}") from None
            try:
                if conn.in_transaction():
                    await conn.rollback()
                healthy = True
            except Exception:  # the work is done; the connection is only not reused
                log.debug("%s: rollback failed; connection dropped", where)
        finally:
            self._probe_in_use -= probe
            if healthy:
                await self._give_back(db, conn, driver)
            else:
                # Failed, timed out or cancelled mid-operation: the connection's state is unknown.
                # Cut it now (no round trip: the run must end within its timeout) and never reuse it.
                await _terminate(conn, driver)
                await self._release_slot()

    async def _begin(self, conn: AsyncConnection, driver: Any, statement_timeout: float,
                     read_write: bool) -> None:
        """Set the session up through the driver itself: a statement SQLAlchemy runs and a
        timeout cancels makes it close the connection gracefully, waiting up to 2 s on a hung
        server (runs would overrun their timeout). The collectors read with the driver too."""
        if read_write:
            # Must be the transaction's first statement (any query fixes the mode).
            await conn.execute(text("SET TRANSACTION READ WRITE"))
        await driver.fetchval(SQL_MARK + "SELECT set_config('statement_timeout', $1, false)",
                              str(max(1, int(statement_timeout * 1000))))
        if self.server_version_num is None or self.privileges is None:
            await self._learn(driver)

    async def _learn(self, driver: Any) -> None:
        row = await driver.fetchrow(SQL_MARK + PRIVILEGES_SQL)
        if row is None:  # cannot happen: current_user is a role
            return
        self.server_version_num = int(row["version"])
        self.privileges = Privileges(str(row["rolname"]), int(row["role_oid"]),
                                     bool(row["rolsuper"]), bool(row["monitor"]))
        sufficient = self.privileges.sufficient
        if sufficient != self._warned_privileges:
            warning = self.privileges.warning(self.name)
            if warning is not None and self._log_privileges:
                log.warning("%s", warning)
            elif self._warned_privileges is False:
                log.info("target %s: role %s now has pg_monitor's privileges", self.name,
                         self.privileges.role)
            self._warned_privileges = sufficient

    async def probe(self, limit: float) -> str | None:
        """Whether the server answers now: None if it does, else why not. Bounded by `limit`
        seconds (connecting included); uses the slot kept for it, so busy collectors never
        delay it."""
        try:
            async with asyncio.timeout(limit):
                while True:
                    try:
                        async with self.session(statement_timeout=limit, probe=True) as conn:
                            await _select_1(conn)
                        break
                    except ConnectionLost:
                        # Our backend was terminated under us (pg_terminate_backend, a pooler):
                        # the server answers; try again on a new connection while time is left.
                        await asyncio.sleep(0.05)
        except TimeoutError:
            self.server_version_num = None
            return f"target {self.name}: no answer within {limit:g}s"
        except ConnectError as e:
            return str(e)
        except Exception as e:  # a query error on SELECT 1: the server answers, but not well
            return f"target {self.name}: {describe_error(e)}"
        return None

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


async def _select_1(conn: AsyncConnection) -> None:
    raw = await conn.get_raw_connection()
    await raw.driver_connection.fetchval(SQL_MARK + "SELECT 1")  # type: ignore[union-attr]


def _mark(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
          executemany: bool) -> tuple[str, Any]:
    return SQL_MARK + statement, parameters


async def _terminate(conn: AsyncConnection, driver: Any) -> None:
    """Close the socket at once (asyncpg's terminate), then let SQLAlchemy forget the connection
    (with the socket gone that takes no round trip)."""
    with suppress(Exception):
        if driver is not None and not driver.is_closed():
            driver.terminate()
    with suppress(Exception):
        await conn.invalidate()
    with suppress(Exception):
        await conn.close()
