"""Config validation: every rejection names the key path; env, secret files and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.config import ConfigError, build_config, load_config, parse_duration, parse_size
from exporter.errors import ConfigError as ErrorsConfigError

DSN = "postgresql://exporter:s3cr3t-pw@db.example:5432/app"


def reject(raw: dict, *fragments: str) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_config_error_is_the_documented_one():
    assert ConfigError is ErrorsConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("15s", 15), ("5m", 300), ("7d", 604800), ("1m30s", 90), (10, 10.0), ("1.5h", 5400)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("512kB", 512_000), ("10MB", 10_000_000), ("1GiB", 2**30), (42, 42)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_bad_duration_names_key_and_value():
    msg = reject({"collectors": {"statements": {"interval": "fast"}}})
    assert msg == 'collectors.statements.interval: "fast" is not a duration (write e.g. 500ms, 15s, 5m, 7d)'


def test_bad_size():
    reject({"collectors": {"indexes": {"unused_min_size": "huge"}}},
           'collectors.indexes.unused_min_size: "huge" is not a size')


def test_unknown_key_top_level_and_nested():
    reject({"colectors": {}}, "colectors: unknown key")
    reject({"collectors": {"activity": {"intervall": "5s"}}}, "collectors.activity.intervall: unknown key")
    reject({"postgres": [{"name": "a", "dsn": DSN, "dbs": []}]}, "postgres[0].dbs: unknown key")


def test_wrong_types():
    reject({"collectors": {"statements": {"limit": "many"}}}, "collectors.statements.limit:")
    reject({"postgres": {"name": "a"}}, "postgres:")
    reject({"log": {"format": "xml"}}, "log.format: must be one of 'text' or 'json'")


def test_duplicate_target_names_across_sections():
    reject(
        {"postgres": [{"name": "main", "dsn": DSN}], "redis": [{"name": "main", "url": "redis://r:6379/0"}]},
        "redis[0].name: target name 'main' is used twice",
    )
    reject({"postgres": [{"name": "a", "dsn": DSN}, {"name": "a", "dsn": DSN}]}, "postgres[1].name")


def test_missing_dsn():
    reject({"postgres": [{"name": "a"}]}, "postgres[0]: dsn (or dsn_file) is required")


def test_bad_dsn_is_not_echoed():
    msg = reject({"postgres": [{"name": "a", "dsn": "mysql://root:hunter22@h/db"}]}, "postgres[0].dsn: not a PostgreSQL URL")
    assert "hunter22" not in msg


def test_timeout_longer_than_interval():
    reject({"collectors": {"tables": {"interval": "10s", "timeout": "20s"}}},
           "collectors.tables: timeout must be more than 0 and at most the interval")


def test_bad_regex_and_listen_address():
    reject({"postgres": [{"name": "a", "dsn": DSN, "databases": {"include": ["("]}}]},
           "postgres[0].databases.include[0]:", "not a valid regular expression")
    reject({"web": {"listen_address": "localhost"}}, "web.listen_address:", "not a listen address")


def test_defaults_match_design():
    c = build_config({})
    assert c.web.listen_address == ":19187"
    assert (c.collectors.activity.interval, c.collectors.activity.timeout) == (15, 5)
    assert (c.collectors.statements.limit, c.collectors.statements.query_text_length) == (200, 200)
    assert c.collectors.indexes.unused_min_stats_age == 7 * 86400
    assert c.collectors.indexes.unused_min_size == 1_000_000
    assert c.collectors.tables.limit == 1000


def test_models_are_frozen():
    c = build_config({})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen models
        c.web.listen_address = ":1"  # type: ignore[misc]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_env_expansion(tmp_path):
    p = write(tmp_path, "postgres:\n  - name: main\n    dsn: ${PG_DSN}\nweb:\n  listen_address: ${ADDR:-127.0.0.1:9999}\n")
    c = load_config(p, env={"PG_DSN": DSN})
    assert c.postgres[0].resolved_dsn() == DSN
    assert c.web.listen_address == "127.0.0.1:9999"


def test_env_variable_missing_names_key_and_variable(tmp_path):
    p = write(tmp_path, "postgres:\n  - name: main\n    dsn: ${NOPE_DSN}\n")
    with pytest.raises(ConfigError, match=r"postgres\[0\]\.dsn: environment variable NOPE_DSN is not set"):
        load_config(p, env={})


def test_secret_files(tmp_path):
    (tmp_path / "pg-dsn").write_text(DSN + "\n")
    (tmp_path / "redis-url").write_text("redis://:pw-redis@r:6379/0")
    p = write(tmp_path, "postgres:\n  - {name: main, dsn_file: pg-dsn}\nredis:\n  - {name: cache, url_file: " + str(tmp_path / "redis-url") + "}\n")
    c = load_config(p, env={})
    assert c.postgres[0].resolved_dsn() == DSN
    assert c.redis[0].resolved_url() == "redis://:pw-redis@r:6379/0"
    assert "s3cr3t-pw" in c.secrets() and "pw-redis" in c.secrets()
    assert "s3cr3t-pw" not in repr(c)  # SecretStr: never in a repr or a traceback


def test_secret_file_missing_and_both_given(tmp_path):
    p = write(tmp_path, "postgres:\n  - {name: main, dsn_file: /nonexistent/dsn}\n")
    with pytest.raises(ConfigError, match=r"postgres\[0\]\.dsn_file: cannot read /nonexistent/dsn"):
        load_config(p, env={})
    (tmp_path / "dsn").write_text(DSN)
    p = write(tmp_path, f"postgres:\n  - {{name: main, dsn: '{DSN}', dsn_file: dsn}}\n")
    with pytest.raises(ConfigError, match=r"exactly one of dsn or dsn_file"):
        load_config(p, env={})


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "postgres: [\n"), env={})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), env={})


def test_flags_override_file(tmp_path):
    p = write(tmp_path, f"postgres:\n  - {{name: filetarget, dsn: '{DSN}'}}\nweb: {{listen_address: ':1234'}}\nlog: {{level: info}}\n")
    c = load_config(
        p,
        postgres_dsns=["flagged=postgresql://u@other:5433/x"],
        listen_address="127.0.0.1:5555",
        log_level="debug",
        env={},
    )
    assert [t.name for t in c.postgres] == ["flagged"]
    assert c.web.listen_address == "127.0.0.1:5555"
    assert c.log.level == "debug"


def test_no_file_form_from_flags_and_env():
    c = load_config(postgres_dsns=[DSN], redis_urls=["redis://localhost:6379/0"], env={})
    assert c.postgres[0].name == "db.example:5432/app"  # named after host, port and database
    assert c.redis[0].name == "localhost:6379"  # Redis's default database 0 adds nothing
    c = load_config(env={"PGCACHE_POSTGRES_DSN": DSN, "PGCACHE_REDIS_URL": "redis://r:1/0"})
    assert c.postgres[0].resolved_dsn() == DSN and c.redis[0].resolved_url() == "redis://r:1/0"
    # A file's targets win over the environment; a flag wins over both.
    c = load_config(postgres_dsns=["postgresql://a@b/c"], env={"PGCACHE_POSTGRES_DSN": DSN})
    assert c.postgres[0].resolved_dsn() == "postgresql://a@b/c"


def test_example_config_is_valid():
    example = Path(__file__).resolve().parents[2] / "config.example.yaml"
    c = load_config(example, env={"PGCACHE_POSTGRES_DSN": DSN, "PGCACHE_REDIS_URL": "redis://r:6379/0"})
    assert c.postgres and c.redis


def test_shards_split_targets_exactly_once():
    from exporter.daemon import target_kinds

    targets = [{"name": f"pg{i}", "dsn": f"postgresql://u@h{i}/db"} for i in range(6)]
    owners: dict[str, list[int]] = {}
    for index in range(3):
        c = build_config({"postgres": targets, "shard": {"index": index, "total": 3}})
        for name, _ in target_kinds(c):
            owners.setdefault(name, []).append(index)
    assert sorted(owners) == [f"pg{i}" for i in range(6)]
    assert all(len(v) == 1 for v in owners.values()), owners
    assert len({v[0] for v in owners.values()}) > 1  # not all on one replica


def test_shard_index_from_pod_name_flag_and_env():
    c = load_config(postgres_dsns=[DSN], shard_index="pgcache-exporter-2", shard_total="3", env={})
    assert (c.shard.index, c.shard.total) == (2, 3)
    c = load_config(postgres_dsns=[DSN], env={"PGCACHE_SHARD_INDEX": "1", "PGCACHE_SHARD_TOTAL": "2"})
    assert (c.shard.index, c.shard.total) == (1, 2)
    reject({"shard": {"index": 3, "total": 3}}, "shard: index 3 is not in 0..2")
    reject({"shard": {"index": "web-x"}}, 'shard.index: "web-x" is not a shard index')


# -- DSNs and URLs, checked in full without connecting ------------------------------------------


def dsn_errors(dsn: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        build_config({"postgres": [{"name": "a", "dsn": dsn}]})
    lines = str(e.value).splitlines()
    assert all(line.startswith("postgres[0].dsn: ") for line in lines), lines
    return lines


def url_errors(url: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        build_config({"redis": [{"name": "a", "url": url}]})
    lines = str(e.value).splitlines()
    assert all(line.startswith("redis[0].url: ") for line in lines), lines
    return lines


def test_non_numeric_port_is_one_line_naming_the_key():
    assert dsn_errors("postgresql://exporter:s3cr3t-pw@db.example:54x2/app") == [
        "postgres[0].dsn: port is not a number from 1 to 65535; if the user name or password "
        "holds @ : / ? or #, percent-encode it (@ is %40)"
    ]


@pytest.mark.parametrize(
    ("dsn", "fragment"),
    [
        ("postgresql://u:pw@h:0/db", "port is not a number from 1 to 65535"),
        ("postgresql://u:pw@h:70000/db", "port is not a number from 1 to 65535"),
        ("postgresql://u:p@ss@h/db", "more than one @ before the host"),
        ("postgresql://u@bad host/db", "a host is not a valid host name"),
        ("postgresql://u@[::zz]:5432/db", "not an IPv6 address"),
        ("postgresql://u@h/db?sslmode=verify", "option sslmode: must be one of disable"),
        ("postgresql://u@h/db?target_session_attrs=rw", "option target_session_attrs: must be one of"),
        ("postgresql://u@h/db?connect_timeout=5", "set postgres[].connect_timeout instead"),
        ("postgresql://u@h/db?sslrootcert=/nonexistent/ca.crt", 'no readable file at "/nonexistent/ca.crt"'),
        ("postgresql://u@h/db?port=x", "option port: a port is not a number"),
        ("postgresql://u@h/db?sslmode", "not key=value pairs"),
        ("postgresql://u@h/a/b", "the database name holds a /"),
        ("mysql://u@h/db", "the scheme must be postgresql:// or postgres://"),
    ],
)
def test_dsn_problems(dsn, fragment):
    lines = dsn_errors(dsn)
    assert any(fragment in line for line in lines), lines


def test_every_dsn_problem_in_one_run_and_no_secret_echoed():
    # A / in the password splits the URL in the wrong place: part of the password lands where
    # the port should be. The error says so without showing it.
    lines = dsn_errors("postgresql://u:pa/hunter22@h:5432/db?sslmode=nope&keepalives=1")
    assert len(lines) >= 4, lines
    assert any("option sslmode" in line for line in lines)
    assert any("option keepalives" in line for line in lines)
    assert "hunter22" not in "\n".join(lines) and "pa/" not in "\n".join(lines)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:pw@db.example:5432/app",
        "postgres://u@h1:5432,h2:5433/app?target_session_attrs=read-write",
        "postgresql:///app?host=/var/run/postgresql",
        "postgresql://u@[::1]:5432/app?sslmode=verify-full&application_name=x",
        "postgresql://u:p%40ss%2Fw@h/app",
        "postgresql://h",
    ],
)
def test_good_dsns_pass_and_asyncpg_reads_them(dsn):
    from asyncpg.connect_utils import _parse_connect_dsn_and_args

    build_config({"postgres": [{"name": "a", "dsn": dsn}]})
    _parse_connect_dsn_and_args(  # the driver's own parser agrees (it connects to nothing)
        dsn=dsn, host=None, port=None, user=None, password=None, passfile=None, database=None,
        ssl=None if "verify-full" not in dsn else "disable", service=None, servicefile=None,
        direct_tls=None, server_settings=None, target_session_attrs=None, krbsrvname=None,
        gsslib=None,
    )


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis://r:63x9/0", "port is not a number"),
        ("redis://r:6379/one", "the database after the host must be a number"),
        ("redis://r:6379/0?socket_timeout=soon", "option socket_timeout: must be a number of seconds"),
        ("redis://r:6379/0?colour=blue", "option colour: not an option redis-py accepts"),
        ("redis://a:6379,b:6379/0", "a Redis URL names one host"),
        ("unix://", "needs the socket path"),
        ("http://r:6379/0", "the scheme must be redis://, rediss:// or unix://"),
    ],
)
def test_redis_url_problems(url, fragment):
    lines = url_errors(url)
    assert any(fragment in line for line in lines), lines


@pytest.mark.parametrize(
    "url", ["redis://r:6379/0", "rediss://:pw@r:6380/2?socket_timeout=0.5", "unix:///run/redis.sock?db=1",
            "redis://r", "redis://[::1]:6379/3"],
)
def test_good_redis_urls_pass_and_redis_py_reads_them(url):
    from redis.connection import parse_url

    build_config({"redis": [{"name": "a", "url": url}]})
    parse_url(url)


def test_every_unset_variable_in_one_run(tmp_path):
    p = write(tmp_path, "postgres:\n  - name: main\n    dsn: ${NOPE_DSN}\n"
                        "redis:\n  - name: cache\n    url: ${NOPE_URL}\n"
                        "web:\n  listen_address: ${NOPE_ADDR:-:19187}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, env={})
    assert str(e.value).splitlines() == [
        "postgres[0].dsn: environment variable NOPE_DSN is not set",
        "redis[0].url: environment variable NOPE_URL is not set",
    ]


def test_bare_urls_keep_their_database_so_two_never_collide():
    c = load_config(redis_urls=["redis://cache:6379/1", "redis://cache:6379/2", "redis://cache:6379/0"],
                    postgres_dsns=["postgresql://u:pw@db:5432/app", "postgresql://u:pw@db:5432/billing"],
                    env={})
    assert [t.name for t in c.redis] == ["cache:6379/1", "cache:6379/2", "cache:6379"]
    assert [t.name for t in c.postgres] == ["db:5432/app", "db:5432/billing"]
    assert load_config(redis_urls=["redis://cache?db=4"], env={}).redis[0].name == "cache/4"
    assert load_config(redis_urls=["unix:///run/redis.sock?db=1"], env={}).redis[0].name == "/run/redis.sock/1"
    assert "pw" not in " ".join(t.name for t in c.postgres)


def test_web_limits_have_defaults_and_are_checked():
    c = build_config({})
    assert (c.web.header_timeout, c.web.idle_timeout, c.web.write_timeout, c.web.max_connections) == (
        10, 75, 30, 512)
    c = build_config({"web": {"header_timeout": "2s", "idle_timeout": "1m", "write_timeout": "5s",
                              "max_connections": 64}})
    assert (c.web.header_timeout, c.web.idle_timeout, c.web.write_timeout, c.web.max_connections) == (
        2, 60, 5, 64)
    reject({"web": {"header_timeout": "0s"}}, "web.header_timeout: must be more than 0")
    reject({"web": {"max_connections": 0}}, "web.max_connections:")
