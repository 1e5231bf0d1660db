"""SQLAlchemy 2.0 write-through invalidation: ``cache.bind(session_factory)`` and
``cache.query(session, select(...))``.

Imported only when an application calls ``bind``, ``query`` or one of the tag helpers, so
``from exporter.cache import CachingService`` never loads SQLAlchemy.

Tags (plain strings in the cache's tag sets; ``<table>`` is ``Table.fullname``)::

    table:<table>           every entry that read the table (cache.query adds these itself)
    row:<table>:<pk>        an entry about one row (composite keys joined with ",")
    rows:<table>            every entry tagged with any row of the table (row_tags adds it)

What a committed transaction invalidates, for each object the unit of work inserted, updated or
deleted: ``table:<t>``, ``row:<t>:<pk>``, and ``row:<parent>:<fk>`` for each foreign key it holds
(old and new value), so an entry about user 10 goes stale when one of user 10's posts changes.
An update that changes only columns declared as ``counters`` (``bind(..., counters=[Post.like_count])``)
leaves ``table:<t>`` alone: list entries tolerate a like count up to their TTL old, per-row
entries do not. A bulk ``update()``/``delete()`` (or ``insert()``) run with ``session.execute``
invalidates ``table:<t>`` and ``rows:<t>`` (its rows are not known), and ``rows:<parent>`` for each
table it references. A rollback invalidates nothing; a savepoint rolled back inside a committed
transaction still invalidates (too much, never too little). SQL text (``text("UPDATE ...")``)
is not seen: call ``cache.invalidate_tags(table_tag("posts"))`` after it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import MissingGreenlet, NoInspectionAvailable
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, sessionmaker
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.util import await_only

if TYPE_CHECKING:
    from .service import CachingService

__all__ = ["bind", "query", "row_tag", "row_tags", "table_tag", "tables_read"]

log = logging.getLogger(__name__)

_PENDING = "pgcache_invalidate"  # session.info key: tags of the open transaction


def _table_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, Table):
        return target.fullname
    try:
        return str(sa_inspect(target).local_table.fullname)
    except (NoInspectionAvailable, AttributeError):
        raise TypeError(f"not a table, mapped class or table name: {target!r}") from None


def table_tag(target: Any) -> str:
    """``table:<name>`` for a Table, a mapped class or a table name."""
    return "table:" + _table_name(target)


def _pk_text(pk: Iterable[Any]) -> str:
    return ",".join(str(v) for v in pk)


def row_tag(target: Any, *pk: Any) -> str:
    return f"row:{_table_name(target)}:{_pk_text(pk)}"


def row_tags(target: Any, *pk: Any) -> list[str]:
    """The tags of an entry about one row: ``row:<t>:<pk>`` and ``rows:<t>`` (so a bulk update of
    the table reaches it). ``tags=row_tags(User, user_id)``."""
    name = _table_name(target)
    return [f"row:{name}:{_pk_text(pk)}", f"rows:{name}"]


def tables_read(stmt: Any) -> list[str]:
    """Every table a statement reads (FROM, joins, subqueries, columns)."""
    found: set[str] = set()
    for el in visitors.iterate(stmt):
        if isinstance(el, Table):
            found.add(el.fullname)
        elif isinstance(el, ColumnClause) and isinstance(getattr(el, "table", None), Table):
            found.add(el.table.fullname)  # type: ignore[union-attr]
    return sorted(found)


class _Binding:
    def __init__(self, cache: CachingService, counters: Iterable[Any]) -> None:
        self.cache = cache
        self.counters: set[tuple[str, str]] = set()
        for c in counters:
            for col in getattr(getattr(c, "property", None), "columns", None) or [c]:
                if not isinstance(getattr(col, "table", None), Table):
                    raise TypeError(f"counters: {c!r} is not a mapped column (e.g. Post.like_count)")
                self.counters.add((col.table.fullname, col.key))
        self._background: set[asyncio.Task[Any]] = set()

    # -- collecting ---------------------------------------------------------------------------
    def before_flush(self, session: Session, _ctx: Any, _instances: Any) -> None:
        # Updates are read before the flush: afterwards an attribute set to a SQL expression
        # (post.like_count = Post.like_count + 1) is expired and shows no history.
        tags: set[str] = session.info.setdefault(_PENDING, set())
        for obj in session.dirty:
            if obj not in session.deleted:
                self._object(obj, tags, updated=True)

    def after_flush(self, session: Session, _ctx: Any) -> None:
        # Inserts after the flush, when their primary keys are known.
        tags: set[str] = session.info.setdefault(_PENDING, set())
        for obj in (*session.new, *session.deleted):
            self._object(obj, tags, updated=False)

    def _object(self, obj: Any, tags: set[str], *, updated: bool) -> None:
        state = sa_inspect(obj)
        mapper = state.mapper
        pk = mapper.primary_key_from_instance(obj)
        changed: dict[str, set[str]] = {}  # table -> column keys this update changed
        if updated:
            for attr in state.attrs:
                if attr.history.has_changes():
                    for c in getattr(mapper.attrs[attr.key], "columns", ()):
                        if isinstance(getattr(c, "table", None), Table):
                            changed.setdefault(c.table.fullname, set()).add(c.key)
            if not changed:
                return  # dirty only in a relationship collection, or set to the same value
        for table in mapper.tables:
            name = table.fullname
            cols = changed.get(name)
            counters_only = bool(cols) and all((name, k) in self.counters for k in cols or ())
            if not counters_only:
                tags.add("table:" + name)
            if None not in pk:
                tags.add(f"row:{name}:{_pk_text(pk)}")
            for fk in table.foreign_keys:
                parent = fk.column.table
                if [c.key for c in parent.primary_key.columns] != [fk.column.key]:
                    continue  # only references to a one-column primary key map to row tags
                try:
                    prop = mapper.get_property_by_column(fk.parent)
                except Exception:
                    continue
                hist = state.attrs[prop.key].history
                for v in (*hist.added, *hist.unchanged, *hist.deleted):
                    if v is not None:
                        tags.add(f"row:{parent.fullname}:{v}")

    def do_orm_execute(self, state: ORMExecuteState) -> None:
        if not (state.is_update or state.is_delete or state.is_insert):
            return
        table = getattr(state.statement, "table", None)
        if not isinstance(table, Table):
            return
        tags: set[str] = state.session.info.setdefault(_PENDING, set())
        tags.add("table:" + table.fullname)
        if not state.is_insert:
            tags.add("rows:" + table.fullname)
        for fk in table.foreign_keys:
            tags.add("rows:" + fk.column.table.fullname)

    # -- applying -----------------------------------------------------------------------------
    def after_commit(self, session: Session) -> None:
        tags = session.info.pop(_PENDING, None)
        if tags:
            self._invalidate(sorted(tags))

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:  # the outermost transaction ended without a commit
            session.info.pop(_PENDING, None)

    def _invalidate(self, tags: list[str]) -> None:
        try:
            # An AsyncSession commits inside SQLAlchemy's greenlet: wait for the invalidation
            # there, so the commit returns only once the stale entries are gone.
            await_only(self.cache.invalidate_tags(*tags))
            return
        except MissingGreenlet:
            pass
        except Exception as e:  # the commit happened; never turn it into an error
            log.warning("cache invalidation after commit failed: %r", e)
            return
        # A synchronous Session.
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:
            # On the event loop's own thread we cannot block: invalidate in the background.
            task = running.create_task(self.cache.invalidate_tags(*tags))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        loop = self.cache.loop
        if loop is None or not loop.is_running():
            log.warning("cache invalidation after commit skipped: the cache's event loop is not running")
            return
        try:
            asyncio.run_coroutine_threadsafe(self.cache.invalidate_tags(*tags), loop).result(timeout=5)
        except Exception as e:
            log.warning("cache invalidation after commit failed: %r", e)


def _listen_target(factory: Any) -> Any:
    """The object to listen on: hooks apply to this factory's sessions only."""
    if isinstance(factory, async_sessionmaker):
        base = factory.kw.get("sync_session_class") or factory.class_.sync_session_class or Session
        bound = type(f"PgcacheBound{base.__name__}", (base,), {})
        factory.kw["sync_session_class"] = bound
        return bound
    if isinstance(factory, AsyncSession):
        return factory.sync_session
    if isinstance(factory, sessionmaker | Session):
        return factory  # a sessionmaker makes its own Session subclass: events stay on it
    raise TypeError(
        "cache.bind() takes an async_sessionmaker, a sessionmaker or a session, "
        f"not {type(factory).__name__}"
    )


