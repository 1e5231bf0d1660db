"""The library and the collector on a real 3-master Redis Cluster started by the suite."""

from __future__ import annotations

import asyncio

from redis.asyncio import RedisCluster

from exporter.cache import CachingService
from exporter.cache.collector import CacheCollector
from exporter.config import CacheSettings, RedisTargetConfig


async def test_caching_tags_namespaces_and_stats_on_a_cluster(cluster_url: str) -> None:
    loads: list[tuple[str, int]] = []

    def loader(ns: str, uid: int):  # type: ignore[no-untyped-def]
        async def load() -> dict[str, int]:
            loads.append((ns, uid))
            await asyncio.sleep(0.01)
            return {"uid": uid}
        return load

    namespaces = [f"ns{i}" for i in range(12)]  # hash tags spread over the three masters
    async with CachingService(cluster_url, cluster=True, stats_key="cl:stats") as cache:
        client: RedisCluster = cache.redis
        await client.initialize()
        slots_nodes = {client.get_node_from_key(cache.key(ns, {})).name for ns in namespaces}
        assert len(slots_nodes) == 3, "test namespaces should cover every master"

        async def warm() -> None:
            for ns in namespaces:
                for uid in (1, 10, 100):
                    await cache.get_or_load(ns, {"user_id": uid}, loader(ns, uid), ttl=60, tags=[f"user:{uid}"])

        await warm()
        assert len(loads) == 36
        loads.clear()
        await warm()
        assert loads == []  # all hits

        # Concurrency on a cold key, across the cluster: once.
        loads.clear()
        got = await asyncio.gather(*(cache.get_or_load("cold", {}, loader("cold", 0), ttl=60) for _ in range(50)))
        assert got == [{"uid": 0}] * 50 and loads == [("cold", 0)]

        loads.clear()
        assert await cache.invalidate_tags("user:1") == 12  # members live on every master
        await warm()
        assert sorted(loads) == sorted((ns, 1) for ns in namespaces)

        loads.clear()
        assert await cache.invalidate("ns3", {"user_id": 10}) == 1
        assert await cache.invalidate_namespace("ns5") == 3
        await warm()
        assert sorted(loads) == sorted([("ns3", 10), ("ns5", 1), ("ns5", 10), ("ns5", 100)])
        assert await cache.invalidate_pattern("pgcache:{ns7}:*") == 3
        assert await cache.flush_stats()

    cfg = RedisTargetConfig(name="cl", url=cluster_url, stats_key="cl:stats", cluster=True)  # type: ignore[arg-type]
    collector = CacheCollector(cfg, CacheSettings(max_namespaces=5))
    try:
        result = await collector.collect()
    finally:
        await collector.close()
    fams = {f.name: f for f in result.families}
    hits = {s.labels["namespace"]: s.value for s in fams["pgcache_cache_hits"].samples}
    misses = {s.labels["namespace"]: s.value for s in fams["pgcache_cache_misses"].samples}
    # The busiest five are kept: "cold" (50 reads), ns5 (two invalidations, 7 loads), ns3 and ns7
    # (two invalidations each), then ns0 of the equally busy rest (ties go by name).
    assert set(hits) == {"cold", "ns5", "ns3", "ns7", "ns0"}
    assert hits["cold"] + misses["cold"] == 50
    assert (misses["ns5"], hits["ns5"]) == (7, 5)
    assert (misses["ns3"], hits["ns3"]) == (5, 7)
    # Seven counters, saved seconds and a 16-sample histogram for each of the 8 namespaces cut.
    assert result.dropped == 8 * (8 + 16)
    used = [s.value for s in fams["pgcache_redis_memory_used_bytes"].samples]
    assert used and used[0] > 0
    assert [s.value for s in fams["pgcache_redis_up"].samples] == [1]
