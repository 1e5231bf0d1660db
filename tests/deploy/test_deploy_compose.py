"""deploy/docker-compose.yml: it parses, references only files that exist, and every config it
mounts is valid (Prometheus via promtool, the exporter via the packaged check-config, the
PostgreSQL init script by running it and then the exporter against the result)."""

from __future__ import annotations

import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from deploy_files import COMPOSE, REPO, Installed

from exporter.cli import build_parser
from exporter.demo.servers import PostgresCluster, RedisServer

SERVICES = {"postgres", "redis", "exporter", "workload", "prometheus", "grafana"}
BASE = COMPOSE.parent


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = _compose()["services"][name]
    return svc


def _binds(name: str) -> dict[str, Path]:
    """Container path -> host path, for the service's bind mounts."""
    out = {}
    for vol in _service(name).get("volumes", []):
        source, target = vol.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = (BASE / source).resolve()
    return out


def _host_path(name: str, container_path: str) -> Path:
    """Where a file the container reads comes from on the host (through its bind mounts)."""
    p = PurePosixPath(container_path)
    for target, source in _binds(name).items():
        if p == PurePosixPath(target) or PurePosixPath(target) in p.parents:
            return source / p.relative_to(target)
    raise AssertionError(f"{name}: {container_path} is not mounted from the repository")


def test_compose_file_has_the_stack_and_references_only_existing_files() -> None:
    doc = _compose()
    assert set(doc["services"]) == SERVICES
    named = set(doc.get("volumes", {}))
    for name, svc in doc["services"].items():
        assert "image" in svc, f"{name}: no image"
        if "build" in svc:
            ctx = (BASE / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"]["dockerfile"]).is_file(), f"{name}: no Dockerfile"
            assert ctx == REPO
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (BASE / source).exists(), f"{name}: mounts {source}, which does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
        for dep in svc.get("depends_on", {}):
            assert dep in doc["services"], f"{name}: depends on unknown service {dep}"
        for port in svc.get("ports", []):
            host, _, container = str(port).partition(":")
            assert host.isdigit() and container.isdigit()


def test_postgres_preloads_pg_stat_statements() -> None:
    cmd = _service("postgres")["command"]
    assert cmd[0] == "postgres"
    settings = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-c"]
    assert "shared_preload_libraries=pg_stat_statements" in settings
    assert "/docker-entrypoint-initdb.d/" in " ".join(_service("postgres")["volumes"])


def test_exporter_config_passes_check_config_of_the_packaged_program(installed: Installed) -> None:
    env = _service("exporter")["environment"]
    config = _host_path("exporter", env["PGCACHE_CONFIG_FILE"])
    r = installed.run("check-config", str(config), env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_workload_command_is_a_valid_command_line() -> None:
    svc, exporter = _service("workload"), _service("exporter")
    assert svc["image"] == exporter["image"]
    args = build_parser().parse_args(svc["command"])
    assert args.command == "demo-workload"
    assert urlsplit(args.postgres_dsn[0]).hostname == "postgres"
    assert urlsplit(args.redis_url[0]).hostname == "redis"
    # The workload flushes its counters where the exporter reads them.
    config = yaml.safe_load(_host_path("exporter", exporter["environment"]["PGCACHE_CONFIG_FILE"]).read_text())
    assert config["redis"][0]["stats_key"] == "pgcache:stats"


def test_prometheus_config_passes_promtool_and_scrapes_the_exporter(promtool: str) -> None:
    svc = _service("prometheus")
    (flag,) = [a for a in svc["command"] if a.startswith("--config.file=")]
    config = _host_path("prometheus", flag.split("=", 1)[1])
    doc = yaml.safe_load(config.read_text())
    for rules in doc["rule_files"]:
        # Relative paths resolve the same on the host and in the container (the directory is mounted).
        assert not rules.startswith("/"), rules
        assert (config.parent / rules).is_file()
    r = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr and "rule files found" in r.stdout + r.stderr
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "pgcache-exporter"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    port = _service("exporter")["ports"][0].split(":")[1]
    assert targets == [f"exporter:{port}"]


def test_grafana_provisioning_matches_the_mounts() -> None:
    svc = _service("grafana")
    provisioning = _host_path("grafana", "/etc/grafana/provisioning")
    sources = [yaml.safe_load(p.read_text()) for p in sorted(provisioning.rglob("*.y*ml"))]
    datasources = [d for s in sources for d in s.get("datasources", [])]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]
    providers = [p for s in sources for p in s.get("providers", [])]
    assert providers, "no dashboard provider"
    for p in providers:
        folder = _host_path("grafana", p["options"]["path"])
        assert sorted(folder.glob("*.json")), f"{p['options']['path']}: no dashboards mounted there"
    assert svc["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"


def test_init_sql_and_exporter_config_work_against_real_servers(
    installed: Installed, pg_private: PostgresCluster, redis_private: RedisServer
) -> None:
    """What the postgres image's entrypoint does on first start (POSTGRES_DB, then the init
    scripts as the superuser in it), then the exporter with the compose config, once."""
    pg_env = _service("postgres")["environment"]
    db = pg_env["POSTGRES_DB"]
    pg_private.psql(f'CREATE DATABASE "{db}"')
    (init,) = [p for t, p in _binds("postgres").items() if t.startswith("/docker-entrypoint-initdb.d/")]
    pg_private.psql(init.read_text(), db=db)

    env = dict(_service("exporter")["environment"])
    dsn = urlsplit(env["PGCACHE_POSTGRES_DSN"])
    assert dsn.path == f"/{db}"
    # pg_monitor, no more: the compose DSN's role is the one init.sql created.
    row = pg_private.psql(
        f"SELECT pg_has_role('{dsn.username}', 'pg_monitor', 'MEMBER'), rolsuper, rolcreaterole, rolcreatedb "
        f"FROM pg_roles WHERE rolname = '{dsn.username}'", db=db)
    assert row.strip() == "t|f|f|f", row
    assert pg_private.psql("SELECT extname FROM pg_extension WHERE extname = 'pg_stat_statements'", db=db).strip()
    # The workload's role owns the database (it creates the blog's tables).
    wl = urlsplit(build_parser().parse_args(_service("workload")["command"]).postgres_dsn[0])
    owner = pg_private.psql(f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{db}'")
    assert owner.strip() == wl.username

    env["PGCACHE_POSTGRES_DSN"] = pg_private.dsn_for(dsn.username, dsn.password, db=db)
    env["PGCACHE_REDIS_URL"] = redis_private.url
    config = _host_path("exporter", env.pop("PGCACHE_CONFIG_FILE"))
    r = installed.run("once", "--config.file", str(config), env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for family in ("pgcache_up", "pgcache_statement_calls_total", "pgcache_connections_max", "pgcache_redis_up"):
        assert f"\n{family}{{" in r.stdout, f"{family} missing from the exposition"
    assert 'pgcache_up{target="blog"} 1' in r.stdout


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_pinned_image(name: str) -> None:
    image = _service(name)["image"]
    assert ":" in image and not image.endswith(":latest"), image
