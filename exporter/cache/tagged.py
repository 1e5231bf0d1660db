"""The exact JSON encoding: a value read back equals the value written, type for type.

A value made only of JSON's own types (dict with string keys, list, str, int within 64 bits,
finite float, bool, None) is stored as plain JSON and decoded by one ``orjson.loads``: the common
case costs nothing extra on a hit. Any other supported type is written as JSON data plus a
*skeleton*: a small JSON tree, stored in front of the value, that says where the values that need
restoring are and what they were::

    #<skeleton>\\n<value>          e.g.  #["L",{"*":["D",{"created_at":"dt"}]}]\\n[{...}, ...]

so rows that all carry a ``created_at`` datetime cost one skeleton entry, not one per row, and a
reader walks only the skeleton (compiled once per skeleton shape and kept), never the whole value.
The data stays readable with ``redis-cli GET``.

Supported exactly: dict (any hashable supported keys), list, tuple, set, frozenset, str, int (any
size), float (NaN and infinities too), bool, None, bytes, bytearray, Decimal (exponent kept:
``1.50`` stays ``1.50``), datetime / time (naive; ``datetime.timezone`` offsets, named or not;
``zoneinfo.ZoneInfo`` zones; ``fold``), date, timedelta, UUID, the ``ipaddress`` types, and
``Enum`` members of classes importable by name. Subclasses of UUID (asyncpg's) come back as
``uuid.UUID``. Anything else (an ORM object, a dataclass, a namedtuple, a dict subclass, a
string with a lone surrogate, ...) raises :class:`SerializationError` naming the path inside the
value, when the value is written: never a different type on the next read.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import ipaddress
import math
import sys
import uuid
import zoneinfo
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson

__all__ = ["PayloadError", "SerializationError", "dumps", "loads", "unsupported"]


class SerializationError(TypeError):
    """A value the serializer cannot store (raised to the caller: it is a programming error)."""


class PayloadError(ValueError):
    """Bytes read from Redis that do not decode (or do not verify) with this serializer."""


_MAX_DEPTH = 120  # orjson refuses nesting beyond 254; the skeleton nests about as deep
_INT_MIN, _INT_MAX = -(2**63), 2**64
_IP_TYPES: dict[str, type[Any]] = {
    t.__name__: t
    for t in (
        ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network,
        ipaddress.IPv6Network, ipaddress.IPv4Interface, ipaddress.IPv6Interface,
    )
}


def unsupported(value: Any, path: str) -> SerializationError:
    """The error for a value this encoding (or any cache serializer) must refuse."""
    cls = type(value)
    if hasattr(value, "_sa_instance_state"):
        return SerializationError(
            f"{path}: refusing to cache a live SQLAlchemy ORM object ({cls.__name__}): it would "
            "come back detached and stale. Cache plain data instead: select columns and use "
            "row._asdict() / result.mappings(), or cache.query(session, select(...))"
        )
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__.startswith("sqlalchemy"):
        hint = "convert rows with row._asdict() or dict(row._mapping)"
    elif isinstance(value, tuple) and hasattr(value, "_asdict"):
        hint = "a namedtuple would come back as a plain tuple: cache value._asdict()"
    elif isinstance(value, dict | list | tuple | set | frozenset | str | int | float):
        hint = f"a {name} would come back as its base type: convert it first"
    elif hasattr(value, "__dataclass_fields__"):
        hint = "a dataclass would come back as a dict: cache dataclasses.asdict(value)"
    else:
        hint = "convert it to plain data (dicts, lists, numbers, strings, datetimes, ...)"
    return SerializationError(f"{path}: a {name} cannot be cached exactly; {hint}")


def _tz_spec(tz: dt.tzinfo | None, path: str, value: Any) -> Any:
    """None, ["z", key] or ["o", seconds, microseconds, name or None]."""
    if tz is None:
        return None
    if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
        return ["z", tz.key]
    if type(tz) is dt.timezone:
        off = tz.utcoffset(None)
        name = tz.tzname(None)
        default = dt.timezone(off).tzname(None)
        return ["o", off.days * 86400 + off.seconds, off.microseconds, None if name == default else name]
    raise SerializationError(
        f"{path}: a datetime with tzinfo {type(tz).__module__}.{type(tz).__qualname__} cannot be "
        "cached exactly; use datetime.timezone or zoneinfo.ZoneInfo"
    )


def _plain_tz(tz: dt.tzinfo | None) -> bool:
    # isoformat() + fromisoformat() restores these exactly (an unnamed fixed offset; UTC stays
    # the timezone.utc singleton).
    return tz is None or (type(tz) is dt.timezone and tz.tzname(None) == dt.timezone(tz.utcoffset(None)).tzname(None))


def _enum_spec(value: enum.Enum, path: str) -> tuple[Any, str]:
    cls = type(value)
    mod = sys.modules.get(cls.__module__)
    found: Any = mod
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    if found is not cls:
        raise SerializationError(
            f"{path}: enum {cls.__module__}.{cls.__qualname__} cannot be found by its name "
            "(defined inside a function?), so it cannot be restored; cache its .value"
        )
    if isinstance(value, enum.Flag):
        return [cls.__module__, cls.__qualname__, int(value.value)], "ef"
    return [cls.__module__, cls.__qualname__, value.name], "e"


def _walk(v: Any, path: str, depth: int) -> tuple[Any, Any]:
    """(JSON-native value, skeleton); the value is ``v`` itself when the skeleton is None."""
    t = type(v)
    if t is str or t is bool or v is None:
        return v, None
    if t is int:
        return (v, None) if _INT_MIN <= v < _INT_MAX else (str(v), "i")
    if t is float:
        return (v, None) if math.isfinite(v) else (repr(v), "f")
    if depth > _MAX_DEPTH:
        raise SerializationError(f"{path}: nested deeper than {_MAX_DEPTH} levels (a cycle?)")
    if t is dict:
        if all(type(k) is str for k in v):
            out: dict[str, Any] | None = None
            spec: dict[str, Any] = {}
            for k, x in v.items():
                nx, s = _walk(x, f"{path}[{k!r}]", depth + 1)
                if s is not None:
                    if out is None:
                        out = dict(v)
                    out[k] = nx
                    spec[k] = s
            return (v, None) if out is None else (out, ["D", spec])
        pairs = [[k, x] for k, x in v.items()]
        native, s = _walk_items(pairs, path, depth, pair_keys=True)
        return native, ["P", s]
    if t is list or t is tuple or t is set or t is frozenset:
        items = v if t is list or t is tuple else list(v)
        native, s = _walk_items(items, path, depth, member=t is set or t is frozenset)
        kind = "L" if t is list else "T" if t is tuple else "S" if t is set else "F"
        if kind == "L":
            return (v, None) if s is None else (native, ["L", s])
        return native, [kind, s]
    if t is dt.datetime:
        if not v.fold and _plain_tz(v.tzinfo):
            return v.isoformat(), "dt"
        return [v.replace(tzinfo=None, fold=0).isoformat(), _tz_spec(v.tzinfo, path, v), v.fold], "dtx"
    if t is dt.date:
        return v.isoformat(), "d"
    if t is dt.time:
        if not v.fold and _plain_tz(v.tzinfo):
            return v.isoformat(), "tm"
        return [v.replace(tzinfo=None, fold=0).isoformat(), _tz_spec(v.tzinfo, path, v), v.fold], "tmx"
    if t is dt.timedelta:
        return [v.days, v.seconds, v.microseconds], "td"
    if t is Decimal:
        return str(v), "dec"
    if isinstance(v, uuid.UUID):
        return str(v), "u"
    if t is bytes:
        return base64.b64encode(v).decode(), "b"
    if t is bytearray:
        return base64.b64encode(v).decode(), "ba"
    if isinstance(v, enum.Enum):
        return _enum_spec(v, path)
    if t.__name__ in _IP_TYPES and _IP_TYPES[t.__name__] is t:
        return [t.__name__, str(v)], "ip"
    raise unsupported(v, path)


def _walk_items(items: Any, path: str, depth: int, *, member: bool = False, pair_keys: bool = False) -> tuple[list[Any], Any]:
    native: list[Any] = []
    skels: list[Any] = []
    any_skel = False
    for i, x in enumerate(items):
        if pair_keys:
            k, val = x
            nk, sk = _walk(k, f"{path}<key {k!r}>", depth + 1)
            nv, sv = _walk(val, f"{path}[{k!r}]", depth + 1)
            nx = [nk, nv]
            s: Any = None if sk is None and sv is None else ["L", {k2: s2 for k2, s2 in (("0", sk), ("1", sv)) if s2 is not None}]
        else:
            nx, s = _walk(x, f"{path}{{...}}" if member else f"{path}[{i}]", depth + 1)
        native.append(nx)
        skels.append(s)
        any_skel = any_skel or s is not None
    if not any_skel:
        return native, None
    first = skels[0]
    if first is not None and all(s == first for s in skels):
        return native, {"*": first}
    return native, {str(i): s for i, s in enumerate(skels) if s is not None}


def _find_bad_string(v: Any, path: str) -> str | None:
    if type(v) is str:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if type(v) is dict:
        for k, x in v.items():
            found = _find_bad_string(k, f"{path}<key {k!r}>") or _find_bad_string(x, f"{path}[{k!r}]")
            if found:
                return found
    if type(v) in (list, tuple, set, frozenset):
        for i, x in enumerate(v):
            found = _find_bad_string(x, f"{path}[{i}]")
            if found:
                return found
    return None


def dumps(value: Any) -> bytes:
    native, skel = _walk(value, "value", 0)
    try:
        body = orjson.dumps(native)
        if skel is None:
            return body
        return b"#" + orjson.dumps(skel) + b"\n" + body
    except orjson.JSONEncodeError as e:
        where = _find_bad_string(value, "value")
        if where:
            raise SerializationError(f"{where}: a string that is not valid UTF-8 (a lone surrogate) cannot be cached") from None
        raise SerializationError(f"value cannot be cached as JSON: {e}") from None


# -- reading --------------------------------------------------------------------------------

Restorer = Callable[[Any], Any]


def _tz_from(spec: Any) -> dt.tzinfo | None:
    if spec is None:
        return None
    if spec[0] == "z":
        return zoneinfo.ZoneInfo(spec[1])
    off = dt.timedelta(seconds=spec[1], microseconds=spec[2])
    return dt.timezone(off) if spec[3] is None else dt.timezone(off, spec[3])


def _dtx(v: Any) -> dt.datetime:
    return dt.datetime.fromisoformat(v[0]).replace(tzinfo=_tz_from(v[1]), fold=v[2])


def _tmx(v: Any) -> dt.time:
    return dt.time.fromisoformat(v[0]).replace(tzinfo=_tz_from(v[1]), fold=v[2])


def _enum(v: Any) -> enum.Enum:
    found: Any = sys.modules.get(v[0])  # never imports: only classes this process has loaded
    for part in v[1].split("."):
        found = getattr(found, part, None)
    if not isinstance(found, enum.EnumMeta):
        raise PayloadError(f"enum class {v[0]}.{v[1]} is not loaded in this process")
    return found[v[2]]  # type: ignore[no-any-return]


def _flag(v: Any) -> enum.Enum:
    found: Any = sys.modules.get(v[0])
    for part in v[1].split("."):
        found = getattr(found, part, None)
    if not isinstance(found, enum.EnumMeta) or not issubclass(found, enum.Flag):
        raise PayloadError(f"flag class {v[0]}.{v[1]} is not loaded in this process")
    return found(v[2])


def _ip(v: Any) -> Any:
    return _IP_TYPES[v[0]](v[1])


_LEAVES: dict[str, Restorer] = {
    "dt": dt.datetime.fromisoformat,
    "dtx": _dtx,
    "d": dt.date.fromisoformat,
    "tm": dt.time.fromisoformat,
    "tmx": _tmx,
    "td": lambda v: dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "dec": Decimal,
    "u": uuid.UUID,
    "b": base64.b64decode,
    "ba": lambda v: bytearray(base64.b64decode(v)),
    "i": int,
    "f": float,
    "e": _enum,
    "ef": _flag,
    "ip": _ip,
}
_MAKE: dict[str, Callable[[list[Any]], Any] | None] = {"L": None, "T": tuple, "S": set, "F": frozenset}


def _compile(skel: Any) -> Restorer:
    if type(skel) is str:
        return _LEAVES[skel]
    kind, spec = skel
    if kind == "D":
        items = [(k, _compile(s)) for k, s in spec.items()]

        def restore_dict(v: dict[str, Any]) -> dict[str, Any]:
            for k, f in items:
                v[k] = f(v[k])
            return v

        return restore_dict
    if kind == "P":
        pairs = _compile(["L", spec])
        return lambda v: {k: x for k, x in pairs(v)}
    make = _MAKE[kind]
    if spec is None:
        inner: Restorer | None = None
    elif "*" in spec:
        each = _compile(spec["*"])

        def inner(v: list[Any]) -> list[Any]:
            return [each(x) for x in v]
    else:
        at = [(int(i), _compile(s)) for i, s in spec.items()]

        def inner(v: list[Any]) -> list[Any]:
            for i, f in at:
                v[i] = f(v[i])
            return v

    if inner is None:
        return make if make is not None else (lambda v: v)
    if make is None:
        return inner
    return lambda v: make(inner(v))


_COMPILED: dict[bytes, Restorer] = {}
_COMPILED_MAX = 512


def loads(data: bytes) -> Any:
    try:
        if data[:1] != b"#":
            return orjson.loads(data)
        nl = data.index(b"\n")
        skel = data[1:nl]
        restore = _COMPILED.get(skel)
        if restore is None:
            restore = _compile(orjson.loads(skel))
            if len(skel) <= 2048:
                if len(_COMPILED) >= _COMPILED_MAX:
                    _COMPILED.clear()
                _COMPILED[skel] = restore
        return restore(orjson.loads(memoryview(data)[nl + 1 :]))
    except PayloadError:
        raise
    except Exception as e:  # a damaged or foreign payload: a miss, never a crash
        raise PayloadError(f"not an exact-JSON cache payload: {type(e).__name__}: {e}") from None
