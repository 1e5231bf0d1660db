"""Property-based tests: no input crashes the config loader, the duration and size parsers or the
cache key builder with anything but their documented errors."""

from __future__ import annotations

import datetime as dt
import tempfile
import uuid
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import PydanticCustomError

from exporter.cache.keys import KeyParamError, cache_key
from exporter.config import ConfigError, build_config, load_config, parse_duration, parse_size

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30),
    st.binary(max_size=10),
)
yaml_like = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=20,
)
config_keys = st.sampled_from(
    ["web", "log", "postgres", "redis", "collectors", "shard", "name", "dsn", "url", "interval",
     "timeout", "limit", "activity", "statements", "listen_address", "level", "databases", "include"]
)
config_like = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(config_keys, st.text(max_size=8)), children, max_size=4),
    ),
    max_leaves=25,
)


@given(st.one_of(scalars, st.text(alphabet="0123456789.msdhw -+eE", max_size=20)))
def test_duration_parser_only_raises_its_error(value: object) -> None:
    try:
        seconds = parse_duration(value)
    except PydanticCustomError as e:
        assert "is not a duration" in str(e)
    else:
        assert isinstance(seconds, float) and 0 <= seconds < float("inf")


@given(st.one_of(scalars, st.text(alphabet="0123456789.kKmMgGtTiIbB ", max_size=20)))
def test_size_parser_only_raises_its_error(value: object) -> None:
    try:
        size = parse_size(value)
    except PydanticCustomError as e:
        assert "is not a size" in str(e)
    else:
        assert isinstance(size, int) and size >= 0


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(config_keys, config_like, max_size=5))
def test_config_builder_only_raises_config_error(raw: dict) -> None:
    try:
        build_config(raw)
    except ConfigError as e:
        assert str(e)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_config_loader_on_any_file_text(body: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_bytes(body.encode("utf-8", "surrogatepass"))
        try:
            load_config(p, env={})
        except ConfigError as e:
            assert str(e)


param_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
        st.datetimes(timezones=st.one_of(st.none(), st.timezones())), st.uuids(), st.decimals(),
        st.dates(), st.binary(max_size=5), st.just(object()), st.just({1, 2}),
    ),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), c, max_size=3)),
    max_leaves=10,
)


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=8), param_values, max_size=4))
def test_key_builder_only_raises_key_param_error(params: dict) -> None:
    try:
        key = cache_key("pgcache", "users", params)
    except KeyParamError as e:
        assert str(e)
    else:
        assert key.startswith("pgcache:{users}:")
        # Deterministic and order-independent.
        assert cache_key("pgcache", "users", dict(reversed(list(params.items())))) == key


def test_key_examples_are_stable() -> None:
    when = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=9)))
    a = cache_key("p", "n", {"at": when, "id": uuid.UUID(int=5), "amount": Decimal("1.50")})
    b = cache_key("p", "n", {"amount": Decimal("1.5"), "id": uuid.UUID(int=5), "at": when.astimezone(dt.UTC)})
    assert a == b


def test_query_text_never_carries_password_literals() -> None:
    from exporter.postgres.statements import query_text_label

    cases = {
        "CREATE ROLE x LOGIN PASSWORD 'Se''cret-1' IN ROLE pg_monitor": "Se''cret-1",
        "ALTER USER bob WITH ENCRYPTED PASSWORD E'ab\\'c-Secret-2' VALID UNTIL 'infinity'": "Secret-2",
        "ALTER ROLE a PASSWORD $pw$Secret-3$pw$": "Secret-3",
        "SELECT dblink_connect('host=h password=Secret-4 dbname=x')": "Secret-4",
        "SELECT * FROM dblink('postgresql://u:Secret-5@h/db', 'select 1')": "Secret-5",
    }
    for query, secret in cases.items():
        label = query_text_label(query, 500)
        assert label is not None and secret not in label and "***" in label, label
    assert query_text_label("SELECT password FROM users WHERE id = $1", 100) == "SELECT password FROM users WHERE id = $1"
