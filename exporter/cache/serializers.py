"""How cached values become bytes, and back.

JSON is the default (:class:`JsonSerializer`, the exact encoding of :mod:`.tagged`): values are
data, a reader of the cache can never be made to run code, and a value comes back equal to what
the loader returned, type for type (datetimes, Decimals, UUIDs, tuples, sets, bytes, enums, ...).
A value it cannot restore exactly is refused when it is written, with the path inside the value.

Pickle is opt-in (``SignedPickleSerializer(secret_key)``): every payload carries an HMAC-SHA256 of
its bytes, checked in constant time *before* anything is unpickled. It refuses live SQLAlchemy ORM
objects at any depth, like the JSON serializer. A payload that fails to decode or to verify raises
:class:`PayloadError`; the service then treats it as a miss, deletes it and counts an error.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import pickle
from typing import Any, ClassVar, Protocol

from . import tagged
from .tagged import PayloadError, SerializationError

__all__ = [
    "JsonSerializer",
    "PayloadError",
    "SerializationError",
    "Serializer",
    "SignedPickleSerializer",
]


class Serializer(Protocol):
    """``fmt`` is one ASCII letter written into each entry's header, so a JSON reader never hands
    a pickle payload to anything."""

    fmt: ClassVar[bytes]

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JsonSerializer:
    """The exact JSON encoding (see :mod:`exporter.cache.tagged`). Its letter is ``J``: entries
    written by the earlier, lossy JSON serializer (``j``) are dropped and reloaded, not misread."""

    fmt: ClassVar[bytes] = b"J"

    def dumps(self, value: Any) -> bytes:
        return tagged.dumps(value)

    def loads(self, data: bytes) -> Any:
        return tagged.loads(data)


def _orm_path(value: Any, path: str, seen: set[int], depth: int = 0) -> str | None:
    """Where a live ORM object sits inside value (containers and object attributes), if found."""
    if hasattr(value, "_sa_instance_state"):
        return path
    if depth > 50 or id(value) in seen or isinstance(value, str | bytes | int | float):
        return None
    seen.add(id(value))
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        children = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, set | frozenset):
        children = [(f"{path}{{...}}", v) for v in value]
    elif hasattr(value, "__dict__"):
        children = [(f"{path}.{k}", v) for k, v in vars(value).items()]
    for p, v in children:
        found = _orm_path(v, p, seen, depth + 1)
        if found:
            return found
    return None


class _OrmRefusingPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # Called for every object pickle meets except the basic built-in types, at any depth.
        if hasattr(obj, "_sa_instance_state"):
            raise _FoundOrm(obj)
        return NotImplemented


class _FoundOrm(Exception):
    def __init__(self, obj: Any) -> None:
        self.obj = obj


class SignedPickleSerializer:
    """Pickle with an HMAC-SHA256 signature; only for values JSON cannot carry, and only when
    every process that can write to this Redis is trusted with ``secret_key``."""

    fmt: ClassVar[bytes] = b"p"
    _SIG = 32

    def __init__(self, secret_key: bytes | str) -> None:
        key = secret_key.encode() if isinstance(secret_key, str) else bytes(secret_key)
        if len(key) < 16:
            raise ValueError("SignedPickleSerializer needs a secret_key of at least 16 bytes")
        self._key = key

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()

    def dumps(self, value: Any) -> bytes:
        buf = io.BytesIO()
        try:
            _OrmRefusingPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
        except _FoundOrm as found:
            path = _orm_path(value, "value", set()) or "value (inside an object)"
            raise tagged.unsupported(found.obj, path) from None
        body = buf.getvalue()
        return self._sign(body) + body

    def loads(self, data: bytes) -> Any:
        if len(data) < self._SIG:
            raise PayloadError("signed pickle payload too short")
        sig, body = data[: self._SIG], data[self._SIG :]
        if not hmac.compare_digest(sig, self._sign(body)):
            raise PayloadError("signed pickle payload failed HMAC verification")
        try:
            return pickle.loads(body)
        except Exception as e:
            raise PayloadError(f"signed pickle payload does not unpickle: {type(e).__name__}") from None
