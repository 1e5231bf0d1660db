"""Cache keys and the stats field scheme: pure functions, no server."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from decimal import Decimal
from typing import Any

import pytest

from exporter.cache.keys import (
    KeyParamError,
    cache_key,
    canonical_params,
    check_namespace,
    lock_key,
    namespace_of,
    namespace_pattern,
    params_digest,
)
from exporter.cache.stats import CacheStats, parse_stats


class Color(enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    ONE = 1


def test_key_shape_and_order_independence() -> None:
    a = cache_key("pgcache", "user_stats", {"user_id": 1, "active": True, "tags": ["x", "y"]})
    b = cache_key("pgcache", "user_stats", {"tags": ["x", "y"], "active": True, "user_id": 1})
    assert a == b
    prefix, ns, digest = a.split(":")
    assert (prefix, ns, len(digest)) == ("pgcache", "{user_stats}", 32)
    assert cache_key("pgcache", "user_stats", {"user_id": 2}) != cache_key("pgcache", "user_stats", {"user_id": 1})
    assert cache_key("pgcache", "other", {"user_id": 1}) != cache_key("pgcache", "user_stats", {"user_id": 1})
    nested1 = {"f": {"b": 1, "a": {"y": 2, "x": 3}}}
    nested2 = {"f": {"a": {"x": 3, "y": 2}, "b": 1}}
    assert params_digest(nested1) == params_digest(nested2)


@pytest.mark.parametrize(
    "values",
    [
        [1, 1.0, "1", True, Decimal(1), Size.ONE, [1], {"$int": "1"}],
        [None, "None", "null", 0, False, []],
        [b"ab", "ab", "YWI="],
        [dt.date(2024, 1, 2), "2024-01-02", dt.datetime(2024, 1, 2)],
        [Color.RED, "red"],
        [{"$dt": "2024-01-01T00:00:00"}, dt.datetime(2024, 1, 1, tzinfo=dt.UTC)],
        [dt.datetime(2024, 1, 1, 12), dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC)],
    ],
)
def test_different_types_never_share_a_key(values: list[Any]) -> None:
    digests = [params_digest({"p": v}) for v in values]
    assert len(set(digests)) == len(values), values


def test_equal_values_share_a_key() -> None:
    utc = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    tokyo = utc.astimezone(dt.timezone(dt.timedelta(hours=9)))
    assert params_digest({"t": utc}) == params_digest({"t": tokyo})
    assert params_digest({"d": Decimal("1.50")}) == params_digest({"d": Decimal("1.5")})
    assert params_digest({"d": Decimal("0E-5")}) == params_digest({"d": Decimal("0")})
    assert params_digest({"s": {3, 1, 2}}) == params_digest({"s": frozenset([2, 3, 1])})
    assert params_digest({"l": (1, 2)}) == params_digest({"l": [1, 2]})
    assert params_digest({"f": -0.0}) == params_digest({"f": 0.0})
    u = uuid.uuid4()
    assert params_digest({"u": u}) == params_digest({"u": uuid.UUID(str(u))})
    assert params_digest({"td": dt.timedelta(minutes=1)}) == params_digest({"td": dt.timedelta(seconds=60)})
    assert params_digest({"n": 2**70}) != params_digest({"n": 2**70 + 1})


def test_canonical_encoding_is_stable() -> None:
    # Changing this encoding changes every key in production caches: do it on purpose only.
    assert canonical_params({"b": [1, "x"], "a": Decimal("2.0")}) == b'{"a":{"$dec":"2"},"b":[1,"x"]}'


class Opaque:
    pass


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"user": Opaque()}, "params['user']"),
        ({"f": float("nan")}, "params['f']"),
        ({"f": float("inf")}, "params['f']"),
        ({"d": Decimal("NaN")}, "params['d']"),
        ({"x": [1, {"deep": object()}]}, "params['x'][1]['deep']"),
        ({"m": {1: "int key"}}, "params['m']"),
    ],
)
def test_unsupported_params_raise_naming_the_param(params: dict[str, Any], where: str) -> None:
    with pytest.raises(KeyParamError) as err:
        params_digest(params)
    assert str(err.value).startswith(where)
    assert isinstance(err.value, TypeError)


def test_orm_like_objects_are_refused() -> None:
    class Row:
        _sa_instance_state = object()

    with pytest.raises(KeyParamError, match="ORM object.*primary key"):
        params_digest({"user": Row()})


@pytest.mark.parametrize("bad", ["", "a{b", "c}", "x\ny", 3])
def test_namespace_validation(bad: Any) -> None:
    with pytest.raises(ValueError):
        check_namespace(bad)


def test_patterns_locks_and_namespace_parsing() -> None:
    key = cache_key("app", "a*b?[c]", {"x": 1})
    assert namespace_of("app", key) == "a*b?[c]"
    assert namespace_of("other", key) is None
    assert namespace_pattern("app", "a*b?[c]") == r"app:{a\*b\?\[c\]}:*"
    lk = lock_key(key)
    assert lk.startswith("app:lock:{a*b?[c]}:") and lk.endswith(key.rsplit(":", 1)[1])
    assert namespace_of("app", lk) is None  # a lock is not an entry


def test_stats_fields_parse_back_with_any_namespace() -> None:
    stats = CacheStats("k", instance="host:1|x")
    odd = "weird|name|with:pipes"
    stats.hit(odd)
    stats.hit(odd)
    stats.miss(odd)
    stats.error(odd, "get")
    stats.load(odd, 0.003)
    stats.load(odd, 20.0)
    stats.invalidation("", 4)
    fields = {k: str(v) for k, v in stats.pending().items()}
    fields["flush_ts|host:1|x"] = "1700000000.5"
    fields["flush_seq|host:1|x"] = "abc 3"
    fields["future_kind|ns"] = "1"
    snap = parse_stats(fields)
    ns = snap.namespaces[odd]
    assert ns.counters["hits"] == 2 and ns.counters["misses"] == 1 and ns.counters["loads"] == 2
    assert ns.errors == {"get": 1}
    assert 0.0025 not in ns.buckets  # buckets no observation fell in are not written
    assert ns.buckets[0.005] == 1 and ns.buckets[10.0] == 1 and ns.buckets[float("inf")] == 2
    assert ns.load_seconds_sum == pytest.approx(20.003)
    assert snap.namespaces[""].counters["invalidated_keys"] == 4
    assert snap.flush_timestamps == {"host:1|x": 1700000000.5}
    assert snap.unparsed == 1
