"""The command line as an operator meets it: exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from metrics_text import REPO, promtool_check_metrics, value

from exporter import __version__
from exporter.definitions import builtin_definitions
from exporter.demo.servers import PostgresCluster, RedisServer, free_port


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


# -- the operator's first hour ---------------------------------------------------------------------

def test_check_config_rejects_a_bad_port_in_one_line_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad-port.yaml"
    bad.write_text("postgres:\n  - name: main\n    dsn: postgresql://exporter:pw-not-shown@db:54x2/app\n")
    r = run("check-config", str(bad))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"{bad}: postgres[0].dsn: port is not a number from 1 to 65535; if the user name or password "
        "holds @ : / ? or #, percent-encode it (@ is %40)"
    ]
    # What check-config rejects, the commands that would have failed later reject the same way.
    for command in (("once",), ("report", "slow-queries")):
        r = run(*command, "--config.file", str(bad))
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "postgres[0].dsn: port is not a number" in r.stderr
        assert "pw-not-shown" not in r.stderr


def test_check_config_names_every_problem_and_unset_variable_in_one_run(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("PGCACHE_POSTGRES_DSN", "PGCACHE_REDIS_URL")}
    r = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(REPO / "config.example.yaml")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"{REPO / 'config.example.yaml'}: postgres[0].dsn: environment variable PGCACHE_POSTGRES_DSN is not set",
        f"{REPO / 'config.example.yaml'}: redis[0].url: environment variable PGCACHE_REDIS_URL is not set",
    ]
    bad = tmp_path / "many.yaml"
    bad.write_text(
        "postgres:\n"
        "  - {name: a, dsn: 'postgresql://u@h:99999/db?sslmode=sometimes'}\n"
        "  - {name: b, dsn: '${NOPE_DSN}'}\n"
        "redis:\n"
        "  - {name: r, url: 'redis://r:6379/zero'}\n"
        "collectors:\n  tables: {interval: soon}\n"
    )
    r = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(bad)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 5, lines
    for key in ("postgres[1].dsn: environment variable NOPE_DSN is not set", "postgres[0].dsn: port",
                "postgres[0].dsn: option sslmode", "redis[0].url: the database", "collectors.tables.interval:"):
        assert any(line.startswith(f"{bad}: {key}") for line in lines), (key, lines)


def test_port_in_use_is_one_line_and_exit_2() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("--redis-url", "redis://127.0.0.1:1/0", "--web.listen-address", f"127.0.0.1:{port}")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if " INFO " not in line]
    assert errors == [
        f"pgcache-exporter: web.listen_address: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(is another exporter running? choose another port with --web.listen-address)"
    ], r.stderr


def test_demo_prints_no_url_when_the_port_is_taken() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("demo", "--web.listen-address", f"127.0.0.1:{port}")
    assert r.returncode == 2, r.stderr
    assert "metrics: http" not in r.stdout
    assert "Address already in use" in r.stderr and "Traceback" not in r.stderr


def test_once_on_a_dead_target_says_each_thing_once_and_quickly() -> None:
    import time

    dead = f"postgresql://postgres:pw-not-shown@127.0.0.1:{free_port()}/postgres"
    started = time.monotonic()
    r = run("once", "--postgres-dsn", f"dead={dead}")
    elapsed = time.monotonic() - started
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == len(set(lines)) == 1, lines
    assert lines[0].startswith("pgcache-exporter: target dead, database postgres: cannot connect:")
    enabled = ", ".join(d.name for d in builtin_definitions() if d.enabled)
    assert lines[0].endswith(f"(collectors {enabled})")
    # No collector waits for a pool slot (5 s) behind a refused connection.
    assert "QueuePool" not in r.stderr
    print(f"once on a refused connection: {elapsed:.1f}s")


def test_report_help_lists_only_what_reports_use() -> None:
    for command in (("report", "--help"), ("report", "slow-queries", "--help"), ("explain", "--help")):
        r = run(*command)
        assert r.returncode == 0
        assert "--postgres-dsn" in r.stdout and "--config.file" in r.stdout
        for daemon_only in ("--web.listen-address", "--web.config.file", "--redis-url", "--shard.index",
                            "--log.format"):
            assert daemon_only not in r.stdout, (command, daemon_only)


def test_two_bare_redis_urls_on_one_server_run_side_by_side(redis_server: RedisServer) -> None:
    base = f"redis://127.0.0.1:{redis_server.port}"
    r = run("once", "--redis-url", f"{base}/1", "--redis-url", f"{base}/2")
    assert r.returncode == 0, r.stderr
    for db in ("1", "2"):
        assert value(r.stdout, "pgcache_up", target=f"127.0.0.1:{redis_server.port}/{db}") == 1


def test_explain_without_select_privilege_exits_1_with_what_to_grant(pg: PostgresCluster) -> None:
    pg.psql("DROP TABLE IF EXISTS guarded; CREATE TABLE guarded (id int)")
    pg.psql("DROP ROLE IF EXISTS monitor_only; "
            "CREATE ROLE monitor_only LOGIN PASSWORD 'monitor-pw' IN ROLE pg_monitor")
    r = run("explain", "SELECT * FROM guarded",
            env={"PGCACHE_POSTGRES_DSN": pg.dsn_for("monitor_only", "monitor-pw")})
    assert r.returncode == 1, r.stderr
    assert "permission denied for table guarded" in r.stderr
    assert "explain needs, beyond pg_monitor, SELECT on every table the statement reads" in r.stderr
    assert "GRANT SELECT ON ALL TABLES IN SCHEMA public TO monitor_only;" in r.stderr
    assert "GRANT pg_read_all_data TO monitor_only;" in r.stderr
    assert "monitor-pw" not in r.stderr
    # The grant it names is enough.
    pg.psql("GRANT pg_read_all_data TO monitor_only")
    r = run("explain", "SELECT * FROM guarded",
            env={"PGCACHE_POSTGRES_DSN": pg.dsn_for("monitor_only", "monitor-pw")})
    assert r.returncode == 0, r.stderr


def test_demo_workload_prints_progress(pg: PostgresCluster, redis_server: RedisServer) -> None:
    import signal
    import time

    pg.psql("DROP DATABASE IF EXISTS workload_progress")
    pg.psql("CREATE DATABASE workload_progress")
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "demo-workload", "--rate", "50",
         "--postgres-dsn", pg.dsn_for(db="workload_progress"), "--redis-url", f"{redis_server.url}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )
    try:
        time.sleep(12)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    running = [line for line in out.splitlines() if ": running: " in line]
    assert running, out + err
    import re

    m = re.fullmatch(r"pgcache-exporter demo-workload: running: (\d+) operations in (\d+)s "
                     r"\((\d+\.\d)/s\), (\d+) errors", running[-1])
    assert m, running[-1]
    assert int(m.group(1)) > 0 and m.group(4) == "0"
    assert "pgcache-exporter demo-workload: finished:" in out.splitlines()[-1]


def test_demo_prints_its_url_once_it_answers_there() -> None:
    import os
    import re
    import signal
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "demo", "--web.listen-address", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ),
    )
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            m = re.search(r"metrics: (http://\S+/metrics)", line)
            if m:
                url = m.group(1)
                break
        assert url == f"http://127.0.0.1:{port}/metrics"
        # Printed means listening: the very next request is answered.
        with urllib.request.urlopen(url.replace("/metrics", "/healthz"), timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
