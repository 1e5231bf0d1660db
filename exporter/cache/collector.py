"""`cache`: the application caches' counters (the stats hash CachingService flushes to) and a small
Redis health set from INFO, for one configured Redis target.

Namespaces are bounded by ``max_namespaces``: the busiest are kept (by hits + misses + stale +
loads + invalidations + errors, ties by name, so the choice is stable between runs), and the series
of the others are counted in ``CollectResult.dropped``. The same bound applies to the instances
in ``pgcache_cache_stats_flush_timestamp_seconds`` (the most recent flushes are kept).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..collector import Collector, CollectResult
from ..config import CacheSettings, RedisTargetConfig
from ..errors import ConnectError, QueryError
from .service import redis_client
from .stats import BUCKETS, NamespaceStats, StatsSnapshot, parse_stats

__all__ = ["CacheCollector", "cache_families", "redis_families"]

_COUNTERS = (
    ("hits", "pgcache_cache_hits", "Cache reads answered from Redis with a fresh entry."),
    ("misses", "pgcache_cache_misses", "Cache reads that found no entry (errors are not misses)."),
    ("stale_served", "pgcache_cache_stale_served", "Expired entries served while one caller refreshed them."),
    ("loads", "pgcache_cache_loads", "Loader (database query) runs after a miss or for a refresh."),
    ("invalidations", "pgcache_cache_invalidations", "Invalidation calls (by key, tag, namespace or pattern)."),
    ("invalidated_keys", "pgcache_cache_invalidated_keys", "Cache entries removed by invalidations."),
    ("lock_waits", "pgcache_cache_lock_waits", "Misses that waited for another process to load the same entry."),
)


def _le(bound: float) -> str:
    # The label text prometheus_client itself writes for histogram bounds (0.1, 1.0, 2.5, ...).
    return repr(float(bound))


def _select(snap: StatsSnapshot, limit: int) -> tuple[list[str], list[str]]:
    ranked = sorted(snap.namespaces, key=lambda ns: (-snap.namespaces[ns].activity, ns))
    return sorted(ranked[:limit]), ranked[limit:]


def _namespace_families(target: str, namespaces: Mapping[str, NamespaceStats]) -> list[Metric]:
    fams: list[Metric] = []
    for kind, name, doc in _COUNTERS:
        fam = CounterMetricFamily(name, doc, labels=["target", "namespace"])
        for ns, st in namespaces.items():
            fam.add_metric([target, ns], st.counters[kind])
        fams.append(fam)
    errors = CounterMetricFamily(
        "pgcache_cache_errors",
        "Failed Redis operations of the caching library, by operation (breaker_open: calls that "
        "skipped Redis while the circuit breaker was open).",
        labels=["target", "namespace", "operation"],
    )
    saved = CounterMetricFamily(
        "pgcache_cache_saved_seconds",
        "Loader (database) time the cache hits avoided: each hit adds the load time of the entry it read.",
        labels=["target", "namespace"],
    )
    hist = HistogramMetricFamily(
        "pgcache_cache_load_duration_seconds",
        "Duration of loader runs (the database query behind a miss).",
        labels=["target", "namespace"],
    )
    for ns, st in namespaces.items():
        for op in sorted(st.errors):
            errors.add_metric([target, ns, op], st.errors[op])
        saved.add_metric([target, ns], st.saved_seconds)
        count = st.buckets.get(math.inf, st.counters["loads"])
        buckets = [(_le(le), float(st.buckets.get(le, 0))) for le in BUCKETS]
        hist.add_metric([target, ns], [*buckets, ("+Inf", float(count))], st.load_seconds_sum)
    return [*fams, errors, saved, hist]


def cache_families(target: str, snap: StatsSnapshot, limit: int) -> tuple[list[Metric], int]:
    """The pgcache_cache_* families, and how many series the namespace bound cut."""
    keep, cut = _select(snap, limit)
    fams = _namespace_families(target, {ns: snap.namespaces[ns] for ns in keep})
    dropped = 0
    if cut:
        dropped = sum(len(f.samples) for f in _namespace_families(target, {ns: snap.namespaces[ns] for ns in cut}))
    flush = GaugeMetricFamily(
        "pgcache_cache_stats_flush_timestamp_seconds",
        "When each application instance last flushed its cache counters (unix time).",
        labels=["target", "instance"],
    )
    recent = sorted(snap.flush_timestamps.items(), key=lambda kv: (-kv[1], kv[0]))
    for instance, ts in sorted(recent[:limit]):
        flush.add_metric([target, instance], ts)
    dropped += max(0, len(recent) - limit)
    rejected = GaugeMetricFamily(
        "pgcache_cache_stats_rejected_fields",
        "Fields of the stats hash refused in the last read: unknown, malformed, or values no "
        "writer produces (negative, non-finite, beyond 64 bits).",
        labels=["target"],
    )
    rejected.add_metric([target], snap.unparsed)
    return [*fams, flush, rejected], dropped


def _num(info: Mapping[str, Any], key: str) -> float:
    try:
        return float(info.get(key, 0))
    except (TypeError, ValueError):
        return 0.0


def redis_up_family(target: str, up: bool) -> Metric:
    fam = GaugeMetricFamily(
        "pgcache_redis_up", "1 when the Redis target answered its last collection, 0 when it could not be reached.",
        labels=["target"],
    )
    fam.add_metric([target], 1 if up else 0)
    return fam


def redis_families(target: str, infos: Sequence[Mapping[str, Any]]) -> list[Metric]:
    """The small Redis health set; on a cluster, summed over the masters."""
    def total(key: str) -> float:
        return sum(_num(i, key) for i in infos)

    out: list[Metric] = [redis_up_family(target, True)]
    for name, key, doc in (
        ("pgcache_redis_keyspace_hits", "keyspace_hits", "Successful key lookups in Redis (INFO keyspace_hits)."),
        ("pgcache_redis_keyspace_misses", "keyspace_misses", "Failed key lookups in Redis (INFO keyspace_misses)."),
        ("pgcache_redis_evicted_keys", "evicted_keys", "Keys evicted because of maxmemory (INFO evicted_keys)."),
    ):
        c = CounterMetricFamily(name, doc, labels=["target"])
        c.add_metric([target], total(key))
        out.append(c)
    for name, key, doc in (
        ("pgcache_redis_memory_used_bytes", "used_memory", "Memory Redis has allocated (INFO used_memory)."),
        ("pgcache_redis_memory_max_bytes", "maxmemory", "The maxmemory limit; 0 means no limit."),
        ("pgcache_redis_connected_clients", "connected_clients", "Client connections to Redis."),
    ):
        g = GaugeMetricFamily(name, doc, labels=["target"])
        g.add_metric([target], total(key))
        out.append(g)
    return out


class CacheCollector(Collector):
    name = "cache"

    def __init__(self, cfg: RedisTargetConfig, settings: CacheSettings) -> None:
        super().__init__(cfg.name)
        self.cfg = cfg
        self.settings = settings
        self._client: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            timeout = min(self.settings.timeout, 5.0)
            self._client = redis_client(
                self.cfg.resolved_url(), cluster=self.cfg.cluster, socket_timeout=timeout,
                connect_timeout=timeout, max_connections=4,
            )
        return self._client

    def unreachable_families(self) -> list[Metric]:
        # pgcache_redis_up 0 while Redis cannot be reached: the PgcacheRedisDown alert needs it.
        return [redis_up_family(self.target, False)]

    def _scrub(self, error: BaseException) -> str:
        text = f"{type(error).__name__}: {error}"
        url = self.cfg.resolved_url()
        secrets = [url]
        try:
            if urlsplit(url).password:
                secrets.append(str(urlsplit(url).password))
        except ValueError:
            pass
        for s in secrets:
            text = text.replace(s, "***")
        return text

    async def collect(self) -> CollectResult:
        target = self.cfg.name
        try:
            client = self._redis()
            fields = await client.hgetall(self.cfg.stats_key)
            if self.cfg.cluster:
                raw = await client.info(target_nodes=RedisCluster.PRIMARIES)
                infos = list(raw.values()) if raw and all(isinstance(v, dict) for v in raw.values()) else [raw]
            else:
                infos = [await client.info()]
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as e:
            raise ConnectError(f"Redis target {target!r} is unreachable ({self._scrub(e)})") from None
        except RedisError as e:
            raise QueryError(f"Redis target {target!r}: reading {self.cfg.stats_key!r} failed ({self._scrub(e)})") from None
        snap = parse_stats(fields)
        fams, dropped = cache_families(target, snap, self.settings.max_namespaces)
        return CollectResult(fams + redis_families(target, infos), dropped)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def cache_family_samples() -> list[Metric]:
    """Every family this collector can produce, built from a sample of each input (one namespace
    with an error, one flush, one INFO): what `exporter.catalog` lists, from this code itself."""
    ns = NamespaceStats(errors={"get": 1})
    snap = StatsSnapshot(namespaces={"ns": ns}, flush_timestamps={"app-1": 1.0})
    fams, _ = cache_families("t", snap, 10)
    return [*fams, redis_up_family("t", True), *redis_families("t", [{}])]
