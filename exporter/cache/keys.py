"""Cache keys: ``<prefix>:{<namespace>}:<digest of the canonical params>``.

The digest is BLAKE2b-128 (32 hex characters) of a canonical encoding of the params, so the same
params in any order give the same key, and two different param sets never share one by accident:

- mapping keys are sorted; every value is encoded with its type, so ``1``, ``1.0``, ``"1"`` and
  ``True`` are four different keys (a tuple and a list with the same items are the same key);
- ``datetime`` values with a time zone are converted to UTC first (the same instant written in
  two zones is one key); naive datetimes are kept apart from aware ones; ``date``, ``time``,
  ``timedelta``, ``UUID``, ``Decimal`` (normalised: ``Decimal("1.50") == Decimal("1.5")``),
  ``Enum`` (class and value), ``bytes`` and ``set``/``frozenset`` (sorted) are encoded exactly;
- anything else (an ORM object, a float NaN, a dict with non-string keys) raises
  :class:`KeyParamError`, naming the parameter, instead of producing a wrong key.

Redis Cluster: ``{<namespace>}`` is a hash tag, so every entry of a namespace (and its lock keys,
``<prefix>:lock:{<namespace>}:<digest>``) lives in one slot. That makes a namespace sweep one
node's SCAN plus single-slot UNLINK batches, and lets the lock and the entry be read in one MGET.
The price is that one namespace is served by one master: split a namespace that outgrows a shard.
Tag sets (``<prefix>:tag:<tag>``) are single keys in their own slots; their members are full entry
keys, deleted namespace by namespace (one slot each). Because the hash tag ends at the first
``}``, namespaces (and the prefix) may not contain ``{`` or ``}``.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import hashlib
import math
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson

__all__ = [
    "KeyParamError",
    "cache_key",
    "canonical_params",
    "check_namespace",
    "check_pattern",
    "escape_glob",
    "lock_key",
    "namespace_of",
    "namespace_pattern",
    "params_digest",
    "tag_key",
]


class KeyParamError(TypeError):
    """A parameter cannot be part of a cache key (its type has no deterministic encoding)."""


_SUPPORTED = (
    "str, int, float (finite), bool, None, Decimal, datetime, date, time, timedelta, UUID, Enum, "
    "bytes, list, tuple, set, frozenset and dicts with string keys"
)


def _canon(value: Any, path: str) -> Any:
    """The value as JSON-native data in which every non-JSON type carries a ``$tag``."""
    # Order matters: bool is an int, datetime is a date, IntEnum is an int.
    if value is None or isinstance(value, str) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, enum.Enum):
        cls = type(value)
        return {"$enum": [f"{cls.__module__}.{cls.__qualname__}", _canon(value.value, path)]}
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        # orjson refuses integers beyond 64 bits; those go as text.
        return value if -(2**63) <= value < 2**63 else {"$int": str(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise KeyParamError(f"{path}: {value!r} cannot be part of a cache key (not a finite number)")
        return value + 0.0  # -0.0 and 0.0 are one key
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise KeyParamError(f"{path}: {value!r} cannot be part of a cache key (not a finite number)")
        return {"$dec": str(value.normalize()) if value else "0"}
    if isinstance(value, dt.datetime):
        if value.utcoffset() is None:
            return {"$dtn": value.isoformat()}
        return {"$dt": value.astimezone(dt.UTC).replace(tzinfo=None).isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$td": (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, list | tuple):
        return [_canon(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        items = [_canon(v, f"{path}{{...}}") for v in value]
        return {"$set": sorted(items, key=lambda v: orjson.dumps(v, option=orjson.OPT_SORT_KEYS))}
    if isinstance(value, Mapping):
        return _canon_mapping(value, path)
    if hasattr(value, "_sa_instance_state"):
        raise KeyParamError(
            f"{path}: a SQLAlchemy ORM object ({type(value).__name__}) cannot be part of a cache "
            "key; pass its primary key instead"
        )
    raise KeyParamError(
        f"{path}: a {type(value).__module__}.{type(value).__qualname__} cannot be part of a cache "
        f"key (supported: {_SUPPORTED})"
    )


def _canon_mapping(value: Mapping[Any, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise KeyParamError(f"{path}: mapping key {k!r} is not a string")
        # User keys starting with "$" are escaped so they can never look like a type tag.
        out["$" + k if k.startswith("$") else k] = _canon(v, f"{path}[{k!r}]")
    return out


def canonical_params(params: Mapping[str, Any]) -> bytes:
    """The canonical encoding the digest is taken of (exposed for tests and debugging)."""
    if not isinstance(params, Mapping):
        raise KeyParamError(f"params must be a mapping of names to values, not {type(params).__name__}")
    return orjson.dumps(_canon_mapping(params, "params"), option=orjson.OPT_SORT_KEYS)


def params_digest(params: Mapping[str, Any]) -> str:
    return hashlib.blake2b(canonical_params(params), digest_size=16).hexdigest()


def check_namespace(namespace: str, what: str = "namespace") -> str:
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"{what} must be a non-empty string, not {namespace!r}")
    if "{" in namespace or "}" in namespace:
        raise ValueError(f"{what} {namespace!r} may not contain '{{' or '}}' (they delimit the Redis Cluster hash tag)")
    if any(ord(c) < 32 or c == "\x7f" for c in namespace):
        raise ValueError(f"{what} {namespace!r} may not contain control characters")
    return namespace


def cache_key(prefix: str, namespace: str, params: Mapping[str, Any]) -> str:
    return f"{prefix}:{{{namespace}}}:{params_digest(params)}"


def lock_key(entry_key: str) -> str:
    """The lock beside an entry: same hash tag, so same slot, but outside the namespace pattern."""
    prefix, _, rest = entry_key.partition(":{")
    return f"{prefix}:lock:{{{rest}"


def tag_key(prefix: str, tag: str) -> str:
    return f"{prefix}:tag:{tag}"


_GLOB = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def escape_glob(text: str) -> str:
    """Text matched literally by a Redis SCAN MATCH pattern."""
    return text.translate(_GLOB)


def namespace_pattern(prefix: str, namespace: str) -> str:
    """SCAN pattern of every entry of a namespace (not its locks, not other namespaces)."""
    return f"{escape_glob(prefix)}:{{{escape_glob(namespace)}}}:*"


def namespace_of(prefix: str, key: str) -> str | None:
    """The namespace of an entry key built with this prefix, or None for any other key."""
    head = prefix + ":{"
    if not key.startswith(head):
        return None
    end = key.find("}", len(head))
    return key[len(head):end] if end > len(head) else None


_HEX = frozenset("0123456789abcdef")


def check_pattern(prefix: str, pattern: str) -> str:
    """A pattern for ``invalidate_pattern`` if it can select entries of the key scheme, else a
    ValueError naming the method to use instead.

    Entry keys are ``<prefix>:{<namespace>}:<32 hex digits>``: the params are hashed, so a
    pattern on parameter values (the seed's ``user_stats:*user_id*50001*``) can never match,
    and a pattern without the prefix (``user:*``) matches no entry either. Rather than remove 0
    entries silently, such patterns are refused. Accepted: ``<prefix>:{<namespace glob>}:*``
    (whole namespaces) and ``<prefix>:{<namespace>}:<digest>`` (one key)."""
    head = escape_glob(prefix) + ":{"
    if isinstance(pattern, str) and pattern.startswith(head) and "}:" in pattern[len(head):]:
        ns, _, tail = pattern[len(head):].rpartition("}:")
        if ns and (tail == "*" or (len(tail) == 32 and set(tail) <= _HEX)):
            return pattern
    text = str(pattern)
    name, _, rest = text.partition(":")
    name = name.strip("*?[]{}") or "<namespace>"
    if rest in ("", "*"):
        advice = f"to drop a whole namespace use cache.invalidate_namespace({name!r})"
    else:
        advice = (
            f"use cache.invalidate({name!r}, {{<the params>}}) for one entry, "
            f"cache.invalidate_tags(<tag>) for the entries stored with tags=[<tag>], "
            f"or cache.invalidate_namespace({name!r}) for all of them"
        )
    raise ValueError(
        f"invalidate_pattern({text!r}) can never match a cache entry: entry keys are "
        f"'{prefix}:{{<namespace>}}:<hash of the params>', so parameter values are not in the key; "
        f"{advice} (or cache.bind(session_factory) to invalidate on commit). "
        f"Patterns accepted: '{head}<namespace glob>}}:*'"
    )
