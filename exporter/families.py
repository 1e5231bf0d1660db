"""Metric families written straight to exposition text.

A `Family` keeps its sample lines as text while rows are read: no `Sample` object per series, and
the label block of a row (`{target="..",datname="..",table=".."}`) is escaped and joined once and
shared by every family that row feeds. The snapshot renders a `Family` by joining its lines.

`FamilySpec` is what a family is (name, type, help, labels); the definitions, the hand-written
collectors and the exporter's own metrics all declare theirs, so README's tables and
tests/dashboards/exposed_metrics.json come from one list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

__all__ = ["Family", "FamilySpec", "format_value", "label_block"]

MetricType = Literal["counter", "gauge", "histogram", "info"]

_INF, _NINF = float("inf"), float("-inf")


def escape_label(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def label_block(names: Sequence[str], values: Sequence[str]) -> str:
    """`{a="1",b="2"}` (values escaped); empty string without labels."""
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{escape_label(v)}"' for n, v in zip(names, values, strict=True)) + "}"


def format_value(value: object) -> str:
    """A sample value as the exposition spells it. Integers stay exact (no float rounding of
    big counters); bool is 1/0; Decimal and other numbers go through float."""
    t = type(value)
    if t is int:
        return str(value)
    if t is float:
        v: float = value  # type: ignore[assignment]
        if v != v:
            return "NaN"
        if v == _INF:
            return "+Inf"
        if v == _NINF:
            return "-Inf"
        return repr(v)
    if t is bool:
        return "1" if value else "0"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float | Decimal):
        return format_value(float(value))
    raise TypeError(f"not a number: {type(value).__name__}")


@dataclass(frozen=True)
class FamilySpec:
    """What a family is. `labels` includes `target` (and `datname` where the collector adds it)."""

    name: str  # without the _total suffix of counters
    type: MetricType
    help: str
    labels: tuple[str, ...]
    min_postgres: int | None = None  # only exposed from this PostgreSQL major version on
    collector: str = ""
    opt_in: str | None = None  # only with this setting on (a collector off by default)

    @property
    def exposed_name(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name


@dataclass
class Family:
    """One family's sample lines, appended as text."""

    name: str
    type: MetricType
    help: str
    lines: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, spec: FamilySpec) -> Family:
        return cls(spec.name, spec.type, spec.help)

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name

    def add(self, labels: str, value: object) -> None:
        """`labels` is a ready label block from `label_block` (shared across families)."""
        self.lines.append(f"{self.sample_name}{labels} {format_value(value)}\n")

    def add_labels(self, names: Sequence[str], values: Sequence[str], value: object) -> None:
        self.add(label_block(names, values), value)
