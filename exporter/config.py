"""Configuration: YAML (plus environment and command-line flags) into frozen, validated models.

The file is user-facing API: every key is documented in config.example.yaml. Errors name the key
path (``collectors.statements.interval: "fast" is not a duration``) and never echo a secret.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .definitions import Definition, builtin_definitions
from .dsn import dsn_problems, redis_url_problems
from .dsn import target_name as bare_target_name
from .errors import ConfigError
from .units import NAME_RE, Duration, Regex, Size, parse_duration, parse_size
from .units import Model as _Model
from .units import show as _show

__all__ = [
    "Config",
    "ConfigError",
    "PostgresTargetConfig",
    "RedisTargetConfig",
    "load_config",
    "parse_duration",
    "parse_size",
]

# -- sections ------------------------------------------------------------------------------------


class WebConfig(_Model):
    listen_address: str = ":19187"
    config_file: Path | None = None
    # Slow and stalled clients (see exporter/httpserver.py): a request header must arrive within
    # header_timeout; a kept-alive connection may idle for idle_timeout; a response the client
    # stops reading is aborted after write_timeout; at most max_connections are open at once.
    header_timeout: Duration = 10.0
    idle_timeout: Duration = 75.0
    write_timeout: Duration = 30.0
    max_connections: int = Field(default=512, ge=1, le=1_000_000)

    @field_validator("header_timeout", "idle_timeout", "write_timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise PydanticCustomError("duration", "must be more than 0 (write e.g. 10s)")
        return v

    @field_validator("listen_address")
    @classmethod
    def _address(cls, v: str) -> str:
        split_listen_address(v)
        return v


def split_listen_address(address: str) -> tuple[str, int]:
    """':19187' -> ('0.0.0.0', 19187); '[::1]:9' -> ('::1', 9)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise PydanticCustomError(
            "address", f"{_show(address)} is not a listen address (write host:port, e.g. :19187)"
        )
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class DatabaseSelection(_Model):
    auto_discover: bool = True
    include: tuple[Regex, ...] = ()
    exclude: tuple[Regex, ...] = (r"^template[01]$",)

    def allows(self, datname: str) -> bool:
        if self.include and not any(re.search(p, datname) for p in self.include):
            return False
        return not any(re.search(p, datname) for p in self.exclude)


