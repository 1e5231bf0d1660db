"""The daemon end to end: faults, readiness, landing page, scrape formats, signals, reload."""

from __future__ import annotations

import asyncio
import gzip
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from daemon_harness import (
    DaemonProcess,
    all_off_except,
    fast_collectors,
    fetch,
    next_round,
    running_daemon,
    url,
    wait_for,
)
from metrics_text import promtool_check_metrics, value

from exporter.demo.servers import PostgresCluster, free_port

OTHERS_OFF = all_off_except("activity")


def cfg(*targets: dict) -> dict:
    return {"postgres": list(targets), "collectors": {**fast_collectors(), **OTHERS_OFF}}


def up(text: str, target: str) -> float | None:
    return value(text, "pgcache_up", target=target)


async def test_postgres_stopped_and_started_again(pg_private: PostgresCluster) -> None:
    dead_port = free_port()
    config = cfg(
        {"name": "main", "dsn": pg_private.dsn, "connect_timeout": "1s"},
        {"name": "nowhere", "dsn": f"postgresql://postgres@127.0.0.1:{dead_port}/postgres", "connect_timeout": "1s"},
    )
    async with running_daemon(config) as d:
        await next_round(d, "activity", "main")
        _, text = await fetch(d)
        # A target unreachable from the start does not stop the others.
        assert up(text, "main") == 1 and up(text, "nowhere") == 0
        assert value(text, "pgcache_collector_success", target="nowhere", collector="activity") == 0
        assert value(text, "pgcache_connections_max", target="main") == 97

        pg_private.stop()
        await wait_for(lambda: d.snapshot.up.get("main") is False, what="pgcache_up 0")
        status, text = await fetch(d)
        assert status == 200 and up(text, "main") == 0
        # The dead target's last figures are gone; its failure is visible.
        assert value(text, "pgcache_connections_max", target="main") is None
        assert value(text, "pgcache_collector_errors_total", target="main", collector="activity") >= 1
        status, page = await fetch(d, "/")
        assert status == 200 and "failing" in page and "cannot connect" in page

        pg_private.start()
        await wait_for(lambda: d.snapshot.up.get("main") is True, what="pgcache_up back to 1")
        await next_round(d, "activity", "main")
        _, text = await fetch(d)
        assert up(text, "main") == 1
        assert value(text, "pgcache_collector_success", target="main", collector="activity") == 1
        assert value(text, "pgcache_connections_max", target="main") == 97


