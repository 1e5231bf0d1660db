"""CachingService: query results cached in Redis, with exact invalidation, stampede protection,
and counters the exporter reads.

A read is one GET. On a miss, the loader runs once per process (concurrent callers share one task;
a caller that is cancelled leaves the load running for the others) and once across processes: a
script takes a lock (``SET NX PX`` with a random token) unless the value appeared meanwhile; other
processes poll for the value for at most ``lock_wait`` seconds, then load anyway. The lock is
released by a compare-and-delete script, so only its owner can release it.

Every entry carries a short text header, ``pc2 <fmt> <expires at, ms> <load time, us>\\n``, then the
serializer's bytes; it lets a reader refuse a payload written by another serializer, serve an
expired value during ``stale_ttl`` while one caller refreshes it, refresh early
(``early_refresh_beta`` > 0: probabilistic early expiration, "XFetch"), and count on each hit the
loader time that hit saved (the load time of that very entry).

If Redis fails or is slow (short socket timeouts, no retries) the loader's value is returned and the
error is counted by operation; after ``breaker_threshold`` errors in a row Redis is skipped for
``breaker_cooldown`` seconds. Invalidations that fail are logged and counted, not raised: the TTL
bounds how long such an entry can be served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

try:
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # redis-py < 7
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

from .breaker import CircuitBreaker
from .keys import (
    cache_key,
    check_namespace,
    check_pattern,
    lock_key,
    namespace_of,
    namespace_pattern,
    tag_key,
)
from .serializers import JsonSerializer, PayloadError, Serializer
from .stats import CacheStats

__all__ = ["DEFAULT_REDIS_URL", "CachingService", "Loader", "redis_client"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Loader = Callable[[], Awaitable[T]]
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
_BATCH = 500
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
_MISSING: Any = object()
_SCALARS = frozenset({str, int, bool, type(None)})

# KEYS: entry, lock. Returns [1, value] if the entry exists, [2] if we now hold the lock, [0] if not.
_GET_OR_LOCK = """
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _QueueingPool(BlockingConnectionPool):
    """A BlockingConnectionPool whose callers take a free connection directly, and queue (for at
    most ``timeout``) only when every connection is in use: the queue's lock, condition and timer
    cost a cache hit about as much as decoding its value."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._free():
            return await ConnectionPool.get_connection(self, *args, **kwargs)  # type: ignore[no-untyped-call]
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def release(self, connection: Any) -> None:
        if self._queued():
            await super().release(connection)  # wakes the next queued caller
        else:
            await ConnectionPool.release(self, connection)

    def _free(self) -> bool:
        can = getattr(self, "can_get_connection", None)  # redis-py versions differ: else queue
        return (
            can is not None and not getattr(self, "_in_maintenance", False) and bool(can())
            and not self._queued()
        )

    def _queued(self) -> bool:
        waiters = getattr(self._condition, "_waiters", True)  # unknown asyncio: always the slow path
        return bool(waiters)


def redis_client(
    url: str, *, cluster: bool = False, socket_timeout: float = 0.25, connect_timeout: float = 0.25,
    max_connections: int = 100,
) -> Redis | RedisCluster:
    """A client that fails fast: short timeouts and no retries (the caller falls back to the
    database instead). On a single Redis, callers beyond max_connections queue for a connection
    (for at most a second) instead of failing."""
    opts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": max_connections,
    }
    if MaintNotificationsConfig is not None:
        # redis-py >= 7 asks every new connection for maintenance events; Redis < 8 says no.
        opts["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    if cluster:
        return RedisCluster.from_url(url, **opts)
    return Redis.from_pool(_QueueingPool.from_url(url, timeout=1.0, **opts))


def _seconds(value: float | timedelta, what: str) -> float:
    s = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not s > 0 or math.isinf(s):
        raise ValueError(f"{what} must be a positive number of seconds, not {value!r}")
    return s


class CachingService:
    """See the module docstring. One instance per process and event loop; ``async with`` it, or
    call ``close()`` at shutdown so the last counters are flushed."""

    def __init__(
        self,
        redis: str | Redis | RedisCluster | None = None,
        *,
        redis_url: str | None = None,
        prefix: str = "pgcache",
        stats_key: str = "pgcache:stats",
        serializer: Serializer | None = None,
        default_ttl: float | timedelta = 300.0,
        ttl_jitter: float = 0.1,
        stale_ttl: float = 0.0,
        early_refresh_beta: float = 0.0,
        lock: bool = True,
        lock_timeout: float = 10.0,
        lock_wait: float | None = None,
        lock_poll_interval: float = 0.02,
        socket_timeout: float = 0.25,
        connect_timeout: float = 0.25,
        cluster: bool = False,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 5.0,
        stats_flush_interval: float = 1.0,
        instance: str | None = None,
        max_connections: int = 100,
    ) -> None:
        if redis is not None and redis_url is not None:
            raise TypeError("CachingService: pass either a client or URL as `redis`, or `redis_url=`, not both")
        if redis is None:
            redis = redis_url or DEFAULT_REDIS_URL
        check_namespace(prefix, "prefix")
        if not 0 <= ttl_jitter < 1:
            raise ValueError("ttl_jitter must be a fraction in [0, 1)")
        if stale_ttl < 0 or early_refresh_beta < 0:
            raise ValueError("stale_ttl and early_refresh_beta must be >= 0")
        self.prefix = prefix
        self.serializer: Serializer = serializer or JsonSerializer()
        self.default_ttl = _seconds(default_ttl, "default_ttl")
        self.ttl_jitter = ttl_jitter
        self.stale_ttl = stale_ttl
        self.early_refresh_beta = early_refresh_beta
        self.use_lock = lock
        self.lock_timeout = _seconds(lock_timeout, "lock_timeout")
        self.lock_wait = self.lock_timeout if lock_wait is None else lock_wait
        self.lock_poll_interval = lock_poll_interval
        self.stats_flush_interval = _seconds(stats_flush_interval, "stats_flush_interval")
        self.stats = CacheStats(stats_key, instance)
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown)
        self._owns_client = isinstance(redis, str)
        self._redis: Any
        if isinstance(redis, str):
            self._redis = redis_client(
                redis, cluster=cluster, socket_timeout=socket_timeout,
                connect_timeout=connect_timeout, max_connections=max_connections,
            )
        else:
            self._redis = redis
        self._fmt = self.serializer.fmt
        self._namespaces: set[str] = set()
        self._keys: dict[Any, str] = {}
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._refreshing: dict[str, asyncio.Task[Any]] = {}
        self._flusher: asyncio.Task[None] | None = None
        # The loop this service runs on (known from the first call): synchronous sessions bound
        # with bind() hand their invalidations to it from other threads.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._flush_lock = asyncio.Lock()
        self._closed = False

    @property
    def redis(self) -> Any:
        """The redis.asyncio client (Redis or RedisCluster) this service talks through."""
        return self._redis

    async def __aenter__(self) -> CachingService:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _start(self) -> None:
        if self._flusher is None and not self._closed:
            self.loop = asyncio.get_running_loop()
            self._flusher = self.loop.create_task(self._flush_loop())

    def key(self, namespace: str, params: Mapping[str, Any]) -> str:
        """The Redis key of an entry: ``<prefix>:{<namespace>}:<digest>``."""
        # Params of plain scalars (the common user_id=1 case) are looked up, not hashed again;
        # the type is part of the lookup so that 1, 1.0 and True stay three keys.
        try:
            memo: Any = (namespace, *[(k, v.__class__, v) for k, v in params.items() if v.__class__ in _SCALARS])
        except AttributeError:
            memo = None
        if memo is not None and len(memo) == len(params) + 1:
            found = self._keys.get(memo)
            if found is not None:
                return found
        if namespace not in self._namespaces:
            check_namespace(namespace)
            self._namespaces.add(namespace)
        key = cache_key(self.prefix, namespace, params)
        if memo is not None and len(memo) == len(params) + 1:
            if len(self._keys) >= 4096:
                self._keys.clear()
            self._keys[memo] = key
        return key

    # -- reading ------------------------------------------------------------------------------
    async def get_or_load(
        self,
        namespace: str,
        params: Mapping[str, Any],
        loader: Loader[T],
        *,
        ttl: float | timedelta | None = None,
        tags: Iterable[str] = (),
    ) -> T:
        """The cached value for (namespace, params), or ``await loader()``, stored for ``ttl``
        seconds and added to each tag's set. Redis failures never fail the call."""
        key = self.key(namespace, params)
        ttl_s = self.default_ttl if ttl is None else _seconds(ttl, "ttl")
        self._start()
        # The hit path is every cached read an application makes: no work here that a hit does
        # not need (the entry is decoded inline; tags are only looked at for a store).
        if self.breaker.allow():
            try:
                raw = await self._redis.get(key)
            except REDIS_ERRORS as e:
                self._failed(namespace, "get", e)
            else:
                self.breaker.success()
                if raw is not None:
                    try:
                        value, expires, delta = self._decode(raw)
                    except PayloadError as e:
                        await self._drop(namespace, key, e)
                    else:
                        now = time.time()
                        if self.stale_ttl and now >= expires:
                            self.stats.stale_served(namespace)
                            self._refresh(key, namespace, loader, ttl_s, tuple(tags))
                        else:
                            self.stats.hit(namespace, delta)
                            beta = self.early_refresh_beta
                            if beta and now - delta * beta * math.log(1.0 - random.random()) >= expires:
                                self._refresh(key, namespace, loader, ttl_s, tuple(tags))
                        return value  # type: ignore[no-any-return]
                self.stats.miss(namespace)
        else:
            self.stats.error(namespace, "breaker_open")
        tags = tuple(tags)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fill(key, namespace, loader, ttl_s, tags))
            self._inflight[key] = task
            task.add_done_callback(partial(self._fill_done, key))
        # shield: a cancelled caller stops waiting; the shared load goes on for the others.
        return await asyncio.shield(task)

    def _fill_done(self, key: str, task: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here; the waiters (if any are left) see it too

    def _refresh(self, key: str, ns: str, loader: Loader[Any], ttl: float, tags: tuple[str, ...]) -> None:
        if key in self._refreshing or key in self._inflight or self._closed:
            return
        task = asyncio.ensure_future(self._fill(key, ns, loader, ttl, tags, refresh=True))
        self._refreshing[key] = task

        def done(t: asyncio.Task[Any]) -> None:
            self._refreshing.pop(key, None)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background refresh of %s failed: %r", key, t.exception())

        task.add_done_callback(done)

    async def _fill(
        self, key: str, ns: str, loader: Loader[Any], ttl: float, tags: tuple[str, ...],
        *, refresh: bool = False,
    ) -> Any:
        token: str | None = None
        lkey = lock_key(key)
        if self.use_lock and self.breaker.allow():
            token = secrets.token_hex(16)
            try:
                if refresh:
                    got: Any = [2] if await self._redis.set(
                        lkey, token, nx=True, px=int(self.lock_timeout * 1000)) else [0]
                else:
                    got = await self._redis.eval(
                        _GET_OR_LOCK, 2, key, lkey, token, int(self.lock_timeout * 1000))
            except REDIS_ERRORS as e:
                self._failed(ns, "lock", e)
                token = None
            else:
                self.breaker.success()
                if got[0] == 1:  # stored by another process between our GET and now
                    found = await self._decode_or_drop(ns, key, got[1])
                    if found is not _MISSING:
                        return found[0]
                    token = None
                elif got[0] == 0:
                    token = None
                    if refresh:
                        return None  # another process is refreshing it
                    self.stats.lock_wait(ns)
                    found = await self._wait_for_other(key, lkey, ns)
                    if found is not _MISSING:
                        return found
        try:
            start = time.perf_counter()
            value = await loader()
            elapsed = time.perf_counter() - start
            self.stats.load(ns, elapsed)
            await self._store(key, ns, value, ttl, tags, elapsed)
            return value
        finally:
            if token is not None:
                try:
                    await self._redis.eval(_RELEASE, 1, lkey, token)
                except REDIS_ERRORS as e:
                    self._failed(ns, "lock", e)

    async def _wait_for_other(self, key: str, lkey: str, ns: str) -> Any:
        """Poll until another process stores the value (returned), its lock goes away without a
        value, or lock_wait runs out (both _MISSING: the caller loads itself)."""
        deadline = time.monotonic() + self.lock_wait
        delay = self.lock_poll_interval
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)
            try:
                raw, held = await self._redis.mget(key, lkey)  # one slot: same hash tag
            except REDIS_ERRORS as e:
                self._failed(ns, "lock", e)
                return _MISSING
            if raw is not None:
                found = await self._decode_or_drop(ns, key, raw)
                return _MISSING if found is _MISSING else found[0]
            if held is None:
                return _MISSING
        return _MISSING

    # -- entries ------------------------------------------------------------------------------
    def _encode(self, value: Any, ttl: float, load_seconds: float) -> bytes:
        body = self.serializer.dumps(value)  # raises SerializationError: a caller's bug, not Redis's
        expires_ms = int((time.time() + ttl) * 1000)
        return b"pc2 %s %d %d\n" % (self._fmt, expires_ms, int(load_seconds * 1_000_000)) + body

    def _decode(self, raw: bytes) -> tuple[Any, float, float]:
        nl = raw.find(b"\n", 0, 64)
        if nl < 0 or not raw.startswith(b"pc2 "):
            raise PayloadError("no pgcache entry header")
        parts = raw[4:nl].split(b" ")
        if len(parts) != 3 or parts[0] != self._fmt:
            raise PayloadError(f"entry written by another serializer ({parts[0]!r})")
        try:
            expires, delta = int(parts[1]) / 1000, int(parts[2]) / 1_000_000
        except ValueError:
            raise PayloadError("bad pgcache entry header") from None
        return self.serializer.loads(raw[nl + 1 :]), expires, delta

    async def _decode_or_drop(self, ns: str, key: str, raw: bytes) -> Any:
        try:
            return self._decode(raw)
        except PayloadError as e:
            await self._drop(ns, key, e)
            return _MISSING

    async def _drop(self, ns: str, key: str, error: PayloadError) -> None:
        """An entry that does not decode (or verify) is a miss, counted as an error, and deleted."""
        log.warning("dropping cache entry %s: %s", key, error)
        self.stats.error(ns, "decode")
        try:  # best effort; if this fails too, the entry expires by itself
            await self._redis.unlink(key)
        except REDIS_ERRORS as e2:
            self._failed(ns, "delete", e2)

    async def _store(
        self, key: str, ns: str, value: Any, ttl: float, tags: tuple[str, ...], load_seconds: float
    ) -> None:
        if self.ttl_jitter:
            ttl *= 1.0 - self.ttl_jitter * random.random()  # only ever shorter than asked
        payload = self._encode(value, ttl, load_seconds)
        if not self.breaker.allow():
            return
        px = max(1, int((ttl + self.stale_ttl) * 1000))
        try:
            if tags:
                tag_ttl = math.ceil(ttl + self.stale_ttl) + 1
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(key, payload, px=px)
                    for tag in tags:
                        tk = tag_key(self.prefix, tag)
                        pipe.sadd(tk, key)
                        # The set lives as long as its longest-lived member (Redis >= 7).
                        pipe.expire(tk, tag_ttl, nx=True)
                        pipe.expire(tk, tag_ttl, gt=True)
                    await pipe.execute()
            else:
                await self._redis.set(key, payload, px=px)
        except REDIS_ERRORS as e:
            self._failed(ns, "set", e)
        else:
            self.breaker.success()

    def _failed(self, ns: str, operation: str, error: BaseException) -> None:
        self.stats.error(ns, operation)
        self.breaker.failure()
        log.debug("Redis %s failed: %r", operation, error)

    # -- invalidation -------------------------------------------------------------------------
    async def invalidate(self, namespace: str, params: Mapping[str, Any]) -> int:
        """Remove the one entry for (namespace, params); returns 1 if it existed, else 0."""
        return await self._unlink_counted([self.key(namespace, params)])

    async def invalidate_tags(self, *tags: str) -> int:
        """Remove every entry stored with any of these tags; returns how many existed. One
        round trip reads every tag set, however many tags a commit brings."""
        if not tags:
            return 0
        tag_keys = [tag_key(self.prefix, t) for t in dict.fromkeys(tags)]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for tk in tag_keys:
                    pipe.smembers(tk)
                sets = await pipe.execute()
        except REDIS_ERRORS as e:
            self._failed("", "invalidate", e)
            return 0
        members = sorted({m for got in sets for m in got})
        total = await self._unlink_counted([m.decode() for m in members])
        try:
            # SREM, not UNLINK: a member added while we worked stays for the next invalidation.
            async with self._redis.pipeline(transaction=False) as pipe:
                for tk, got in zip(tag_keys, sets, strict=True):
                    got = list(got)
                    for i in range(0, len(got), _BATCH):
                        pipe.srem(tk, *got[i : i + _BATCH])
                await pipe.execute()
        except REDIS_ERRORS as e:
            self._failed("", "invalidate", e)
        return total

    async def invalidate_namespace(self, namespace: str) -> int:
        """Remove every entry of a namespace (SCAN on every master + batched UNLINK)."""
        check_namespace(namespace)
        return await self.invalidate_pattern(namespace_pattern(self.prefix, namespace), _ns=namespace)

    async def invalidate_pattern(self, pattern: str, *, _ns: str | None = None) -> int:
        """The seed's name: remove the entries whose keys match a Redis glob pattern, found with
        SCAN (never KEYS) and removed with UNLINK in batches. Entry keys are
        ``<prefix>:{<namespace>}:<hash of the params>``, so only ``<prefix>:{<namespace glob>}:*``
        can select anything: any other pattern (the seed's ``user_stats:*user_id*1*``) raises
        ValueError naming the method to use, instead of removing 0 entries silently. Only entry
        keys are removed (never locks, tag sets or the stats hash)."""
        check_pattern(self.prefix, pattern)
        keys: list[str] = []
        try:
            async for k in self._redis.scan_iter(match=pattern, count=1000):
                k = k.decode() if isinstance(k, bytes) else k
                if namespace_of(self.prefix, k) is not None:
                    keys.append(k)
        except REDIS_ERRORS as e:
            self._failed(_ns or "", "invalidate", e)
            return 0
        return await self._unlink_counted(keys, namespace=_ns)

    async def _unlink_counted(self, keys: list[str], *, namespace: str | None = None) -> int:
        by_ns: dict[str, list[str]] = {}
        for k in keys:
            by_ns.setdefault(namespace or namespace_of(self.prefix, k) or "", []).append(k)
        if not by_ns:  # nothing to remove: still an invalidation, of no namespace in particular
            self.stats.invalidation(namespace or "", 0)
        total = 0
        for ns, group in by_ns.items():
            removed = 0
            try:
                for i in range(0, len(group), _BATCH):
                    # One namespace is one hash tag, so each batch is a single-slot command.
                    removed += int(await self._redis.unlink(*group[i : i + _BATCH]))
            except REDIS_ERRORS as e:
                self._failed(ns, "invalidate", e)
                log.warning("cache invalidation in namespace %r failed: %r", ns, e)
            self.stats.invalidation(ns, removed)
            total += removed
        return total

    # -- SQLAlchemy (exporter.cache.orm, imported on first use) -----------------------------
    def bind(self, session_factory: Any, *, counters: Iterable[Any] = ()) -> None:
        """Invalidate on commit what the factory's sessions wrote (see exporter.cache.orm):
        ``cache.bind(async_sessionmaker(engine))``; also a sessionmaker or one session."""
        from .orm import bind

        bind(self, session_factory, counters=counters)

    async def query(
        self, session: Any, stmt: Any, *, ttl: float | timedelta | None = None,
        namespace: str = "query", tags: Iterable[str] = (),
    ) -> list[dict[str, Any]]:
        """Run a ``select()`` once per (SQL, params) and cache its rows as plain dicts, tagged
        ``table:<t>`` for every table it reads, so a bound session's commits keep it fresh."""
        from .orm import query

        ttl_s = None if ttl is None else _seconds(ttl, "ttl")
        return await query(self, session, stmt, ttl=ttl_s, namespace=namespace, tags=tags)

    # -- the seed design's API ----------------------------------------------------------------
    async def get_cached_query_result(
        self, cache_key: str, query_func: Callable[..., Awaitable[T]], ttl: float = 300, **params: Any
    ) -> T:
        """``await query_func(**params)``, cached in namespace ``cache_key`` (seed-compatible)."""
        return await self.get_or_load(cache_key, params, lambda: query_func(**params), ttl=ttl)

    # -- counters and shutdown ----------------------------------------------------------------
    async def flush_stats(self) -> bool:
        """Send the counters now; False (deltas kept for the next try) if Redis failed."""
        async with self._flush_lock:
            try:
                await self.stats.flush(self._redis)
            except REDIS_ERRORS as e:
                self.stats.error("", "flush")
                log.debug("stats flush failed: %r", e)
                return False
            return True

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.stats_flush_interval)
            await self.flush_stats()

    async def close(self) -> None:
        """Stop background work, flush the counters, and close the client if we opened it."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._flusher, *self._refreshing.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if await self.flush_stats():
            with contextlib.suppress(*REDIS_ERRORS):
                await self.stats.forget_instance(self._redis)
        if self._owns_client:
            await self._redis.aclose()
