"""Collector definitions: a PostgreSQL view described as data.

A definition names a collector, its scope (once per cluster, or once per watched database), its
default interval and timeout, and one or more queries. Each query has SQL chosen by server version
range (and extension version where it matters) and a table of what each column is: a label, or a
counter or gauge with its metric name, help, scale and NULL rule. One generic path
(`exporter.postgres.queries`) turns rows into exposition text; hand-written code is kept for real
rules (statements top-N, index rules, activity's configurable labels) and plugs into the same path.

The built-in definitions are YAML files beside this module (`postgres/definitions/*.yaml`), and
users write theirs under `queries:` in the config file with the same schema: one file per view is
the one place to change it, and a user can copy a built-in into their config and adapt it. (YAML
rather than Python data for exactly that reason: the built-ins are in the users' language.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .families import FamilySpec, MetricType
from .units import Duration, Model, Regex

__all__ = [
    "Definition",
    "MetricColumn",
    "Query",
    "Setting",
    "SqlVariant",
    "builtin_definitions",
    "definition",
    "pg_version",
]

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
METRIC_RE = re.compile(r"^pgcache_[a-zA-Z0-9_]+$")
LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RESERVED_LABELS = {"target", "collector", "job", "instance"}


def pg_version(value: object) -> int:
    """A PostgreSQL version as server_version_num: 16 -> 160000, '9.6' -> 90600, 150004 as is."""
    if isinstance(value, bool):
        raise PydanticCustomError("version", f"{value!r} is not a PostgreSQL version")
    if isinstance(value, int):
        return value * 10000 if value < 100 else value
    if isinstance(value, float | str):
        m = re.fullmatch(r"(\d+)(?:\.(\d+))?", str(value).strip())
        if m:
            major, minor = int(m.group(1)), int(m.group(2) or 0)
            if major >= 100:
                return major
            return major * 10000 + minor * 100 if major < 10 else major * 10000 + minor
    raise PydanticCustomError(
        "version", f"{value!r} is not a PostgreSQL version (write e.g. 16, or 160000)"
    )


def ext_version(value: str) -> tuple[int, ...]:
    """'1.10' -> (1, 10): extension versions compare by their numeric parts."""
    return tuple(int(p) for p in re.findall(r"\d+", value))


class ExtensionRequirement(Model):
    """The variant needs this extension in the database it runs in; its schema replaces
    `@extschema@` in the SQL."""

    name: str
    min_version: str | None = None  # inclusive, e.g. "1.9"
    max_version: str | None = None  # exclusive

    def allows(self, installed: str) -> bool:
        v = ext_version(installed)
        if self.min_version is not None and v < ext_version(self.min_version):
            return False
        return self.max_version is None or v < ext_version(self.max_version)


class SqlVariant(Model):
    """One SQL text and the server versions it is for: min_version inclusive, max_version
    exclusive (16 means 16.0)."""

    min_version: int | None = None
    max_version: int | None = None
    extension: ExtensionRequirement | None = None
    query: str = Field(min_length=1)

    @field_validator("min_version", "max_version", mode="before")
    @classmethod
    def _version(cls, v: object) -> int | None:
        return None if v is None else pg_version(v)

    def allows(self, server_version_num: int) -> bool:
        if self.min_version is not None and server_version_num < self.min_version:
            return False
        return self.max_version is None or server_version_num < self.max_version


class MetricColumn(Model):
    """A numeric column exported as one family. NULL leaves the series out unless `null_as`
    gives a value. `aggregate: sum` exports one series per collector run (labels target, and
    datname for per-database queries) with the column summed over all rows, before any limit."""

    column: str
    name: str
    type: Literal["counter", "gauge"]
    help: str = Field(min_length=1)
    scale: float = 1.0
    null_as: float | None = None
    labels: tuple[str, ...] = ()  # extra label columns for this family only
    min_version: int | None = None  # the family exists from this server version on
    aggregate: Literal["sum"] | None = None

    @field_validator("min_version", mode="before")
    @classmethod
    def _version(cls, v: object) -> int | None:
        return None if v is None else pg_version(v)

    @field_validator("name")
    @classmethod
    def _metric_name(cls, v: str) -> str:
        if not METRIC_RE.match(v):
            raise PydanticCustomError(
                "metric", f"{v!r} is not a metric name here: start with pgcache_, then letters, digits, _"
            )
        return v

    @model_validator(mode="after")
    def _counter_name(self) -> MetricColumn:
        if self.type == "counter" and self.name.endswith("_total"):
            raise PydanticCustomError(
                "metric",
                f"{self.name}: write counter names without _total (the exposition adds it)",
            )
        return self


class FamilyDeclaration(Model):
    """A family built by hand-written code (not straight from a column), declared here so that
    its name, type, help and labels still live in the definition."""

    name: str
    type: MetricType
    help: str = Field(min_length=1)
    labels: tuple[str, ...] = ()  # beyond target (and datname in per-database collectors)
    min_version: int | None = None

    @field_validator("min_version", mode="before")
    @classmethod
    def _version(cls, v: object) -> int | None:
        return None if v is None else pg_version(v)


class Limit(Model):
    """Keep the top `default` rows by `by` (descending, NULL last); `collectors.<name>.limit`
    overrides the number. What is cut is counted in series in pgcache_series_dropped_total."""

    by: str
    default: int = Field(ge=1)


class Setting(Model):
    """A knob of the collector: `collectors.<name>.<key>` in the config, with this default, and
    passed to the queries that list it in `params` (as $1, $2, ... in that order)."""

    default: float | int | bool | str
    help: str = Field(min_length=1)
    minimum: float | None = None
    maximum: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Setting:
        numeric = isinstance(self.default, int | float) and not isinstance(self.default, bool)
        if (self.minimum is not None or self.maximum is not None) and not numeric:
            raise PydanticCustomError("setting", "minimum and maximum are for numeric settings")
        if numeric and not (
            (self.minimum is None or self.default >= self.minimum)  # type: ignore[operator]
            and (self.maximum is None or self.default <= self.maximum)  # type: ignore[operator]
        ):
            raise PydanticCustomError("setting", f"default {self.default!r} is outside minimum..maximum")
        return self


SETTINGS_TAKEN = {"enabled", "interval", "timeout", "limit"}


class Query(Model):
    name: str = "main"
    sql: tuple[SqlVariant, ...]
    labels: tuple[str, ...] = ()
    metrics: tuple[MetricColumn, ...] = ()
    limit: Limit | None = None
    # Settings passed to the SQL as $1, $2, ... in this order.
    params: tuple[str, ...] = ()
    # A boolean column: rows where it is not true are not exported (aggregates still count them)
    # and their series are counted in pgcache_series_dropped_total.
    keep: str | None = None
    # A label naming a database in a cluster-wide query: rows of databases outside the
    # target's `databases` selection are left out.
    database_label: str | None = None
    # Run this query on every Nth run of its collector only (its figures from the last run that
    # read them stand in between): for slow-moving, expensive figures such as sizes.
    every: int = Field(default=1, ge=1, le=1000)

    @field_validator("sql", mode="before")
    @classmethod
    def _sql(cls, v: object) -> object:
        if isinstance(v, str):
            return ({"query": v},)
        return v

    def variant(self, server_version_num: int, extensions: Mapping[str, tuple[str, str]]) -> SqlVariant | None:
        """The first variant for this server (and its extensions: name -> (version, schema))."""
        for v in self.sql:
            if not v.allows(server_version_num):
                continue
            if v.extension is not None:
                have = extensions.get(v.extension.name)
                if have is None or not v.extension.allows(have[0]):
                    continue
            return v
        return None

    def needs_extensions(self) -> bool:
        return any(v.extension is not None for v in self.sql)


class Definition(Model):
    """A collector. User queries in the config use this schema; the flat form (sql, labels,
    metrics at the top) is one query."""

    name: str = Field(pattern=NAME_PATTERN)
    help: str = ""
    scope: Literal["cluster", "database"] = "cluster"
    interval: Duration = 60.0
    timeout: Duration = 10.0
    enabled: bool = True
    databases: tuple[Regex, ...] = ()  # regexes on datname, within the target's selection
    queries: tuple[Query, ...] = ()
    families: tuple[FamilyDeclaration, ...] = ()
    settings: dict[str, Setting] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sql" in data:
            data = dict(data)
            query = {k: data.pop(k) for k in ("sql", "labels", "metrics", "limit", "database_label",
                                              "every", "params", "keep")
                     if k in data}
            if "queries" in data:
                raise PydanticCustomError("queries", "give either sql (one query) or queries, not both")
            data["queries"] = [query]
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Definition:
        if self.interval < 1:
            raise PydanticCustomError("interval", "interval must be at least 1s")
        if not 0 < self.timeout <= self.interval:
            raise PydanticCustomError(
                "timeout", "timeout must be more than 0 and at most the interval (runs never overlap)"
            )
        if not self.queries and not self.families:
            raise PydanticCustomError("queries", "a collector needs sql (or queries)")
        fixed = {"target"} | ({"datname"} if self.scope == "database" else set())
        for key in self.settings:
            if key in SETTINGS_TAKEN or not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                raise PydanticCustomError(
                    "settings", f"setting {key!r}: use a lower-case name other than {sorted(SETTINGS_TAKEN)}"
                )
        names: set[str] = set()
        for q in self.queries:
            for label in q.labels + tuple(x for m in q.metrics for x in m.labels):
                if not LABEL_RE.match(label) or label.startswith("__"):
                    raise PydanticCustomError("labels", f"query {q.name}: {label!r} is not a label name")
                if label in fixed or label in RESERVED_LABELS:
                    raise PydanticCustomError(
                        "labels", f"query {q.name}: label {label!r} is set by the exporter itself"
                        + (" (scope database adds datname)" if label == "datname" else "")
                    )
            if len(set(q.labels)) != len(q.labels):
                raise PydanticCustomError("labels", f"query {q.name}: a label is listed twice")
            if q.database_label is not None and q.database_label not in q.labels:
                raise PydanticCustomError(
                    "database_label", f"query {q.name}: database_label {q.database_label!r} is not one of its labels"
                )
            for p in q.params:
                if p not in self.settings:
                    raise PydanticCustomError(
                        "params", f"query {q.name}: parameter {p!r} is not one of the collector's settings"
                    )
            if q.keep is not None and q.keep in q.labels:
                raise PydanticCustomError("keep", f"query {q.name}: keep column {q.keep!r} is a label")
            for m in q.metrics:
                if m.name in names:
                    raise PydanticCustomError("metrics", f"metric {m.name} is defined twice in collector {self.name}")
                names.add(m.name)
        for f in self.families:
            if f.name in names:
                raise PydanticCustomError("families", f"metric {f.name} is defined twice in collector {self.name}")
            names.add(f.name)
        return self

    # -- what it exposes -------------------------------------------------------------------------
    def fixed_labels(self) -> tuple[str, ...]:
        return ("target", "datname") if self.scope == "database" else ("target",)

    def family_specs(self) -> list[FamilySpec]:
        fixed = self.fixed_labels()
        opt_in = None if self.enabled else f"collectors.{self.name}"
        out: list[FamilySpec] = []
        for q in self.queries:
            for m in q.metrics:
                labels = fixed if m.aggregate else fixed + q.labels + m.labels
                out.append(FamilySpec(m.name, m.type, m.help, labels,
                                      _major(m.min_version), self.name, opt_in))
        for f in self.families:
            out.append(FamilySpec(f.name, f.type, f.help, fixed + f.labels,
                                  _major(f.min_version), self.name, opt_in))
        return out

    def query(self, name: str) -> Query:
        for q in self.queries:
            if q.name == name:
                return q
        raise KeyError(f"collector {self.name} has no query {name!r}")

    def declared(self, name: str) -> FamilySpec:
        for spec in self.family_specs():
            if spec.name == name:
                return spec
        raise KeyError(f"collector {self.name} declares no family {name!r}")

    @property
    def limit(self) -> Limit | None:
        return next((q.limit for q in self.queries if q.limit is not None), None)


def _major(version: int | None) -> int | None:
    return None if version is None else version // 10000


# -- the built-ins ---------------------------------------------------------------------------------


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors(include_url=False, include_input=False):
        path = ".".join(str(p) for p in e["loc"])
        lines.append(f"{source}: {path}: {e['msg']}" if path else f"{source}: {e['msg']}")
    return "\n".join(lines)


def parse_definitions(raw: Iterable[Any], source: str) -> list[Definition]:
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(Definition.model_validate(item))
        except ValidationError as e:
            raise ConfigError(_format_error(f"{source}[{i}]", e)) from None
    return out


@cache
def builtin_definitions() -> tuple[Definition, ...]:
    """Every built-in PostgreSQL collector, one YAML file each, in file-name order."""
    folder = resources.files(__package__).joinpath("postgres", "definitions")
    found: list[Definition] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        loaded = yaml.safe_load(entry.read_text(encoding="utf-8"))
        items = loaded if isinstance(loaded, list) else [loaded]
        found += parse_definitions(items, f"built-in definition {entry.name}")
    names = [d.name for d in found]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"built-in definitions: collector name(s) used twice: {sorted(dup)}")
    return tuple(found)


def definition(name: str) -> Definition:
    for d in builtin_definitions():
        if d.name == name:
            return d
    raise KeyError(f"no built-in collector {name!r}")
