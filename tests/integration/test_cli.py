"""The command line as an operator meets it: exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from metrics_text import REPO, promtool_check_metrics, value

from exporter import __version__
from exporter.demo.servers import PostgresCluster, free_port


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"pgcache-exporter {__version__}"


def test_check_config_ok_and_bad(tmp_path: Path) -> None:
    r = run("check-config", str(REPO / "config.example.yaml"),
            env={"PGCACHE_POSTGRES_DSN": "postgresql://u:pw@h/db", "PGCACHE_REDIS_URL": "redis://r/0"})
    assert r.returncode == 0, r.stderr
    assert "OK (1 PostgreSQL and 1 Redis target(s))" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("collectors:\n  statements:\n    interval: fast\n")
    r = run("check-config", str(bad))
    assert r.returncode == 2
    assert 'collectors.statements.interval: "fast" is not a duration' in r.stderr


def test_run_without_targets_says_what_to_do() -> None:
    r = run("run", env={"PGCACHE_POSTGRES_DSN": "", "PGCACHE_REDIS_URL": ""})
    assert r.returncode == 2
    assert "no targets configured" in r.stderr and "--postgres-dsn" in r.stderr


def test_once_prints_valid_exposition(pg: PostgresCluster, promtool: str) -> None:
    r = run("once", "--postgres-dsn", f"main={pg.dsn}")
    assert r.returncode == 0, r.stderr
    promtool_check_metrics(promtool, r.stdout.encode())
    assert value(r.stdout, "pgcache_up", target="main") == 1
    assert value(r.stdout, "pgcache_collector_success", target="main", collector="activity") == 1


def test_once_fails_when_a_target_fails(pg: PostgresCluster) -> None:
    dead = f"postgresql://postgres:pw-not-shown@127.0.0.1:{free_port()}/postgres"
    r = run("once", "--postgres-dsn", f"main={pg.dsn}", "--postgres-dsn", f"dead={dead}")
    assert r.returncode == 1
    assert value(r.stdout, "pgcache_up", target="dead") == 0
    assert value(r.stdout, "pgcache_up", target="main") == 1
    assert "target dead" in r.stderr and "cannot connect" in r.stderr
    assert "pw-not-shown" not in r.stdout + r.stderr
