"""A value read from the cache is the value the loader returned, type for type: a property test
with hypothesis (pure, then through a real Redis), and the refusals that name the path."""

from __future__ import annotations

import collections
import datetime as dt
import enum
import ipaddress
import pickle
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from exporter.cache import (
    CachingService,
    JsonSerializer,
    PayloadError,
    SerializationError,
    SignedPickleSerializer,
    tagged,
)


class Color(enum.Enum):
    RED = "red"
    BLUE = (1, 2)


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4


offsets = st.integers(-1439, 1439).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
named = st.builds(lambda m, n: dt.timezone(dt.timedelta(minutes=m), n), st.integers(-600, 600), st.text(min_size=1, max_size=5))
hashable = st.one_of(
    st.integers(), st.text(max_size=8), st.uuids(), st.dates(), st.booleans(), st.none(),
    st.decimals(allow_nan=False), st.binary(max_size=8), st.sampled_from(Level),
)
leaves = st.one_of(
    hashable,
    st.integers(min_value=2**64, max_value=2**200) | st.integers(max_value=-(2**63) - 1, min_value=-(2**200)),
    st.floats(allow_nan=False),
    st.binary().map(bytearray),
    st.datetimes(),
    st.datetimes(timezones=st.timezones()),
    st.datetimes(timezones=offsets | named | st.just(dt.UTC)),
    st.times(), st.times(timezones=offsets | st.timezones()),
    st.timedeltas(),
    st.sampled_from(Color), st.sampled_from(Level), st.sampled_from(Perm), st.just(Perm.R | Perm.W),
    st.ip_addresses(), st.ip_addresses(v=4).map(lambda a: ipaddress.ip_network(a)),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(st.text(max_size=8), inner, max_size=5),
        st.dictionaries(hashable, inner, max_size=4),
        st.sets(hashable, max_size=4),
        st.frozensets(hashable | st.tuples(hashable, hashable), max_size=4),
    ),
    max_leaves=25,
)


def shape(x: Any) -> Any:
    """Type and exact text of every part (repr keeps tzinfo, fold, Decimal exponent, -0.0)."""
    t = type(x).__name__
    if isinstance(x, dict) and type(x) is dict:
        return (t, [(shape(k), shape(v)) for k, v in x.items()])
    if type(x) in (list, tuple):
        return (t, [shape(v) for v in x])
    if type(x) in (set, frozenset):
        return (t, sorted(repr(shape(v)) for v in x))
    return (t, repr(x))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_exact_roundtrip_pure(value: Any) -> None:
    back = tagged.loads(tagged.dumps(value))
    assert shape(back) == shape(value)
    assert back == value


def test_nan_and_special_floats_roundtrip() -> None:
    back = tagged.loads(tagged.dumps([float("nan"), float("inf"), -float("inf"), -0.0]))
    assert repr(back) == "[nan, inf, -inf, -0.0]"


async def test_hit_equals_miss_type_for_type_through_redis(redis_url: str) -> None:
    generated: list[Any] = []

    @settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(values)
    def collect(value: Any) -> None:
        generated.append(value)

    collect()
    assert len(generated) >= 500
    async with CachingService(redis_url, stats_flush_interval=3600) as cache:
        for i, value in enumerate(generated):
            async def load(v: Any = value) -> Any:
                return v

            miss = await cache.get_or_load("prop", {"i": i}, load, ttl=60)
            hit = await cache.get_or_load("prop", {"i": i}, load, ttl=60)
            assert miss is value
            assert shape(hit) == shape(miss), (i, value)
            assert hit == miss
        pending = cache.stats.pending()
        assert pending["hits|prop"] == pending["misses|prop"] == len(generated)


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "thing"
    id: Mapped[int] = mapped_column(primary_key=True)


class OtherTZ(dt.tzinfo):
    def utcoffset(self, d: Any) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, d: Any) -> str:
        return "other"

    def dst(self, d: Any) -> dt.timedelta:
        return dt.timedelta(0)


class Holder:
    def __init__(self, inner: Any) -> None:
        self.inner = inner


@pytest.mark.parametrize(
    ("value", "where", "what"),
    [
        ({"user": [1, {"row": Thing(id=1)}]}, "value['user'][1]['row']", "ORM object"),
        ((1, {2: object()}), "value[1][2]", "builtins.object"),
        ({"od": collections.OrderedDict(a=1)}, "value['od']", "OrderedDict"),
        ([collections.namedtuple("P", "x")(1)], "value[0]", "namedtuple"),
        ({"s": "bad\ud800"}, "value['s']", "surrogate"),
        ({"when": dt.datetime(2024, 1, 1, tzinfo=OtherTZ())}, "value['when']", "tzinfo"),
    ],
)
def test_refused_when_written_with_the_path(value: Any, where: str, what: str) -> None:
    with pytest.raises(SerializationError) as err:
        JsonSerializer().dumps(value)
    assert str(err.value).startswith(where + ":"), str(err.value)
    assert what in str(err.value)


def test_pickle_refuses_orm_objects_at_any_depth() -> None:
    ser = SignedPickleSerializer(b"k" * 32)
    for value, where in [
        ({"user": Thing(id=1)}, "value['user']"),
        ([{"a": (Thing(id=2),)}], "value[0]['a'][0]"),
        ({"h": Holder(Holder(Thing(id=3)))}, "value['h'].inner.inner"),
    ]:
        with pytest.raises(SerializationError, match="ORM object") as err:
            ser.dumps(value)
        assert str(err.value).startswith(where + ":"), str(err.value)
    assert pickle.loads(ser.dumps({"ok": (1, {2})})[32:]) == {"ok": (1, {2})}


def test_damaged_payloads_are_payload_errors() -> None:
    for data in (b"#not json\n[]", b'#["D",{"a":"nope"}]\n{"a":1}', b"#[\"L\",{\"*\":\"dt\"}]\n[\"x\"]", b"{"):
        with pytest.raises(PayloadError):
            tagged.loads(data)
    # An enum of a module this process never imported is not imported by a reader: a miss.
    with pytest.raises(PayloadError, match="not loaded"):
        tagged.loads(b'#"e"\n["no_such_module_xyz","E","A"]')


def test_uuid_subclasses_come_back_as_uuid() -> None:
    class DriverUUID(uuid.UUID):  # what asyncpg hands out
        pass

    u = DriverUUID(int=12345)
    back = tagged.loads(tagged.dumps({"id": u}))
    assert type(back["id"]) is uuid.UUID and back["id"] == u


async def test_entries_stay_readable(redis_url: str) -> None:
    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    async with CachingService(redis_url) as cache:
        async def load() -> Any:
            return [{"title": "post 9", "created_at": when}, {"title": "post 8", "created_at": when}]

        await cache.get_or_load("readable", {}, load, ttl=60)
        raw = await cache.redis.get(cache.key("readable", {}))
    header, skeleton, body = raw.split(b"\n")
    assert header.startswith(b"pc2 J ")
    assert skeleton == b'#["L",{"*":["D",{"created_at":"dt"}]}]'  # one entry for all rows
    assert body.startswith(b'[{"title":"post 9","created_at":"2024-05-01T12:00:00+00:00"}')
