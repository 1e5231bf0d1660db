"""The cache hit path, against a raw reference and two popular libraries, in one run.

    python benchmarks/cache_bench.py            # 20 000 hits per contender, best of 3 rounds
    python benchmarks/cache_bench.py --smoke    # a few hundred, for CI: proves it runs

Every contender answers the same cached call (the popular-posts list: 20 rows as JSON-like dicts)
from one local redis-server started here, one await at a time:

    raw        redis.asyncio GET + orjson.loads of the same payload (the floor: one round trip)
    pgcache    CachingService.get_or_load (key building, header check, counters)
    cashews    @cache(ttl=...) decorator (its default pickle serializer)
    aiocache   @cached(cache=Cache.REDIS, serializer=JsonSerializer())

Ratios are per-hit time divided by raw's, measured in the same invocation, so they compare on one
machine at one moment. cashews and aiocache are benchmark-only dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
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


async def loader() -> list[dict[str, Any]]:
    return ROWS


async def timed(call: Callable[[], Awaitable[Any]], n: int, rounds: int) -> float:
    """Best-of-rounds seconds per call (the least disturbed round)."""
    for _ in range(min(n, 200)):
        await call()
    best = []
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        for _ in range(n):
            await call()
        best.append((time.perf_counter() - start) / n)
    return min(best)


async def run(n: int, rounds: int) -> dict[str, float]:
    from aiocache import Cache, cached
    from aiocache.serializers import JsonSerializer
    from cashews import Cache as CashewsCache

    results: dict[str, float] = {}
    with RedisServer() as server:
        raw_client = aredis.Redis.from_url(server.url)
        await raw_client.set("raw:popular:20", orjson.dumps(ROWS))

        async def raw() -> Any:
            return orjson.loads(await raw_client.get("raw:popular:20"))

        service = CachingService(server.url, ttl_jitter=0)
        await service.__aenter__()

        async def pgcache() -> Any:
            return await service.get_or_load("popular_posts", {"limit": 20}, loader, ttl=600)

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
            contenders = {"raw": raw, "pgcache": pgcache, "cashews": cashews_call, "aiocache": aiocache_call}
            for name, call in contenders.items():
                assert await call() == ROWS, name  # each one really answers from the cache
            hits_before = int((await raw_client.info("stats"))["keyspace_hits"])
            for name, call in contenders.items():
                results[name] = await timed(call, n, rounds)
            hits = int((await raw_client.info("stats"))["keyspace_hits"]) - hits_before
            assert hits >= 4 * n * rounds, f"expected every call to be a Redis hit, saw {hits}"
        finally:
            await service.close()
            await cashews.close()
            await aiocache_popular.cache.close()
            await raw_client.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run for CI")
    parser.add_argument("-n", type=int, default=20_000, help="hits per contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n, rounds = (300, 1) if args.smoke else (args.n, args.rounds)
    results = asyncio.run(run(n, rounds))
    ref = results["raw"]
    print(f"cache hit path, {n} calls x {rounds} rounds (best round), payload {len(orjson.dumps(ROWS))} B")
    print(f"{'contender':<10} {'us/hit':>9} {'vs raw':>8}")
    for name, sec in results.items():
        print(f"{name:<10} {sec * 1e6:9.1f} {sec / ref:7.2f}x")
    overhead = (results["pgcache"] - ref) * 1e6
    print(f"pgcache overhead over raw: {overhead:.1f} us per hit "
          f"(median of others: {statistics.median([results['cashews'], results['aiocache']]) / ref:.2f}x)")


if __name__ == "__main__":
    main()
