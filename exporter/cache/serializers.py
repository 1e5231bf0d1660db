"""How cached values become bytes, and back.

JSON (orjson) is the default: values are data, and a reader of the cache can never be made to run
code. Values round-trip as JSON does: tuples come back as lists, datetimes, UUIDs and Decimals as
strings (Decimals exactly, as text). Dataclasses are encoded as objects. A live SQLAlchemy ORM object
is refused with an error that says what to do (turn rows into dicts), as is any other type JSON
cannot represent.

Pickle is opt-in (``SignedPickleSerializer(secret_key)``): every payload carries an HMAC-SHA256 of
its bytes, checked in constant time *before* anything is unpickled. A payload that fails to decode
or to verify raises :class:`PayloadError`; the service then treats it as a miss, deletes it and
counts an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import pickle
from decimal import Decimal
from typing import Any, ClassVar, Protocol

import orjson

__all__ = [
    "JsonSerializer",
    "PayloadError",
    "SerializationError",
    "Serializer",
    "SignedPickleSerializer",
]


class SerializationError(TypeError):
    """A value the serializer cannot store (raised to the caller: it is a programming error)."""


class PayloadError(ValueError):
    """Bytes read from Redis that do not decode (or do not verify) with this serializer."""


class Serializer(Protocol):
    """``fmt`` is one ASCII letter written into each entry's header, so a JSON reader never hands
    a pickle payload to anything."""

    fmt: ClassVar[bytes]

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


def _default(obj: Any) -> Any:
    if hasattr(obj, "_sa_instance_state"):
        raise SerializationError(
            f"refusing to cache a live SQLAlchemy ORM object ({type(obj).__name__}): convert rows "
            "to plain data first, e.g. {c.key: getattr(obj, c.key) for c in "
            "sqlalchemy.inspect(obj).mapper.column_attrs}, or select columns and use row._asdict()"
        )
    if isinstance(obj, Decimal):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, set | frozenset):
        return list(obj)
    raise SerializationError(f"a {type(obj).__qualname__} cannot be cached as JSON; convert it to plain data")


class JsonSerializer:
    fmt: ClassVar[bytes] = b"j"
    _OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_NON_STR_KEYS

    def dumps(self, value: Any) -> bytes:
        try:
            return orjson.dumps(value, default=_default, option=self._OPTIONS)
        except SerializationError:
            raise
        except orjson.JSONEncodeError as e:
            cause = e.__cause__
            if isinstance(cause, SerializationError):
                raise cause from None
            raise SerializationError(f"value cannot be cached as JSON: {e}") from None

    def loads(self, data: bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise PayloadError(f"not JSON: {e}") from None


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
        if hasattr(value, "_sa_instance_state"):
            raise SerializationError(
                f"refusing to cache a live SQLAlchemy ORM object ({type(value).__name__}): "
                "it would be detached and stale when read back; cache plain data instead"
            )
        body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
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
