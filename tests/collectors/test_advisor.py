"""The index advisor on real servers: PostgreSQL 15 with HypoPG (the demo schema minus one seed
index -> exactly that index is suggested; created -> the advice goes; all seed indexes -> no
advice), PostgreSQL 18 without HypoPG (the fallback says so), and never a write."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import fetch, running_daemon, wait_for
from prometheus_client.parser import text_string_to_metric_families
from prometheus_harness import prometheus_ready, prometheus_server
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from collectors.collector_harness import collect, target_for
from exporter.advisor.collector import AdvisorCollector
from exporter.advisor.settings import AdvisorSettings
from exporter.demo.blog import CachedUserRepository, asyncpg_url, create_schema, seed_data
from exporter.demo.servers import PostgresCluster, find_postgres_bin

REPO = Path(__file__).resolve().parents[2]
ROLE, PASSWORD = "advisor_mon", "advisor-secret-1"
DB = "blog"
SETTINGS = AdvisorSettings(enabled=True, interval=60, timeout=60)
WRITES = ("INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP", "TRUNCATE", "COPY", "GRANT",
          "REVOKE", "VACUUM", "ANALYZE", "REINDEX", "CLUSTER", "COMMENT", "SECURITY", "LOCK", "SET")


def blog_database(pg: PostgresCluster, *, hypopg: bool) -> str:
    """The demo schema and data (scale: tens of thousands of rows) in database `blog`, and a
    monitoring role that may read it (the advisor plans statements: it needs SELECT)."""
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    pg.psql(f"CREATE DATABASE {DB}")
    if hypopg:
        pg.psql("CREATE EXTENSION hypopg", db=DB)
    pg.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}' IN ROLE pg_monitor")
    return pg.dsn_for(ROLE, PASSWORD, db="postgres")


async def seed(pg: PostgresCluster) -> None:
    engine = create_async_engine(asyncpg_url(pg.dsn_for(db=DB)))
    try:
        await create_schema(engine)
        await seed_data(engine, users=20_000, posts=60_000, follows=20_000)
    finally:
        await engine.dispose()
    pg.psql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {ROLE}", db=DB)


async def workload(pg: PostgresCluster, rounds: int = 60) -> None:
    """The repository's reads, uncached (the database is what is measured here)."""
    engine = create_async_engine(asyncpg_url(pg.dsn_for(db=DB)))
    repo = CachedUserRepository(async_sessionmaker(engine), None)  # type: ignore[arg-type]
    rnd = random.Random(7)
    try:
        for i in range(rounds):
            await repo.get_user_with_stats(rnd.randrange(1, 20_000))
            await repo.get_user_with_stats(rnd.randrange(1, 20_000))
            await repo.get_popular_posts(10)
            await repo.recent_posts(20)
            await repo.search_users(("active", "away", "suspended")[i % 3])
            await repo.posts_with_tag(f"topic{i}")
    finally:
        await engine.dispose()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name]


def advice(text: str) -> list[tuple[dict[str, str], float]]:
    return samples(text, "pgcache_index_advice_saving_ratio")


@pytest.fixture(scope="module")
def pg15() -> Iterator[PostgresCluster]:
    with PostgresCluster(find_postgres_bin(15)) as cluster:
        yield cluster


async def alert_fires(dsn: str, tmp: Path) -> None:
    spec = importlib.util.spec_from_file_location("short_rules", REPO / "deploy/prometheus/short_rules.py")
    assert spec and spec.loader
    short_rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(short_rules)
    rules = short_rules.shorten_file(REPO / "deploy/prometheus/alerts.yml", tmp / "alerts.short.yml",
                                     for_="2s", window="10s")
    off = {"enabled": False}
    config = {
        "postgres": [{"name": "main", "dsn": dsn, "databases": {"include": [f"^{DB}$"]}}],
        "collectors": {"activity": off, "statements": off, "indexes": off, "tables": off,
                       "database": off, "cache": off,
                       "advisor": {"enabled": True, "interval": "3s", "timeout": "3s"}},
    }
    async with running_daemon(config) as daemon:
        assert daemon.bound is not None
        host, port = daemon.bound

        async def exported() -> bool:
            _, body = await fetch(daemon)
            return 'pgcache_index_advice_saving_ratio{target="main",datname="blog",schema="public",table="posts",index="author_id"}' in body

        await wait_for(exported, timeout=60, what="the advice on /metrics")
        # exposed_metrics.json says what these families are (the dashboards' and rules' tests read it).
        _, body = await fetch(daemon)
        families = {f.name: f for f in text_string_to_metric_families(body)}
        expected = json.loads((REPO / "tests/dashboards/exposed_metrics.json").read_text())
        opt_in = {n: w for n, w in expected.items() if n != "_comment" and w.get("opt_in") == "collectors.advisor"}
        assert sorted(opt_in) == sorted(n for n in families if n.startswith("pgcache_index_advice_"))
        for name, want in opt_in.items():
            assert families[name].type == want["type"], name
            for sample in families[name].samples:
                assert sorted(sample.labels) == sorted(want["labels"]), name
        with prometheus_server(tmp, f"{host}:{port}", [rules]) as prom:
            await prometheus_ready(prom)

            async def firing() -> list[dict[str, str]]:
                return [a for a in await prom.alerts("PgcacheMissingIndex")
                        if (a["datname"], a["table"], a["index"]) == (DB, "posts", "author_id")]

            await wait_for(firing, timeout=60, what="PgcacheMissingIndex firing")


