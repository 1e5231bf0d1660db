"""CachingService against a real redis-server: hits, expiry, invalidation, stampedes, failures."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aredis
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from exporter.cache import CachingService, SerializationError, SignedPickleSerializer
from exporter.demo.servers import RedisServer


def counting_loader(value: Any = "v", delay: float = 0.0) -> tuple[list[int], Callable[[], Awaitable[Any]]]:
    calls: list[int] = []

    async def load() -> Any:
        calls.append(1)
        if delay:
            await asyncio.sleep(delay)
        return value

    return calls, load


async def test_hit_after_miss_and_params_in_any_order(redis_url: str) -> None:
    calls, load = counting_loader({"rows": [1, 2, 3]})
    async with CachingService(redis_url) as cache:
        first = await cache.get_or_load("report", {"a": 1, "b": "x"}, load, ttl=30)
        second = await cache.get_or_load("report", {"b": "x", "a": 1}, load, ttl=30)
        other = await cache.get_or_load("report", {"a": 2, "b": "x"}, load, ttl=30)
        assert first == second == other == {"rows": [1, 2, 3]}
        assert len(calls) == 2  # the reordered params hit; a = 2 is a different key
        pending = cache.stats.pending()
        assert pending["misses|report"] == 2 and pending["hits|report"] == 1
        assert pending["loads|report"] == 2
        key = cache.key("report", {"a": 1, "b": "x"})
        assert key.startswith("pgcache:{report}:") and len(key.rsplit(":", 1)[1]) == 32
        assert await cache.redis.exists(key) == 1


async def test_entries_expire(redis_url: str) -> None:
    calls, load = counting_loader()
    async with CachingService(redis_url, ttl_jitter=0) as cache:
        await cache.get_or_load("short", {}, load, ttl=0.3)
        await cache.get_or_load("short", {}, load, ttl=0.3)
        assert len(calls) == 1
        ttl_ms = await cache.redis.pttl(cache.key("short", {}))
        assert 0 < ttl_ms <= 300
        await asyncio.sleep(0.45)
        await cache.get_or_load("short", {}, load, ttl=0.3)
        assert len(calls) == 2


async def test_ttl_jitter_only_shortens(redis_url: str) -> None:
    async with CachingService(redis_url, ttl_jitter=0.5) as cache:
        ttls = []
        for i in range(20):
            await cache.get_or_load("j", {"i": i}, counting_loader()[1], ttl=100)
            ttls.append(await cache.redis.pttl(cache.key("j", {"i": i})))
        assert all(50_000 - 100 <= t <= 100_000 for t in ttls)
        assert len(set(ttls)) > 5  # actually spread


async def test_each_invalidation_removes_exactly_its_entries(redis_url: str) -> None:
    loads: list[tuple[str, int]] = []

    def loader(ns: str, uid: int) -> Callable[[], Awaitable[dict[str, int]]]:
        async def load() -> dict[str, int]:
            loads.append((ns, uid))
            return {"user_id": uid}
        return load

    async with CachingService(redis_url) as cache:
        async def warm() -> None:
            for uid in (1, 10, 100):
                await cache.get_or_load("user_stats", {"user_id": uid}, loader("user_stats", uid),
                                        ttl=60, tags=[f"user:{uid}"])
                await cache.get_or_load("user_posts", {"user_id": uid}, loader("user_posts", uid),
                                        ttl=60, tags=[f"user:{uid}"])

        await warm()
        assert len(loads) == 6
        # The seed's patterns can never match a hashed key: refused, naming what to call instead.
        for seed_pattern, method in [
            ("user_stats:*user_id*50001*", "cache.invalidate('user_stats', {<the params>})"),
            ("user:*", "cache.invalidate_namespace('user')"),
            ("pgcache:{user_stats}:*user_id*1*", "invalidate_tags"),
            ("*", "invalidate_namespace"),
        ]:
            with pytest.raises(ValueError, match="can never match a cache entry") as err:
                await cache.invalidate_pattern(seed_pattern)
            assert method in str(err.value), str(err.value)
        assert len(loads) == 6 and await cache.redis.exists(cache.key("user_stats", {"user_id": 1})) == 1

        loads.clear()
        assert await cache.invalidate("user_stats", {"user_id": 1}) == 1
        await warm()
        assert loads == [("user_stats", 1)]

        loads.clear()
        assert await cache.invalidate_tags("user:10") == 2
        await warm()
        assert sorted(loads) == [("user_posts", 10), ("user_stats", 10)]

        loads.clear()
        assert await cache.invalidate_namespace("user_stats") == 3
        await warm()
        assert sorted(loads) == [("user_stats", 1), ("user_stats", 10), ("user_stats", 100)]

        loads.clear()
        # The seed's own name, with a pattern that fits the real key layout. Locks, tag sets and
        # the stats hash are never entries, even when a namespace glob would reach them.
        await cache.flush_stats()
        assert await cache.invalidate_pattern("pgcache:{user_posts}:*") == 3
        assert await cache.invalidate_pattern("pgcache:{*}:" + "0" * 32) == 0
        assert await cache.redis.exists("pgcache:stats", "pgcache:tag:user:1") == 2
        await warm()
        assert sorted(loads) == [("user_posts", 1), ("user_posts", 10), ("user_posts", 100)]

        stored = {k.decode(): float(v) for k, v in (await cache.redis.hgetall("pgcache:stats")).items()
                  if not k.startswith(b"flush")}
        pending = cache.stats.pending()
        assert stored["invalidated_keys|user_stats"] + pending.get("invalidated_keys|user_stats", 0) == 1 + 1 + 3
        assert stored.get("invalidated_keys|user_posts", 0) + pending["invalidated_keys|user_posts"] == 1 + 3


async def test_namespace_invalidation_is_literal(redis_url: str) -> None:
    async with CachingService(redis_url) as cache:
        for ns in ("a*", "ab", "a"):
            await cache.get_or_load(ns, {}, counting_loader()[1], ttl=60)
        assert await cache.invalidate_namespace("a*") == 1
        assert await cache.redis.exists(cache.key("ab", {}), cache.key("a", {})) == 2


async def test_200_concurrent_callers_load_once(redis_url: str) -> None:
    calls, load = counting_loader([1, 2], delay=0.2)
    async with CachingService(redis_url) as cache:
        results = await asyncio.gather(*(cache.get_or_load("cold", {"q": 1}, load, ttl=30) for _ in range(200)))
        assert len(calls) == 1
        assert results == [[1, 2]] * 200


async def test_cancelled_waiter_does_not_cancel_the_load(redis_url: str) -> None:
    calls, load = counting_loader("done", delay=0.3)
    async with CachingService(redis_url) as cache:
        first = asyncio.create_task(cache.get_or_load("slow", {}, load, ttl=30))
        others = [asyncio.create_task(cache.get_or_load("slow", {}, load, ttl=30)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert calls == [1]
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await asyncio.gather(*others) == ["done"] * 3
        assert calls == [1]
        assert await cache.get_or_load("slow", {}, load, ttl=30) == "done"
        assert calls == [1]


async def test_loader_errors_reach_every_waiter_and_nothing_is_cached(redis_url: str) -> None:
    async def boom() -> int:
        await asyncio.sleep(0.05)
        raise LookupError("db said no")

    async with CachingService(redis_url) as cache:
        results = await asyncio.gather(*(cache.get_or_load("e", {}, boom) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, LookupError) for r in results)
        assert await cache.redis.exists(cache.key("e", {})) == 0
        assert await cache.redis.exists("pgcache:lock:{e}:" + cache.key("e", {}).rsplit(":", 1)[1]) == 0


async def test_lock_held_elsewhere_makes_us_wait_for_its_value(redis_url: str) -> None:
    calls, load = counting_loader("mine")
    async with CachingService(redis_url, lock_wait=2) as cache, CachingService(redis_url) as other:
        key = cache.key("locked", {})
        lock = "pgcache:lock:{locked}:" + key.rsplit(":", 1)[1]
        await cache.redis.set(lock, "someone-else", px=5000)

        # Another process holds the lock; it stores the value and releases, as an owner does.
        async def owner() -> None:
            await asyncio.sleep(0.3)
            payload = other._encode("theirs", 30, 0.01)
            await other.redis.set(key, payload, px=30000)
            await other.redis.delete(lock)

        got, _ = await asyncio.gather(cache.get_or_load("locked", {}, load, ttl=30), owner())
        assert got == "theirs" and calls == []
        assert cache.stats.pending()["lock_waits|locked"] == 1


async def test_lock_wait_is_bounded(redis_url: str) -> None:
    calls, load = counting_loader("anyway")
    async with CachingService(redis_url, lock_wait=0.3) as cache:
        key = cache.key("stuck", {})
        await cache.redis.set("pgcache:lock:{stuck}:" + key.rsplit(":", 1)[1], "dead-owner", px=60000)
        start = time.monotonic()
        assert await cache.get_or_load("stuck", {}, load, ttl=30) == "anyway"
        assert 0.25 < time.monotonic() - start < 2
        assert calls == [1]
        # The foreign lock was not released by us (only its owner may).
        assert await cache.redis.get("pgcache:lock:{stuck}:" + key.rsplit(":", 1)[1]) == b"dead-owner"


async def test_stale_entry_served_while_refreshing(redis_url: str) -> None:
    values = iter(["old", "new"])

    async def load() -> str:
        return next(values)

    async with CachingService(redis_url, ttl_jitter=0, stale_ttl=10) as cache:
        assert await cache.get_or_load("s", {}, load, ttl=0.2) == "old"
        await asyncio.sleep(0.3)
        assert await cache.get_or_load("s", {}, load, ttl=0.2) == "old"  # stale, refresh started
        await asyncio.sleep(0.1)
        assert await cache.get_or_load("s", {}, load, ttl=0.2) == "new"
        assert cache.stats.pending()["stale_served|s"] == 1


async def test_early_refresh_reloads_before_expiry(redis_url: str) -> None:
    calls, load = counting_loader("x", delay=0.05)
    async with CachingService(redis_url, ttl_jitter=0, early_refresh_beta=50.0) as cache:
        await cache.get_or_load("early", {}, load, ttl=1)
        await asyncio.sleep(0.2)
        # delta 50ms * beta 50 makes a refresh near-certain well before the 1s expiry.
        for _ in range(5):
            assert await cache.get_or_load("early", {}, load, ttl=1) == "x"
        await asyncio.sleep(0.15)
        assert len(calls) >= 2
        assert cache.stats.pending()["hits|early"] == 5


async def test_redis_down_falls_back_and_recovers(redis_private: RedisServer) -> None:
    calls, load = counting_loader({"ok": True})
    cache = CachingService(redis_private.url, breaker_threshold=2, breaker_cooldown=0.3)
    try:
        assert await cache.get_or_load("d", {}, load, ttl=60) == {"ok": True}
        assert await cache.get_or_load("d", {}, load, ttl=60) == {"ok": True}
        assert len(calls) == 1

        redis_private.stop()
        for _ in range(6):
            assert await cache.get_or_load("d", {}, load, ttl=60) == {"ok": True}
        assert len(calls) == 7
        pending = cache.stats.pending()
        assert pending.get("errors|get|d", 0) >= 1
        # get, then the lock script of the same call: two errors in a row open the breaker.
        assert pending.get("errors|lock|d", 0) >= 1
        assert pending.get("errors|breaker_open|d", 0) >= 4  # later calls skipped Redis  # the breaker skipped Redis
        misses_during_outage = pending["misses|d"]
        assert misses_during_outage == 1  # errors are not counted as misses
        assert not await cache.flush_stats()
        assert cache.stats.pending()["errors|get|d"] == pending["errors|get|d"]  # kept for later

        redis_private.start()
        deadline = time.monotonic() + 5
        before = len(calls)
        while True:  # the breaker cools down, the pool reconnects, the entry is stored again
            await cache.get_or_load("d", {}, load, ttl=60)
            after = len(calls)
            await cache.get_or_load("d", {}, load, ttl=60)
            if len(calls) == after:
                break
            assert time.monotonic() < deadline, "caching never resumed"
            await asyncio.sleep(0.1)
        assert len(calls) > before
        assert await cache.flush_stats()
        stored = await cache.redis.hgetall("pgcache:stats")
        assert int(stored[b"errors|get|d"]) >= 1 and int(stored[b"errors|breaker_open|d"]) >= 4
        assert int(stored[b"misses|d"]) >= 2
        assert cache.stats.pending() == {}
    finally:
        await cache.close()


async def test_slow_redis_times_out_quickly(redis_private: RedisServer) -> None:
    calls, load = counting_loader(1)
    async with CachingService(redis_private.url, socket_timeout=0.1, breaker_threshold=100) as cache:
        async with aredis.Redis.from_url(redis_private.url) as admin:
            # A busy script blocks the whole server for ~0.8 s: Redis is there, but slow.
            busy = (
                "local t = redis.call('TIME') local s = t[1] + t[2] / 1e6 "
                "while true do t = redis.call('TIME') if t[1] + t[2] / 1e6 - s > 0.8 then break end end "
                "return 1"
            )
            task = asyncio.create_task(admin.eval(busy, 0))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            assert await cache.get_or_load("slow", {}, load, ttl=5) == 1
            assert time.monotonic() - start < 0.8
            await task
        assert cache.stats.pending()["errors|get|slow"] == 1


async def test_signed_pickle_roundtrip_and_tampering(redis_url: str) -> None:
    ser = SignedPickleSerializer(b"k" * 32)
    value = {"when": (1, 2), "set": {3}, "obj": Boom2(5)}
    calls, load = counting_loader(value)
    async with CachingService(redis_url, serializer=ser) as cache:
        assert await cache.get_or_load("p", {}, load, ttl=60) == value
        assert await cache.get_or_load("p", {}, load, ttl=60) == value  # tuples and sets survive
        assert len(calls) == 1
        key = cache.key("p", {})
        raw = await cache.redis.get(key)
        await cache.redis.set(key, raw[:-1] + bytes([raw[-1] ^ 1]))
        assert await cache.get_or_load("p", {}, load, ttl=60) == value
        assert len(calls) == 2
        assert cache.stats.pending()["errors|decode|p"] == 1
        # Signed with another key: rejected as well.
        async with CachingService(redis_url, serializer=SignedPickleSerializer(b"x" * 32)) as other:
            assert await other.get_or_load("p", {}, load, ttl=60) == value
            assert other.stats.pending()["errors|decode|p"] == 1
        assert len(calls) == 3
    with pytest.raises(ValueError, match="at least 16 bytes"):
        SignedPickleSerializer(b"short")


class Boom2:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Boom2) and other.x == self.x


UNPICKLED: list[str] = []


def _mark(text: str) -> str:
    UNPICKLED.append(text)
    return text


class Boom:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_mark, ("unpickled!",))


async def test_default_serializer_never_unpickles(redis_url: str) -> None:
    calls, load = counting_loader({"safe": 1})
    async with CachingService(redis_url) as cache:
        key = cache.key("evil", {})
        for payload in (
            pickle.dumps(Boom()),  # what the seed stored
            b"pc2 p 99999999999999 1\n" + pickle.dumps(Boom()),  # claims to be pickle
            b"pc2 J 99999999999999 1\n" + pickle.dumps(Boom()),  # claims to be JSON
        ):
            await cache.redis.set(key, payload)
            assert await cache.get_or_load("evil", {}, load, ttl=60) == {"safe": 1}
            await cache.invalidate("evil", {})
        assert UNPICKLED == []
        assert len(calls) == 3
        assert cache.stats.pending()["errors|decode|evil"] == 3


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "thing"
    id: Mapped[int] = mapped_column(primary_key=True)


async def test_seed_constructor_keyword_and_default_url(redis_url: str) -> None:
    async with CachingService(redis_url=redis_url) as cache:
        assert await cache.get_or_load("kw", {}, counting_loader(1)[1]) == 1
    default = CachingService()
    assert default.redis.connection_pool.connection_kwargs["port"] == 6379
    assert default.redis.connection_pool.connection_kwargs.get("db", 0) == 0
    await default.close()
    with pytest.raises(TypeError, match="not both"):
        CachingService(redis_url, redis_url=redis_url)


async def test_hits_count_the_loader_time_they_saved(redis_url: str) -> None:
    calls, load = counting_loader("v", delay=0.05)
    async with CachingService(redis_url, stats_flush_interval=3600) as cache:
        await cache.get_or_load("saved", {}, load, ttl=60)
        assert "saved_seconds|saved" not in cache.stats.pending()  # a miss saves nothing
        for _ in range(4):
            await cache.get_or_load("saved", {}, load, ttl=60)
        pending = cache.stats.pending()
        assert pending["hits|saved"] == 4
        # Each hit adds the load time of the entry it read (about 50 ms).
        assert 4 * 0.045 <= pending["saved_seconds|saved"] <= 4 * 0.5
        assert pending["saved_seconds|saved"] == pytest.approx(4 * pending["load_seconds_sum|saved"], rel=0.01)


async def test_orm_objects_are_refused_with_advice(redis_url: str) -> None:
    async def load() -> Any:
        return {"thing": Thing(id=1)}

    async with CachingService(redis_url) as cache:
        with pytest.raises(SerializationError, match=r"^value\['thing'\]: .*ORM object.*row._asdict"):
            await cache.get_or_load("orm", {}, load)
        assert await cache.redis.exists(cache.key("orm", {})) == 0


async def test_seed_wrapper(redis_url: str) -> None:
    seen: list[dict[str, Any]] = []

    async def query(user_id: int, active: bool) -> list[int]:
        seen.append({"user_id": user_id, "active": active})
        return [user_id]

    async with CachingService(redis_url) as cache:
        assert await cache.get_cached_query_result("q", query, ttl=60, user_id=5, active=True) == [5]
        assert await cache.get_cached_query_result("q", query, active=True, user_id=5) == [5]
        assert seen == [{"user_id": 5, "active": True}]


async def test_stats_flush_is_periodic_and_exact(redis_url: str) -> None:
    async with CachingService(redis_url, stats_key="s:stats", stats_flush_interval=0.1, instance="me") as cache:
        for _ in range(3):
            await cache.get_or_load("f", {}, counting_loader()[1], ttl=60)
        await asyncio.sleep(0.35)
        stored = await cache.redis.hgetall("s:stats")
        assert stored[b"hits|f"] == b"2" and stored[b"misses|f"] == b"1"
        assert float(stored[b"flush_ts|me"]) == pytest.approx(time.time(), abs=2)
        # A batch whose reply was lost is resent unchanged and applied once.
        cache.stats.hit("f")
        await cache.stats.flush(cache.redis)
        batch = cache.stats._seq
        from exporter.cache.stats import _Batch

        cache.stats._pending = _Batch(batch, {"hits|f": 1}, {})
        await cache.stats.flush(cache.redis)
        assert (await cache.redis.hget("s:stats", "hits|f")) == b"3"
    async with aredis.Redis.from_url(redis_url) as r:
        assert await r.hexists("s:stats", "flush_ts|me") == 0  # a clean close forgets the instance


async def test_remembered_keys_keep_types_apart() -> None:
    cache = CachingService("redis://127.0.0.1:1/0")
    try:
        for _ in range(2):  # computed, then remembered
            keys = [cache.key("n", {"a": v}) for v in (1, True, 1.0, "1", None)]
            assert len(set(keys)) == 5
            assert keys[0] == cache.key("n", {"a": 1}) == cache.key("n", {"a": 1, **{}})
            assert cache.key("n", {"a": 1, "b": 2}) == cache.key("n", {"b": 2, "a": 1})
            assert cache.key("m", {"a": 1}) != keys[0]
    finally:
        await cache.close()
