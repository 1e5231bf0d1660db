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
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .dsn import dsn_problems, redis_url_problems
from .dsn import target_name as bare_target_name
from .errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "PostgresTargetConfig",
    "RedisTargetConfig",
    "load_config",
    "parse_duration",
    "parse_size",
]

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
    shown = _show(value)
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
    shown = _show(value)
    raise PydanticCustomError("size", f"{shown} is not a size (write e.g. 512kB, 10MB, 1GiB)")


def _show(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return '"' + text.replace('"', '\\"') + '"' if isinstance(value, str) else text


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


def _regex(value: object) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("regex", f"{_show(value)} is not a regular expression string")
    try:
        re.compile(value)
    except re.error as e:
        raise PydanticCustomError("regex", f"{_show(value)} is not a valid regular expression: {e}") from None
    return value


Regex = Annotated[str, BeforeValidator(_regex)]
NAME_RE = r"^[A-Za-z0-9_.:/@-]{1,64}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    # Connections per database pool (the exporter runs at most this many queries per database at once).
    max_connections: int = Field(default=2, ge=1, le=10)
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


class ActivitySettings(CollectorSettings):
    interval: Duration = 15.0
    timeout: Duration = 5.0
    # Which pg_stat_activity columns label pgcache_connections; drop some to bound cardinality.
    labels: tuple[ActivityLabel, ...] = (
        "datname", "usename", "application_name", "state", "wait_event_type",
    )


class StatementsSettings(CollectorSettings):
    interval: Duration = 30.0
    timeout: Duration = 10.0
    limit: int = Field(default=200, ge=1, le=100_000)
    query_text_length: int = Field(default=200, ge=0, le=10_000)


class IndexesSettings(CollectorSettings):
    interval: Duration = 300.0
    timeout: Duration = 30.0
    unused_min_stats_age: Duration = 7 * 86400.0
    unused_min_size: Size = 1_000_000
    limit: int = Field(default=1000, ge=1, le=1_000_000)


class TablesSettings(CollectorSettings):
    interval: Duration = 300.0
    timeout: Duration = 30.0
    limit: int = Field(default=1000, ge=1, le=1_000_000)


class DatabaseSettings(CollectorSettings):
    interval: Duration = 30.0
    timeout: Duration = 10.0


class CacheSettings(CollectorSettings):
    interval: Duration = 15.0
    timeout: Duration = 5.0
    # Upper bound on namespaces exported from the stats hash (the rest are counted as dropped).
    max_namespaces: int = Field(default=200, ge=1, le=100_000)


class CollectorsConfig(_Model):
    activity: ActivitySettings = ActivitySettings()
    statements: StatementsSettings = StatementsSettings()
    indexes: IndexesSettings = IndexesSettings()
    tables: TablesSettings = TablesSettings()
    database: DatabaseSettings = DatabaseSettings()
    cache: CacheSettings = CacheSettings()


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
        return self

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
        raise ConfigError(_format_errors(e)) from None


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