def bind(cache: CachingService, session_factory: Any, *, counters: Iterable[Any] = ()) -> None:
    binding = _Binding(cache, counters)
    bound: dict[int, _Binding] = cache.__dict__.setdefault("_orm_bindings", {})
    if id(session_factory) in bound:  # binding twice would invalidate twice
        if bound[id(session_factory)].counters != binding.counters:
            raise ValueError("cache.bind(): this session factory is already bound with other counters")
        return
    bound[id(session_factory)] = binding
    target = _listen_target(session_factory)
    event.listen(target, "before_flush", binding.before_flush)
    event.listen(target, "after_flush", binding.after_flush)
    event.listen(target, "do_orm_execute", binding.do_orm_execute)
    event.listen(target, "after_commit", binding.after_commit)
    event.listen(target, "after_transaction_end", binding.after_transaction_end)


def _plain(v: Any) -> Any:
    # asyncpg hands out its own UUID subclass; the cache gives back uuid.UUID: be equal on a miss.
    return uuid.UUID(int=v.int) if isinstance(v, uuid.UUID) and type(v) is not uuid.UUID else v


_DESCRIBED: dict[Any, tuple[str, list[str]]] = {}


def _describe(stmt: Any, dialect: Any) -> tuple[str, Any, list[str]]:
    """(SQL text, bound values, tables read). Compiling costs a few times a cache hit, so the text
    and tables are kept per statement shape: SQLAlchemy's own cache key (the statement without
    its bound values, which come along with it)."""
    ck = stmt._generate_cache_key()
    if ck is None:  # a statement SQLAlchemy does not cache either
        compiled = stmt.compile(dialect=dialect)
        return str(compiled), dict(compiled.params), tables_read(stmt)
    shape = (dialect.name, dialect.driver, ck.key)
    found = _DESCRIBED.get(shape)
    if found is None:
        found = (str(stmt.compile(dialect=dialect)), tables_read(stmt))
        if len(_DESCRIBED) >= 1024:
            _DESCRIBED.clear()
        _DESCRIBED[shape] = found
    return found[0], [b.effective_value for b in ck.bindparams], found[1]


async def query(
    cache: CachingService, session: AsyncSession | Session, stmt: Any, *, ttl: float | None = None,
    namespace: str = "query", tags: Iterable[str] = (),
) -> list[dict[str, Any]]:
    bind = session.get_bind() if isinstance(session, Session) else session.sync_session.get_bind()
    sql, values, tables = _describe(stmt, bind.dialect)
    params = {"sql": sql, "params": values}
    all_tags = [*("table:" + t for t in tables), *tags]

    async def load() -> list[dict[str, Any]]:
        if isinstance(session, AsyncSession):
            result: Any = await session.execute(stmt)
        else:
            result = session.execute(stmt)
        return [{k: _plain(v) for k, v in row.items()} for row in result.mappings()]

    rows: list[dict[str, Any]] = await cache.get_or_load(namespace, params, load, ttl=ttl, tags=all_tags)
    return rows
