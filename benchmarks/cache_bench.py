"""The cache hit path, against a raw reference and two popular libraries, in one run.

    python benchmarks/cache_bench.py            # 40 interleaved rounds x 500 hits per contender
    python benchmarks/cache_bench.py --smoke    # a few hundred, for CI: proves it runs

Every contender answers the same cached call (the popular-posts list: 20 rows as JSON-like dicts)
from one local redis-server started here, one await at a time:

    raw            redis.asyncio GET + orjson.loads of the same payload (the floor: one round trip)
    pgcache        CachingService.get_or_load (key building, header check, exact decode, counters)
    cashews        @cache(ttl=...) decorator (its default pickle serializer)
    aiocache       @cached(cache=Cache.REDIS, serializer=JsonSerializer())

and the same list as the database returns it, with ``created_at`` a datetime and a Decimal
``score`` (what the exact round trip is for):

    raw_typed      GET + orjson.loads + the hand-written conversion back (fromisoformat, Decimal)
    pgcache_typed  CachingService.get_or_load (the skeleton restores the same types)

Rounds interleave the contenders (in a rotating order) and each keeps its best round, so a busy
machine slows every contender alike instead of whichever ran during the busy spell. Ratios are
per-hit time divided by the raw reference of the same payload, measured in the same invocation.
cashews and aiocache are benchmark-only dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import redis.asyncio as aredis

from exporter.cache import CachingService
from exporter.demo.servers import RedisServer

ROWS = [
    {
        "id": i, "title": f"Post number {i}", "author_username": f"user{i % 37}",
        "like_count": i * 13 % 500, "view_count": i * 101 % 20000,
        "created_at": "2024-05-01T12:00:00+00:00",
    }
    for i in range(20)
]


TYPED_ROWS = [
    {**row, "created_at": datetime(2024, 5, 1, 12, i, tzinfo=UTC), "score": Decimal(f"{i}.50")}
    for i, row in enumerate(ROWS)
]


async def loader() -> list[dict[str, Any]]:
    return ROWS


async def typed_loader() -> list[dict[str, Any]]:
    return TYPED_ROWS


async def timed(contenders: dict[str, Callable[[], Awaitable[Any]]], n: int, rounds: int) -> dict[str, float]:
    """Best-of-rounds seconds per call for each contender, rounds interleaved."""
    names = list(contenders)
    for call in contenders.values():
        for _ in range(min(n, 200)):
            await call()
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            call = contenders[name]
            gc.collect()
            start = time.perf_counter()
            for _ in range(n):
                await call()
            best[name] = min(best[name], (time.perf_counter() - start) / n)
    return best


async def run(n: int, rounds: int) -> dict[str, float]:
    from aiocache import Cache, cached
    from aiocache.serializers import JsonSerializer
    from cashews import Cache as CashewsCache

    with RedisServer() as server:
        raw_client = aredis.Redis.from_url(server.url)
        await raw_client.set("raw:popular:20", orjson.dumps(ROWS))
        await raw_client.set("raw:typed:20", orjson.dumps(TYPED_ROWS, default=str))

        async def raw() -> Any:
            return orjson.loads(await raw_client.get("raw:popular:20"))

        async def raw_typed() -> Any:
            rows = orjson.loads(await raw_client.get("raw:typed:20"))
            for row in rows:
                row["created_at"] = datetime.fromisoformat(row["created_at"])
                row["score"] = Decimal(row["score"])
            return rows

        service = CachingService(server.url, ttl_jitter=0)
        await service.__aenter__()

        async def pgcache() -> Any:
            return await service.get_or_load("popular_posts", {"limit": 20}, loader, ttl=600)

        async def pgcache_typed() -> Any:
            return await service.get_or_load("popular_typed", {"limit": 20}, typed_loader, ttl=600)

        cashews = CashewsCache()
        cashews.setup(server.url)

        @cashews(ttl="10m", key="cashews:popular:{limit}")
        async def cashews_popular(limit: int) -> list[dict[str, Any]]:
            return ROWS

        async def cashews_call() -> Any:
            return await cashews_popular(limit=20)

        @cached(
            ttl=600, cache=Cache.REDIS, serializer=JsonSerializer(), namespace="aiocache",
            endpoint="127.0.0.1", port=server.port,
        )
        async def aiocache_popular(limit: int) -> list[dict[str, Any]]:
            return ROWS

        async def aiocache_call() -> Any:
            return await aiocache_popular(limit=20)

        try:
            contenders = {"raw": raw, "pgcache": pgcache, "cashews": cashews_call, "aiocache": aiocache_call,
                          "raw_typed": raw_typed, "pgcache_typed": pgcache_typed}
            for name, call in contenders.items():
                want = TYPED_ROWS if name.endswith("_typed") else ROWS
                assert await call() == want, name  # each one really answers from the cache
            got = await pgcache_typed()
            assert [type(v) for v in got[0].values()] == [type(v) for v in TYPED_ROWS[0].values()]
            hits_before = int((await raw_client.info("stats"))["keyspace_hits"])
            results = await timed(contenders, n, rounds)
            hits = int((await raw_client.info("stats"))["keyspace_hits"]) - hits_before
            assert hits >= len(contenders) * n * rounds, f"expected every call to be a Redis hit, saw {hits}"
        finally:
            await service.close()
            await cashews.close()
            await aiocache_popular.cache.close()
            await raw_client.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run for CI")
    parser.add_argument("-n", type=int, default=500, help="hits per contender per round")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    n, rounds = (150, 2) if args.smoke else (args.n, args.rounds)
    results = asyncio.run(run(n, rounds))
    ref = results["raw"]
    print(f"cache hit path, {n} calls x {rounds} interleaved rounds (best round), payload "
          f"{len(orjson.dumps(ROWS))} B; *_typed: the same rows with a datetime and a Decimal each")
    print(f"{'contender':<14} {'us/hit':>9} {'vs raw':>8}")
    for name, sec in results.items():
        base = results["raw_typed"] if name.endswith("_typed") else ref
        print(f"{name:<14} {sec * 1e6:9.1f} {sec / base:7.2f}x")
    overhead = (results["pgcache"] - ref) * 1e6
    print(f"pgcache overhead over raw: {overhead:.1f} us per hit "
          f"(median of others: {statistics.median([results['cashews'], results['aiocache']]) / ref:.2f}x)")


if __name__ == "__main__":
    main()
