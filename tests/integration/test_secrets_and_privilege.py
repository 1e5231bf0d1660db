"""Secrets never leave the process; the README's least-privilege role is all the exporter needs,
and it never writes to the database it watches."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
from daemon_harness import DaemonProcess, wait_for
from metrics_text import samples

from exporter.definitions import builtin_definitions
from exporter.demo.servers import PostgresCluster, RedisServer, free_port
from exporter.postgres.engine import SQL_MARK

SECRETS = {
    "pg_wrong": "Wrong-PG-Secret-1",
    "pg_right": "Right-PG-Secret-2",
    "redis_right": "Right-Redis-Secret-3",
    "redis_wrong": "Wrong-Redis-Secret-4",
    "redis_dead": "Dead-Redis-Secret-5",
}

# The README's recipe, word for word (README.md, "Least privilege").
ROLE_RECIPE = "CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE pg_monitor"


FAST_COLLECTORS = "".join(f"  {d.name}: {{interval: 1s, timeout: 1s}}\n" for d in builtin_definitions())


def make_role(pg: PostgresCluster, name: str, password: str) -> None:
    pg.psql(ROLE_RECIPE.format(name=name, password=password))


def test_readme_has_the_role_recipe() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "CREATE ROLE pgcache_exporter LOGIN PASSWORD 'choose-one' IN ROLE pg_monitor;" in readme


async def test_secrets_never_appear_in_logs_pages_or_errors(tmp_path: Path) -> None:
    with PostgresCluster() as pg, RedisServer(extra_args=["--requirepass", SECRETS["redis_right"]]) as redis:
        make_role(pg, "pgcache_exporter", SECRETS["pg_right"])
        conf = tmp_path / "config.yaml"
        conf.write_text(f"""
log: {{level: debug}}
postgres:
  - {{name: good, dsn: '{pg.dsn_for("pgcache_exporter", SECRETS["pg_right"])}'}}
  - {{name: badpw, dsn: '{pg.dsn_for("pgcache_exporter", SECRETS["pg_wrong"])}'}}
redis:
  - {{name: cache, url: 'redis://:{SECRETS["redis_right"]}@127.0.0.1:{redis.port}/0'}}
  - {{name: cachebad, url: 'redis://:{SECRETS["redis_wrong"]}@127.0.0.1:{redis.port}/0'}}
  - {{name: cachedead, url: 'redis://:{SECRETS["redis_dead"]}@127.0.0.1:{free_port()}/0'}}
collectors:
{FAST_COLLECTORS}  cache: {{interval: 1s, timeout: 1s}}
""")
        p = DaemonProcess("--config.file", str(conf), logfile=str(tmp_path / "daemon.log")).start()
        outputs: dict[str, str] = {}
        try:
            async def get(path: str) -> str:
                async with aiohttp.ClientSession() as s, s.get(p.base + path) as r:
                    return await r.text()

            async def collected() -> bool:
                try:
                    body = await get("/metrics")
                except aiohttp.ClientError:
                    return False
                # Every built-in collector on two PostgreSQL targets, the cache on three Redis ones.
                return len(samples(body, "pgcache_collector_runs_total")) == 2 * len([d for d in builtin_definitions() if d.enabled]) + 3 and min(
                    samples(body, "pgcache_collector_runs_total")) >= 2

            await wait_for(collected, timeout=30, what="two rounds of every job")
            outputs["/metrics"] = await get("/metrics")
            outputs["/"] = await get("/")
            # The failures really happened (so the sweep below means something).
            assert "password authentication failed" in outputs["/"]
            assert outputs["/"].count("failing") >= 3
            assert 'pgcache_up{target="good"} 1\n' in outputs["/metrics"]
            assert 'pgcache_up{target="cache"} 1\n' in outputs["/metrics"]
            # A reload that fails on purpose with the secret in the rejected file.
            conf.write_text(conf.read_text().replace("interval: 1s, timeout: 1s}\n  cache",
                                                     "interval: nope, timeout: 1s}\n  cache"))
            p.signal(signal.SIGHUP)
            await wait_for(lambda: "reload rejected" in p.log(), what="rejected reload")
            p.signal(signal.SIGTERM)
            assert await asyncio.to_thread(p.wait, 10) == 0
        finally:
            p.stop()
        outputs["log"] = p.log()
        once = subprocess.run([sys.executable, "-m", "exporter", "once", "--config.file", str(conf)],
                              capture_output=True, text=True, timeout=60)
        outputs["once stdout"], outputs["once stderr"] = once.stdout, once.stderr
        assert once.returncode == 2  # the file is invalid now
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"postgres:\n  - {{name: x, dsn: 'mysql://root:{SECRETS['pg_wrong']}@h/db'}}\n")
        chk = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(bad)],
                             capture_output=True, text=True, timeout=60)
        assert chk.returncode == 2
        outputs["check-config"] = chk.stdout + chk.stderr
        assert "DEBUG" in outputs["log"] and "cannot connect" in outputs["log"] + outputs["/"]
        for where, text in outputs.items():
            for name, secret in SECRETS.items():
                assert secret not in text, f"{name} leaked into {where}"


async def test_pg_monitor_role_collects_everything_and_never_writes(tmp_path: Path) -> None:
    with PostgresCluster() as pg:
        make_role(pg, "pgcache_exporter", "choose-one")
        pg.psql("CREATE TABLE t(id int primary key, v text); CREATE INDEX t_v ON t(v); INSERT INTO t SELECT g, g::text FROM generate_series(1, 100) g")
        r = subprocess.run(
            [sys.executable, "-m", "exporter", "once", "--postgres-dsn",
             "main=" + pg.dsn_for("pgcache_exporter", "choose-one")],
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stderr
        for collector in [d.name for d in builtin_definitions() if d.enabled]:
            assert f'pgcache_collector_success{{target="main",collector="{collector}"}} 1\n' in r.stdout, (collector, r.stderr)
        assert 'table="t"' in r.stdout and 'index="t_v"' in r.stdout
        # Everything the exporter's role ran, per pg_stat_statements: reads only.
        conn = await asyncpg.connect(pg.dsn)
        try:
            rows = await conn.fetch(
                "SELECT query FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
                "WHERE r.rolname = 'pgcache_exporter'"
            )
        finally:
            await conn.close()
        assert rows
        def first_word(sql: str) -> str:
            # The definitions' SQL may open with -- comments, which pg_stat_statements keeps.
            sql = sql.removeprefix(SQL_MARK)  # every statement the exporter sends opens with it
            code = [line for line in sql.splitlines() if line.strip() and not line.strip().startswith("--")]
            return code[0].split()[0].upper()

        writes = [r["query"] for r in rows if first_word(r["query"]) not in ("SELECT", "WITH", "SHOW", "BEGIN", "ROLLBACK",
                                                                             "SAVEPOINT", "RELEASE")]
        assert not writes, writes
