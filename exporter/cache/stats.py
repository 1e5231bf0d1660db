"""Cache counters: incremented in memory, flushed to one Redis hash, read back by the exporter.

Field scheme of the stats hash (``stats_key``, default ``pgcache:stats``). The namespace (or the
instance name) is always the *last* component, after a fixed number of ``|`` separators for the
field's kind, so it may contain any character, ``|`` included, and still parse unambiguously
(split on the first 1 or 2 ``|``)::

    hits|<ns>                     reads answered from the cache (fresh)
    misses|<ns>                   reads that found nothing (the loader ran, or another one did)
    stale_served|<ns>             expired entries served while a refresh ran (stale_ttl > 0)
    loads|<ns>                    loader runs
    load_seconds_sum|<ns>         sum of loader durations (HINCRBYFLOAT)
    saved_seconds|<ns>            loader time the hits avoided: each hit adds the load time of
                                  the entry it read, recorded when it was stored (HINCRBYFLOAT)
    load_bucket|<le>|<ns>         loader runs with duration <= le seconds; cumulative, like a
                                  Prometheus histogram; le is one of BUCKETS or "+Inf" (= loads)
    invalidations|<ns>            invalidate / invalidate_tags / invalidate_namespace calls
    invalidated_keys|<ns>         entries they removed
    lock_waits|<ns>               misses that waited for another process's load
    errors|<operation>|<ns>       failed Redis operations; operation is one of ERROR_OPERATIONS
    flush_ts|<instance>           unix time of the instance's last successful flush (HSET)
    flush_seq|<instance>          "<run token> <sequence>" of the last applied flush (internal)

hits, misses and stale_served are disjoint outcomes of a read that reached Redis; a read that
failed is counted under errors|get instead. Operations not tied to one namespace (a flush, a
pattern delete, a tag invalidation that found no entry) use the empty namespace. All values are integers except load_seconds_sum and saved_seconds.

A flush applies every delta with HINCRBY / HINCRBYFLOAT in one server-side script, atomically, and
records the batch's sequence number in the same step. A flush that fails keeps its batch and
resends it unchanged; if the failure happened after Redis had applied it (a lost reply), the
sequence number makes the resend a no-op. So no delta is lost and none is counted twice.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BUCKETS",
    "ERROR_OPERATIONS",
    "CacheStats",
    "NamespaceStats",
    "StatsSnapshot",
    "default_instance",
    "parse_stats",
]

BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BUCKET_LABELS: tuple[str, ...] = (*(repr(b) for b in BUCKETS), "+Inf")
ERROR_OPERATIONS = (
    "get", "set", "delete", "lock", "invalidate", "flush", "decode", "breaker_open",
)
COUNTER_KINDS = (
    "hits", "misses", "stale_served", "loads", "invalidations", "invalidated_keys", "lock_waits",
)


def default_instance() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# KEYS[1] stats hash; ARGV: seq field, "<token> <seq>" token, seq, ts field, ts value, then
# (kind, field, amount) triples with kind "i" (HINCRBY) or "f" (HINCRBYFLOAT).
_FLUSH_LUA = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local sp = string.find(cur, ' ', 1, true)
  if sp and string.sub(cur, 1, sp - 1) == ARGV[2]
     and tonumber(string.sub(cur, sp + 1)) >= tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3], ARGV[4], ARGV[5])
for i = 6, #ARGV, 3 do
  if ARGV[i] == 'i' then
    redis.call('HINCRBY', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  else
    redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  end
end
return 1
"""


@dataclass
class _Batch:
    seq: int
    ints: dict[str, int]
    floats: dict[str, float]