class PostgresTargetConfig(_Model):
    name: str = Field(pattern=NAME_RE)
    dsn: SecretStr | None = None
    dsn_file: Path | None = None
    databases: DatabaseSelection = DatabaseSelection()
    # Behind PgBouncer in transaction mode, named prepared statements break; this turns them off.
    pgbouncer: bool = False
    # The connection budget: connections open to this server at once (idle ones included), across
    # all its databases; one of them is kept for the pgcache_up probe.
    max_connections: int = Field(default=3, ge=1, le=20)
    connect_timeout: Duration = 5.0

    @model_validator(mode="after")
    def _has_dsn(self) -> PostgresTargetConfig:
        # load_config has already read dsn_file into dsn (and refused both at once).
        if self.dsn is None:
            raise PydanticCustomError("dsn", "dsn (or dsn_file) is required")
        return self

    @field_validator("dsn")
    @classmethod
    def _dsn_shape(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            check_dsn(v.get_secret_value())
        return v

    def resolved_dsn(self) -> str:
        """The DSN, read from dsn_file if that is how it was given (done at load time)."""
        assert self.dsn is not None, "load_config resolves dsn_file into dsn"
        return self.dsn.get_secret_value()


def check_dsn(dsn: str) -> None:
    """Everything that can be known about a PostgreSQL URL without connecting; every problem is
    one line of the error (the key path is added by _format_errors). Nothing from the value is
    echoed: a mis-split URL can put part of the password where the host or port should be."""
    problems = dsn_problems(dsn)
    if problems:
        raise PydanticCustomError("dsn", "\n".join(problems))


class RedisTargetConfig(_Model):
    name: str = Field(pattern=NAME_RE)
    url: SecretStr | None = None
    url_file: Path | None = None
    stats_key: str = Field(default="pgcache:stats", min_length=1)
    cluster: bool = False

    @model_validator(mode="after")
    def _has_url(self) -> RedisTargetConfig:
        if self.url is None:
            raise PydanticCustomError("url", "url (or url_file) is required")
        return self

    @field_validator("url")
    @classmethod
    def _url_shape(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            check_redis_url(v.get_secret_value())
        return v

    def resolved_url(self) -> str:
        assert self.url is not None, "load_config resolves url_file into url"
        return self.url.get_secret_value()


def check_redis_url(url: str) -> None:
    """Everything that can be known about a Redis URL without connecting (one line per problem;
    nothing from the value is echoed)."""
    problems = redis_url_problems(url)
    if problems:
        raise PydanticCustomError("url", "\n".join(problems))


class CollectorSettings(_Model):
    enabled: bool = True
    interval: Duration
    timeout: Duration

    @model_validator(mode="after")
    def _timeout_fits(self) -> CollectorSettings:
        if self.interval < 1:
            raise PydanticCustomError("interval", "interval must be at least 1s")
        if not 0 < self.timeout <= self.interval:
            raise PydanticCustomError(
                "timeout", "timeout must be more than 0 and at most the interval (runs never overlap)"
            )
        return self


ActivityLabel = Literal["datname", "usename", "application_name", "state", "wait_event_type"]

# Interval, timeout and limit defaults live in each collector's definition (one place per view).
_BUILTIN = {d.name: d for d in builtin_definitions()}


def _limit_default(name: str) -> int:
    limit = _BUILTIN[name].limit
    assert limit is not None, f"definition {name} declares no limit"
    return limit.default


class ActivitySettings(CollectorSettings):
    interval: Duration = _BUILTIN["activity"].interval
    timeout: Duration = _BUILTIN["activity"].timeout
    # Which pg_stat_activity columns label pgcache_connections; drop some to bound cardinality.
    labels: tuple[ActivityLabel, ...] = (
        "datname", "usename", "application_name", "state", "wait_event_type",
    )


class StatementsSettings(CollectorSettings):
    interval: Duration = _BUILTIN["statements"].interval
    timeout: Duration = _BUILTIN["statements"].timeout
    limit: int = Field(default=_limit_default("statements"), ge=1, le=100_000)
    query_text_length: int = Field(default=200, ge=0, le=10_000)
    # The exporter's own statements (its role's) are left out unless this is on.
    include_own_statements: bool = False


class IndexesSettings(CollectorSettings):
    interval: Duration = _BUILTIN["indexes"].interval
    timeout: Duration = _BUILTIN["indexes"].timeout
    unused_min_stats_age: Duration = 7 * 86400.0
    unused_min_size: Size = 1_000_000
    limit: int = Field(default=_limit_default("indexes"), ge=1, le=1_000_000)


class CacheSettings(CollectorSettings):
    interval: Duration = 15.0
    timeout: Duration = 5.0
    # Upper bound on namespaces exported from the stats hash (the rest are counted as dropped).
    max_namespaces: int = Field(default=200, ge=1, le=100_000)


# Collectors whose hand-written part has settings of its own; every other definition gets
# enabled, interval, timeout (and limit, when it declares one) with its definition's defaults.
from .advisor.settings import AdvisorSettings  # noqa: E402  (it subclasses CollectorSettings)

HAND_WRITTEN_SETTINGS: dict[str, type[CollectorSettings]] = {
    "activity": ActivitySettings,
    "statements": StatementsSettings,
    "indexes": IndexesSettings,
    "advisor": AdvisorSettings,
}


def settings_class(defn: Definition) -> type[CollectorSettings]:
    known = HAND_WRITTEN_SETTINGS.get(defn.name)
    if known is not None:
        return known
    fields: dict[str, Any] = {
        "enabled": (bool, defn.enabled),
        "interval": (Duration, defn.interval),
        "timeout": (Duration, defn.timeout),
    }
    if defn.limit is not None:
        fields["limit"] = (int, Field(default=defn.limit.default, ge=1, le=1_000_000))
    for key, s in defn.settings.items():
        kind = bool if isinstance(s.default, bool) else type(s.default)
        if kind is int and (isinstance(s.minimum, float) or isinstance(s.maximum, float)):
            kind = float
        fields[key] = (kind, Field(default=s.default, ge=s.minimum, le=s.maximum, description=s.help))
    cls: type[CollectorSettings] = create_model(  # type: ignore[call-overload]
        f"{defn.name.title().replace('_', '')}Settings", __base__=CollectorSettings, **fields
    )
    return cls


def collector_settings(name: str, **values: Any) -> CollectorSettings:
    """The settings model of a built-in collector (what `collectors.<name>` holds)."""
    if name == "cache":
        return CacheSettings(**values)
    return settings_class(_BUILTIN[name])(**values)


class CollectorsBase(_Model):
    cache: CacheSettings = CacheSettings()

    if TYPE_CHECKING:  # the fields derived from the definitions, as the type checker sees them
        activity: ActivitySettings = ActivitySettings()
        statements: StatementsSettings = StatementsSettings()
        indexes: IndexesSettings = IndexesSettings()
        advisor: AdvisorSettings = AdvisorSettings()
        tables: Any = None
        database: Any = None

    def settings(self, name: str) -> CollectorSettings:
        got: CollectorSettings = getattr(self, name)
        return got


# `collectors:` has one key per built-in definition (and `cache`), derived from the definitions.
if TYPE_CHECKING:
    CollectorsConfig = CollectorsBase
else:
    CollectorsConfig = create_model(
        "CollectorsConfig", __base__=CollectorsBase,
        **{name: (settings_class(d), settings_class(d)()) for name, d in _BUILTIN.items()},
    )


def _shard_index(value: object) -> int:
    """An int, or a StatefulSet pod name such as "pgcache-exporter-2" (its ordinal is taken)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"(?:.*-)?(\d+)", value.strip())
        if m:
            return int(m.group(1))
    raise PydanticCustomError(
        "shard", f"{_show(value)} is not a shard index (a number, or a pod name ending in -N)"
    )


class ShardConfig(_Model):
    """Split the targets across replicas: this replica collects only the targets that
    rendezvous hashing assigns to `index` of `total` (every target goes to exactly one)."""

    index: Annotated[int, BeforeValidator(_shard_index)] = 0
    total: int = Field(default=1, ge=1, le=10_000)

    @model_validator(mode="after")
    def _in_range(self) -> ShardConfig:
        if not 0 <= self.index < self.total:
            raise PydanticCustomError("shard", f"index {self.index} is not in 0..{self.total - 1}")
        return self

    def owns(self, target_name: str) -> bool:
        if self.total == 1:
            return True
        return shard_of(target_name, self.total) == self.index


def shard_of(target_name: str, total: int) -> int:
    """Rendezvous hashing: adding a replica moves only the targets the new one wins."""
    def weight(i: int) -> bytes:
        return hashlib.sha256(f"{i}/{target_name}".encode()).digest()

    return max(range(total), key=weight)


class Config(_Model):
    web: WebConfig = WebConfig()
    log: LogConfig = LogConfig()
    postgres: tuple[PostgresTargetConfig, ...] = ()
    redis: tuple[RedisTargetConfig, ...] = ()
    collectors: CollectorsConfig = CollectorsConfig()
    # User-defined queries: the same schema as the built-in definitions.
    queries: tuple[Definition, ...] = ()
    shard: ShardConfig = ShardConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        sections: tuple[tuple[str, Sequence[PostgresTargetConfig | RedisTargetConfig]], ...] = (
            ("postgres", self.postgres), ("redis", self.redis),
        )
        for section, targets in sections:
            for i, t in enumerate(targets):
                if t.name in seen:
                    raise PydanticCustomError(
                        "duplicate",
                        f"{section}[{i}].name: target name {t.name!r} is used twice "
                        "(names must be unique across postgres and redis)",
                    )
                seen.add(t.name)
        self._check_queries()
        return self

    def _check_queries(self) -> None:
        """User queries: names apart from the built-in collectors, metric names apart from every
        other family (a clash is a config error here, never a broken scrape)."""
        if not self.queries:
            return
        from .catalog import builtin_family_names  # late: it imports the collectors

        taken = builtin_family_names()
        names = set(_BUILTIN) | {"cache"}
        for i, q in enumerate(self.queries):
            if q.name in names:
                raise PydanticCustomError(
                    "duplicate", f"queries[{i}].name: {q.name!r} is already a collector name"
                    + (" (a built-in one)" if q.name in _BUILTIN or q.name == "cache" else "")
                )
            names.add(q.name)
            for spec in q.family_specs():
                owner = taken.get(spec.name)
                if owner is not None:
                    raise PydanticCustomError(
                        "duplicate",
                        f"queries[{i}] ({q.name}): metric {spec.name} is already defined by {owner}",
                    )
                taken[spec.name] = f"query {q.name}"

    def secrets(self) -> list[str]:
        """Every secret in this config, so the log filter and error pages can scrub them."""
        out: list[str] = []
        for pg in self.postgres:
            out += _secret_parts(pg.resolved_dsn())
        for r in self.redis:
            out += _secret_parts(r.resolved_url())
        return out


def _secret_parts(url: str) -> list[str]:
    parts = [url]
    try:
        pw = urlsplit(url).password
    except ValueError:
        pw = None
    if pw:
        parts.append(pw)
    for m in re.finditer(r"(?:password|sslpassword)=([^&\s]+)", url):
        parts.append(m.group(1))
    return [p for p in parts if len(p) >= 3]


# -- loading -------------------------------------------------------------------------------------

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(node: Any, env: Mapping[str, str], path: str) -> Any:
    """${VAR} and ${VAR:-default} in every string of the document; every unset variable is
    reported in one error, each with its key path."""
    missing: list[str] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, str):
            def sub(m: re.Match[str]) -> str:
                name, default = m.group(1), m.group(2)
                if name in env:
                    return env[name]
                if default is not None:
                    return default
                missing.append(f"{path or '<root>'}: environment variable {name} is not set")
                return ""
            return _VAR_RE.sub(sub, node)
        if isinstance(node, dict):
            return {k: walk(v, _join(path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return node

    out = walk(node, path)
    if missing:
        raise ConfigError("\n".join(missing))
    return out


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _read_secret_files(raw: dict[str, Any], base: Path) -> None:
    """Replace dsn_file/url_file by the file's content, so the models always hold the secret."""
    for section, key in (("postgres", "dsn"), ("redis", "url")):
        targets = raw.get(section)
        if not isinstance(targets, list):
            continue
        for i, t in enumerate(targets):
            if not isinstance(t, dict) or t.get(f"{key}_file") is None:
                continue
            if t.get(key) is not None:
                raise ConfigError(f"{section}[{i}]: exactly one of {key} or {key}_file is required")
            fpath = Path(str(t[f"{key}_file"]))
            if not fpath.is_absolute():
                fpath = base / fpath
            try:
                t[key] = fpath.read_text().strip()
            except OSError as e:
                raise ConfigError(
                    f"{section}[{i}].{key}_file: cannot read {fpath}: {e.strerror}"
                ) from None
            if not t[key]:
                raise ConfigError(f"{section}[{i}].{key}_file: {fpath} is empty")


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors(include_url=False, include_input=False):
        path = ""
        for part in e["loc"]:
            path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
        kind, msg = e["type"], e["msg"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "literal_error":
            msg = msg.replace("Input should be", "must be one of")
        # include_input=False above: a rejected DSN or URL (which may hold a password) is never shown.
        # A check that found several problems (check_dsn) gives one line each, each with the path.
        for line in msg.splitlines() or [msg]:
            lines.append(f"{path}: {line}" if path else line)
    return "\n".join(lines)


def build_config(raw: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_flat_query_paths(raw, _format_errors(e))) from None


def _flat_query_paths(raw: Mapping[str, Any], message: str) -> str:
    """A user query written in the flat form (sql, labels, metrics at its top) is one query
    inside: report its keys where the user wrote them (queries[1].metrics[0], not
    queries[1].queries[0].metrics[0])."""
    queries = raw.get("queries")
    if not isinstance(queries, list):
        return message
    for i, q in enumerate(queries):
        if isinstance(q, dict) and "sql" in q:
            message = message.replace(f"queries[{i}].queries[0].", f"queries[{i}].")
    return message


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    postgres_dsns: Sequence[str] = (),
    redis_urls: Sequence[str] = (),
    listen_address: str | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    web_config_file: str | None = None,
    shard_index: str | None = None,
    shard_total: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """The effective config: file (if any), then flags on top; the environment fills the no-file form.

    Precedence for targets: flags, then the file, then PGCACHE_POSTGRES_DSN / PGCACHE_REDIS_URL.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        base = p.resolve().parent
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys (web, postgres, ...)")
        raw = _expand(loaded, env, "")
        _read_secret_files(raw, base)
        web_cfg = raw.get("web")
        if isinstance(web_cfg, dict) and isinstance(web_cfg.get("config_file"), str):
            # Relative to the config file, like dsn_file (a --web.config.file flag is relative to cwd).
            web_cfg["config_file"] = str(base / web_cfg["config_file"])

    if postgres_dsns:
        raw["postgres"] = [_target_from_flag(v, "dsn", i) for i, v in enumerate(postgres_dsns)]
    elif not raw.get("postgres") and env.get("PGCACHE_POSTGRES_DSN"):
        raw["postgres"] = [_target_from_flag(env["PGCACHE_POSTGRES_DSN"], "dsn", 0)]
    if redis_urls:
        raw["redis"] = [_target_from_flag(v, "url", i) for i, v in enumerate(redis_urls)]
    elif not raw.get("redis") and env.get("PGCACHE_REDIS_URL"):
        raw["redis"] = [_target_from_flag(env["PGCACHE_REDIS_URL"], "url", 0)]

    for section, key, value in (
        ("web", "listen_address", listen_address),
        ("web", "config_file", web_config_file),
        ("log", "level", log_level),
        ("log", "format", log_format),
        ("shard", "index", shard_index or env.get("PGCACHE_SHARD_INDEX")),
        ("shard", "total", shard_total or env.get("PGCACHE_SHARD_TOTAL")),
    ):
        if value is not None:
            sect = raw.get(section)
            raw[section] = {**(sect if isinstance(sect, dict) else {}), key: value}
    return build_config(raw)


def split_target_flag(value: str) -> tuple[str | None, str]:
    """`NAME=URL` -> (NAME, URL); a bare URL -> (None, URL)."""
    name, sep, rest = value.partition("=")
    if sep and "://" in rest and re.fullmatch(NAME_RE, name):
        return name, rest
    return None, value


def _target_from_flag(value: str, key: str, index: int) -> dict[str, Any]:
    """`NAME=URL` or a bare URL; a bare URL is named after its host, port and database (never its
    password), so two databases on one server get two names: `db1:5432/app`, `cache:6379/1`
    (Redis's default database 0 adds nothing: `cache:6379`)."""
    name, value = split_target_flag(value)
    if name is not None:
        return {"name": name, key: value}
    return {"name": bare_target_name(value, key, index), key: value}