async def test_advisor_finds_the_dropped_seed_index_and_forgets_it_once_created(
    pg15: PostgresCluster, tmp_path: Path
) -> None:
    dsn = blog_database(pg15, hypopg=True)
    await seed(pg15)
    pg15.psql("DROP INDEX idx_posts_author_published_created", db=DB)
    pg15.psql("SELECT pg_stat_statements_reset()")
    await workload(pg15)
    indexes_before = pg15.psql("SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY 1) FROM pg_index", db=DB)

    async with target_for(dsn, include=(f"^{DB}$",)) as target:
        collector = AdvisorCollector(target, SETTINGS)
        got = await collect(collector)
        found = advice(got.text)
        # Exactly the missing seed index: same table, same leading column.
        assert [(s[0]["datname"], s[0]["table"], s[0]["index"]) for s in found] == [(DB, "posts", "author_id")], got.text
        assert found[0][1] >= 0.5
        share = samples(got.text, "pgcache_index_advice_statement_time_ratio")
        assert share and share[0][1] >= 0.05, got.text
        assert samples(got.text, "pgcache_index_advice_hypopg_available") == [
            ({"target": "main", "datname": DB}, 1.0)]
        assert got.result.dropped == 0

        # The report says the same, as text and JSON, and creates nothing.
        env_dsn = "main=" + dsn
        r = subprocess.run([sys.executable, "-m", "exporter", "report", "missing-indexes",
                            "--postgres-dsn", env_dsn, "--database", DB, "--format", "json"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        (db,) = report["databases"]
        (adv,) = db["advice"]
        assert adv["definition"] == "CREATE INDEX CONCURRENTLY ON public.posts (author_id);"
        assert adv["saving"] >= 0.5 and adv["statements"][0]["calls"] >= 120
        assert "posts.author_id" in adv["statements"][0]["query"]
        assert adv["statements"][0]["cost_after"] < adv["statements"][0]["cost_before"] / 2
        r = subprocess.run([sys.executable, "-m", "exporter", "report", "missing-indexes",
                            "--postgres-dsn", env_dsn, "--database", DB],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "CREATE INDEX CONCURRENTLY ON public.posts (author_id);" in r.stdout
        assert "why: planned with a hypothetical index" in r.stdout

        # Nothing real was created, and no hypothetical index survives in the pooled session.
        assert pg15.psql("SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY 1) FROM pg_index", db=DB) == indexes_before

        # The daemon exports it on /metrics and a real Prometheus fires PgcacheMissingIndex
        # (the real rule, with `for:` shortened to 2s by deploy/prometheus/short_rules.py).
        await alert_fires(dsn, tmp_path)

        # The seed's index back: the advice is gone at the next run, and none other appears
        # (all five seed indexes present: no false positive).
        pg15.psql("CREATE INDEX idx_posts_author_published_created ON posts (author_id, is_published, "
                  "created_at) WHERE is_deleted = false", db=DB)
        await workload(pg15, rounds=20)
        again = await collect(collector)
        assert advice(again.text) == [], again.text
        assert samples(again.text, "pgcache_index_advice_statements_planned")[0][1] >= 5

    # Every statement the exporter's role ran, per pg_stat_statements: no write of any kind.
    ran = pg15.psql(f"SELECT string_agg(query, E'\\n----\\n') FROM pg_stat_statements s "
                    f"JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = '{ROLE}'")
    assert "pg_stat_statements" in ran and "hypopg_create_index" in ran
    for q in ran.split("\n----\n"):
        assert q.lstrip().split()[0].upper() not in WRITES, q


async def test_advisor_without_hypopg_falls_back_to_evidence_and_says_so(
    pg18: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    assert pg18.major == 18
    dsn = blog_database(pg18, hypopg=False)
    await seed(pg18)
    pg18.psql("DROP INDEX idx_posts_author_published_created", db=DB)
    await workload(pg18, rounds=30)
    async with target_for(dsn, include=(f"^{DB}$",)) as target:
        collector = AdvisorCollector(target, SETTINGS)
        with caplog.at_level(logging.WARNING, logger="exporter.advisor.collector"):
            got = await collect(collector)
            await collect(collector)
        assert samples(got.text, "pgcache_index_advice_hypopg_available") == [
            ({"target": "main", "datname": DB}, 0.0)]
        assert advice(got.text) == []
        evidence = samples(got.text, "pgcache_index_advice_seq_scan_statement_time_ratio")
        assert [(s[0]["table"]) for s in evidence] == ["posts"], got.text
        said = [r for r in caplog.records if "HypoPG is not installed in database blog" in r.getMessage()]
        assert len(said) == 1  # once, not every run
        r = subprocess.run([sys.executable, "-m", "exporter", "report", "missing-indexes",
                            "--postgres-dsn", "main=" + dsn, "--database", DB],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "HypoPG is missing" in r.stdout and "public.posts" in r.stdout
