"""Output of the report commands: a table fitted to the terminal, or JSON for scripts.

Sizes are shown 1024-based with IEC units (KiB, MiB, GiB); JSON carries plain numbers (bytes as
integers, times in milliseconds or seconds as the key says).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Column",
    "fit_width",
    "format_age",
    "format_bytes",
    "format_count",
    "format_ms",
    "one_line",
    "render_table",
    "to_json",
]

GAP = "  "
ELLIPSIS = "…"


def fit_width() -> int:
    """The terminal's width ($COLUMNS, else the tty, else 120 when piped)."""
    return shutil.get_terminal_size((120, 24)).columns


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms:.3f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    if ms < 3_600_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_count(n: float | None) -> str:
    return "-" if n is None else f"{n:,.0f}"


def one_line(text: str | None) -> str:
    """Whitespace runs (newlines included) collapsed to one space."""
    return " ".join((text or "").split())


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Any], str]
    align: Literal["<", ">"] = "<"
    # A flexible column gives up width first (cut with …) so the table fits the terminal.
    flex: bool = False
    min_width: int = 12


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + ELLIPSIS


def render_table(rows: Sequence[Any], columns: Sequence[Column], width: int | None = None) -> str:
    """Rows as an aligned text table no wider than `width` (the terminal's by default), as far as
    the flexible columns can shrink; numbers are never cut."""
    width = fit_width() if width is None else width
    cells = [[col.cell(r) for col in columns] for r in rows]
    widths = [max([len(col.header), *(len(c[i]) for c in cells)]) for i, col in enumerate(columns)]
    excess = sum(widths) + len(GAP) * (len(columns) - 1) - width
    for i, col in sorted(enumerate(columns), key=lambda ic: -widths[ic[0]]):
        if excess <= 0:
            break
        if col.flex:
            give = min(excess, max(0, widths[i] - max(col.min_width, len(col.header))))
            widths[i] -= give
            excess -= give

    def line(values: Sequence[str]) -> str:
        parts = [f"{_cut(v, w):{col.align}{w}}" for v, w, col in zip(values, widths, columns, strict=True)]
        return GAP.join(parts).rstrip()

    out = [line([c.header for c in columns])]
    out += [line(c) for c in cells]
    return "\n".join(out) + "\n"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """Dataclasses become objects with their fields in declaration order (the stable keys)."""
    return json.dumps(_plain(value), indent=2, ensure_ascii=False) + "\n"