class CacheStats:
    """In-memory deltas since the last flush. Not thread-safe: one event loop owns it."""

    def __init__(self, stats_key: str, instance: str | None = None) -> None:
        self.stats_key = stats_key
        self.instance = instance or default_instance()
        self._token = secrets.token_hex(8)  # tells this run's sequence numbers from a restart's
        self._seq = 0
        self._ints: defaultdict[str, int] = defaultdict(int)
        self._floats: defaultdict[str, float] = defaultdict(float)
        self._pending: _Batch | None = None

    # -- counting (the hot path: one dict update) -------------------------------------------
    def hit(self, ns: str, saved_seconds: float = 0.0) -> None:
        self._ints["hits|" + ns] += 1
        if saved_seconds:
            self._floats["saved_seconds|" + ns] += saved_seconds

    def miss(self, ns: str) -> None:
        self._ints["misses|" + ns] += 1

    def stale_served(self, ns: str) -> None:
        self._ints["stale_served|" + ns] += 1

    def lock_wait(self, ns: str) -> None:
        self._ints["lock_waits|" + ns] += 1

    def error(self, ns: str, operation: str) -> None:
        assert operation in ERROR_OPERATIONS, operation
        self._ints[f"errors|{operation}|{ns}"] += 1

    def invalidation(self, ns: str, keys: int) -> None:
        self._ints["invalidations|" + ns] += 1
        self._ints["invalidated_keys|" + ns] += keys

    def load(self, ns: str, seconds: float) -> None:
        self._ints["loads|" + ns] += 1
        self._floats["load_seconds_sum|" + ns] += seconds
        for le, label in zip(BUCKETS, BUCKET_LABELS, strict=False):
            if seconds <= le:
                self._ints[f"load_bucket|{label}|{ns}"] += 1
        self._ints[f"load_bucket|+Inf|{ns}"] += 1

    def pending(self) -> dict[str, int | float]:
        """Deltas not yet in Redis (unsent and in a failed batch), for tests and debugging."""
        out: dict[str, int | float] = {}
        batches: list[tuple[dict[str, int], dict[str, float]]] = [(self._ints, self._floats)]
        if self._pending is not None:
            batches.append((self._pending.ints, self._pending.floats))
        for ints, floats in batches:
            for k, n in ints.items():
                out[k] = out.get(k, 0) + n
            for k, x in floats.items():
                out[k] = out.get(k, 0.0) + x
        return out

    # -- flushing ---------------------------------------------------------------------------
    async def flush(self, client: Any) -> None:
        """Send the deltas (raises on failure; the deltas are then kept for the next call)."""
        if self._pending is not None:
            await self._send(client, self._pending)
            self._pending = None
        self._seq += 1
        self._pending = _Batch(self._seq, dict(self._ints), dict(self._floats))
        self._ints.clear()
        self._floats.clear()
        await self._send(client, self._pending)
        self._pending = None

    async def _send(self, client: Any, batch: _Batch) -> None:
        args: list[str | int | float] = [
            "flush_seq|" + self.instance, self._token, batch.seq,
            "flush_ts|" + self.instance, repr(time.time()),
        ]
        for k, n in batch.ints.items():
            if n:
                args += ["i", k, n]
        for k, x in batch.floats.items():
            if x:
                args += ["f", k, repr(x)]
        await client.eval(_FLUSH_LUA, 1, self.stats_key, *args)

    async def forget_instance(self, client: Any) -> None:
        """Remove this instance's bookkeeping fields (on a clean shutdown)."""
        await client.hdel(self.stats_key, "flush_ts|" + self.instance, "flush_seq|" + self.instance)


# -- reading (the exporter side) -------------------------------------------------------------


@dataclass
class NamespaceStats:
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_KINDS, 0))
    errors: dict[str, int] = field(default_factory=dict)
    # Cumulative bucket counts by upper bound (math.inf for +Inf).
    buckets: dict[float, int] = field(default_factory=dict)
    load_seconds_sum: float = 0.0
    saved_seconds: float = 0.0

    @property
    def activity(self) -> int:
        """How busy the namespace is, to keep the busiest when the count is bounded."""
        c = self.counters
        return c["hits"] + c["misses"] + c["stale_served"] + c["loads"] + c["invalidations"] + sum(
            self.errors.values()
        )


@dataclass
class StatsSnapshot:
    namespaces: dict[str, NamespaceStats] = field(default_factory=dict)
    flush_timestamps: dict[str, float] = field(default_factory=dict)
    unparsed: int = 0


def _text(x: bytes | str) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else x


# Redis counters are signed 64-bit: anything beyond is not a counter a writer produced.
_MAX_COUNT = 2**63 - 1


def _count(v: str) -> int:
    """A counter value; negative or absurd ones are refused (ValueError: counted as unparsed)."""
    n = int(v)
    if not 0 <= n <= _MAX_COUNT:
        raise ValueError(v)
    return n


def _amount(v: str) -> float:
    """A sum or timestamp; negative, NaN and infinite ones are refused."""
    x = float(v)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(v)
    return x


def parse_stats(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> StatsSnapshot:
    """The stats hash as read by HGETALL, per namespace. Fields it does not know are counted in
    ``unparsed`` (and otherwise ignored) so a newer writer never breaks an older reader."""
    snap = StatsSnapshot()
    items: Iterable[tuple[Any, Any]] = fields.items()

    def ns_stats(ns: str) -> NamespaceStats:
        got = snap.namespaces.get(ns)
        if got is None:
            got = snap.namespaces[ns] = NamespaceStats()
        return got

    for raw_k, raw_v in items:
        k, v = _text(raw_k), _text(raw_v)
        kind, sep, rest = k.partition("|")
        try:
            if not sep:
                raise ValueError(k)
            if kind in COUNTER_KINDS:
                ns_stats(rest).counters[kind] = _count(v)
            elif kind == "errors":
                op, sep2, ns = rest.partition("|")
                if not sep2:
                    raise ValueError(k)
                ns_stats(ns).errors[op] = _count(v)
            elif kind == "load_bucket":
                le_text, sep2, ns = rest.partition("|")
                if not sep2:
                    raise ValueError(k)
                le = math.inf if le_text == "+Inf" else float(le_text)
                ns_stats(ns).buckets[le] = _count(v)
            elif kind == "load_seconds_sum":
                ns_stats(rest).load_seconds_sum = _amount(v)
            elif kind == "saved_seconds":
                ns_stats(rest).saved_seconds = _amount(v)
            elif kind == "flush_ts":
                snap.flush_timestamps[rest] = _amount(v)
            elif kind == "flush_seq":
                pass
            else:
                raise ValueError(k)
        except ValueError:
            snap.unparsed += 1
    return snap
