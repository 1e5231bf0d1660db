"""A separate application process for the cache tests (run as a script by subprocess).

    worker.py stampede URL START_AT     one get_or_load on a cold key at START_AT (unix time);
                                        the loader INCRs test:loads; prints the value as JSON
    worker.py counters URL STATS_KEY I  a known mix of hits, misses, loads and invalidations
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson

from exporter.cache import CachingService


async def stampede(url: str, start_at: float) -> None:
    async with CachingService(url, instance=f"stampede-{start_at}") as cache:

        async def loader() -> dict[str, int]:
            n = int(await cache.redis.incr("test:loads"))
            await asyncio.sleep(0.5)
            return {"loaded_by_call": n}

        await asyncio.sleep(max(0.0, start_at - time.time()))
        value = await cache.get_or_load("stampede", {"k": 1}, loader, ttl=30)
        print(orjson.dumps(value).decode(), flush=True)


async def counters(url: str, stats_key: str, i: int) -> None:
    # Process i: (3 + i) misses and loads in "proc", then as many hits, then one invalidation.
    async with CachingService(url, stats_key=stats_key, instance=f"proc-{i}") as cache:

        async def loader() -> int:
            await asyncio.sleep(0.01)  # so each hit saves a measurable load time
            return i

        for rnd in range(2):
            for n in range(3 + i):
                await cache.get_or_load("proc", {"n": n, "i": i, "round": 0 * rnd}, loader, ttl=30)
        await cache.invalidate("proc", {"n": 0, "i": i, "round": 0})


def main() -> None:
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "stampede":
        asyncio.run(stampede(url, float(sys.argv[3])))
    elif mode == "counters":
        asyncio.run(counters(url, sys.argv[3], int(sys.argv[4])))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