class HangingServer:
    """Accepts TCP connections and never answers: a server that is up but stuck."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


async def test_ready_waits_for_first_round_and_hung_server_times_out(pg: PostgresCluster) -> None:
    hang = HangingServer()
    try:
        config = cfg(
            {"name": "main", "dsn": pg.dsn},
            {"name": "stuck", "dsn": f"postgresql://postgres@127.0.0.1:{hang.port}/postgres", "connect_timeout": "3s"},
        )
        config["collectors"]["activity"] = {"interval": "5s", "timeout": "2s"}
        async with running_daemon(config) as d:
            status, _ = await fetch(d, "/ready")
            assert status == 503
            assert (await fetch(d, "/healthz"))[0] == 200
            started = time.monotonic()
            await wait_for(lambda: d.snapshot.ready, timeout=10, what="ready")
            # The stuck target's run ended within the job timeout (2 s), not at the connect
            # timeout (3 s): connecting is bounded by the collector's timeout too.
            assert time.monotonic() - started < 3.5
            status, _ = await fetch(d, "/ready")
            assert status == 200
            st = d.snapshot.status[("stuck", "activity")]
            assert st.success is False and "no answer in time" in (st.last_error or "")
            # /metrics never waits for the stuck target.
            t0 = time.monotonic()
            status, text = await fetch(d)
            assert status == 200 and time.monotonic() - t0 < 0.5
            assert up(text, "main") == 1
    finally:
        hang.close()


async def test_scrape_formats_and_promtool(pg: PostgresCluster, promtool: str) -> None:
    async with running_daemon(cfg({"name": "a", "dsn": pg.dsn}, {"name": "b", "dsn": pg.dsn})) as d:
        await next_round(d, "activity")
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.get(url(d), headers={"Accept-Encoding": "gzip"}) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                body = gzip.decompress(await r.read())
            async with s.get(url(d), headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as r:
                assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                om = await r.read()
        assert om.rstrip().endswith(b"# EOF")
        promtool_check_metrics(promtool, body)
        text = body.decode()
        # Families from two targets form one group: one TYPE line, samples of both targets.
        assert text.count("# TYPE pgcache_connections_max gauge") == 1
        assert value(text, "pgcache_connections_max", target="a") == value(text, "pgcache_connections_max", target="b") == 97
        assert value(text, "pgcache_build_info") == 1


async def test_landing_page_redacts_secrets(pg: PostgresCluster, tmp_path: Path) -> None:
    pg.psql("DO $$BEGIN CREATE ROLE landing_user LOGIN PASSWORD 'Sup3r-Secret-PW'; EXCEPTION WHEN duplicate_object THEN NULL; END$$")
    wrong = pg.dsn_for("landing_user", "Wr0ng-Secret-PW")
    async with running_daemon(cfg({"name": "badpw", "dsn": wrong})) as d:
        await next_round(d, "activity")
        _, page = await fetch(d, "/")
        _, metrics = await fetch(d)
        assert "password authentication failed" in page
        for text in (page, metrics):
            assert "Wr0ng-Secret-PW" not in text


@pytest.fixture
def proc_log(tmp_path: Path) -> str:
    return str(tmp_path / "daemon.log")


async def http_status(base: str, path: str) -> int | None:
    try:
        async with aiohttp.ClientSession() as s, s.get(base + path, timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status
    except aiohttp.ClientError:
        return None


async def test_sigterm_exits_zero_quickly(pg: PostgresCluster, proc_log: str) -> None:
    p = DaemonProcess("--postgres-dsn", f"main={pg.dsn}", logfile=proc_log).start()
    try:
        await wait_for(lambda: http_status(p.base, "/ready"), what="daemon answering")
        await wait_for(lambda: _eq(http_status(p.base, "/ready"), 200), what="ready")
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        assert await asyncio.to_thread(p.wait, 10) == 0
        assert time.monotonic() - t0 < 5
    finally:
        p.stop()


async def _eq(coro, expected):  # type: ignore[no-untyped-def]
    return (await coro) == expected


async def test_sighup_reload_valid_then_invalid(pg: PostgresCluster, proc_log: str, tmp_path: Path) -> None:
    conf = tmp_path / "config.yaml"
    base_doc = "collectors:\n  activity: {interval: 1s, timeout: 1s}\n  statements: {enabled: false}\n  indexes: {enabled: false}\n  tables: {enabled: false}\n  database: {enabled: false}\n  cache: {enabled: false}\n"
    conf.write_text(f"postgres:\n  - {{name: first, dsn: '{pg.dsn}'}}\n" + base_doc)
    p = DaemonProcess("--config.file", str(conf), logfile=proc_log).start()
    try:
        async def metrics() -> str:
            async with aiohttp.ClientSession() as s, s.get(p.base + "/metrics") as r:
                return await r.text()

        await wait_for(lambda: _contains(metrics(), 'pgcache_up{target="first"} 1\n'), what="first target up")
        # A valid new config takes effect without a restart.
        conf.write_text(f"postgres:\n  - {{name: second, dsn: '{pg.dsn}'}}\n" + base_doc)
        p.signal(signal.SIGHUP)
        await wait_for(lambda: _contains(metrics(), 'pgcache_up{target="second"} 1\n'), what="second target up")
        text = await metrics()
        assert 'target="first"' not in text
        # An invalid one is rejected with a logged error; the running config stays.
        conf.write_text("postgres:\n  - {name: third, dsn: 'postgresql://h/db'}\ncollectors: {activity: {interval: soon}}\n")
        p.signal(signal.SIGHUP)
        await wait_for(lambda: "reload rejected" in p.log(), what="rejection logged")
        assert 'collectors.activity.interval: "soon" is not a duration' in p.log()
        await asyncio.sleep(1.5)
        text = await metrics()
        assert 'pgcache_up{target="second"} 1\n' in text and "third" not in text
        assert p.proc is not None and p.proc.poll() is None
        p.signal(signal.SIGTERM)
        assert await asyncio.to_thread(p.wait, 10) == 0
    finally:
        p.stop()


async def _contains(coro, needle: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        return needle in await coro
    except aiohttp.ClientError:
        return False
