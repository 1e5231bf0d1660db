"""Value types shared by the config and the collector definitions: durations, sizes, regexes,
and the frozen model base that forbids unknown keys."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

__all__ = ["NAME_RE", "Duration", "Model", "Regex", "Size", "parse_duration", "parse_size", "show"]

# -- durations and sizes -------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def parse_duration(value: object) -> float:
    """'500ms', '15s', '1m30s', '7d' (or a bare number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise PydanticCustomError("duration", f"{value!r} is not a duration (write e.g. 500ms, 15s, 5m, 7d)")
    if isinstance(value, int | float):
        if value < 0 or value != value or value == float("inf"):
            raise PydanticCustomError("duration", f"{value!r} is not a duration (must be a finite number >= 0)")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text and _DURATION_RE.sub("", text) == "":
            total = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_RE.findall(text))
            if total != float("inf"):
                return total
    shown = show(value)
    raise PydanticCustomError("duration", f"{shown} is not a duration (write e.g. 500ms, 15s, 5m, 7d)")


def parse_size(value: object) -> int:
    """'512kB', '10MB', '1GiB' (or a bare number of bytes) -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip().lower())
        if m and m.group(2) in _SIZE_UNITS | {"": 1}:
            n = float(m.group(1)) * (_SIZE_UNITS.get(m.group(2), 1))
            if n < 2**63:
                return int(n)
    shown = show(value)
    raise PydanticCustomError("size", f"{shown} is not a size (write e.g. 512kB, 10MB, 1GiB)")


def show(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return '"' + text.replace('"', '\\"') + '"' if isinstance(value, str) else text


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


def _regex(value: object) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("regex", f"{show(value)} is not a regular expression string")
    try:
        re.compile(value)
    except re.error as e:
        raise PydanticCustomError("regex", f"{show(value)} is not a valid regular expression: {e}") from None
    return value


Regex = Annotated[str, BeforeValidator(_regex)]
NAME_RE = r"^[A-Za-z0-9_.:/@-]{1,64}$"


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
