"""Soak of the running daemon: every collector at 1 s on the 2,000-table catalog
(benchmarks/catalog.py) for PGCACHE_SOAK_SECONDS (default 600); the process's RSS and open file
descriptors stay flat, and the exporter never holds more connections than its budget.
Not in the default run: `pytest -m soak tests/soak`."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import asyncpg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from catalog import build_catalog  # noqa: E402
from daemon_harness import fast_collectors, running_daemon  # noqa: E402

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("PGCACHE_SOAK_SECONDS", "600"))
SAMPLE_EVERY = 5.0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def workload(dsn: str, stop: asyncio.Event) -> None:
    """A steady application: a few statements over the catalog, again and again."""
    conn = await asyncpg.connect(dsn)
    try:
        i = 0
        while not stop.is_set():
            await conn.fetchval(f"SELECT count(*) FROM t_{i % 2000} WHERE a = $1", i % 7)
            i += 1
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def test_daemon_soak_on_the_catalog() -> None:
    catalog = await asyncio.to_thread(build_catalog, 2000, 2000, 1, 20_000)
    cluster = catalog.cluster
    print(f"\ncatalog built in {catalog.build_seconds:.0f}s: {catalog.tables} tables, "
          f"{catalog.indexes} indexes", flush=True)
    try:
        config = {
            "postgres": [{"name": "soak", "dsn": catalog.dsn}],
            "collectors": fast_collectors(cache={"enabled": False}),
        }
        stop = asyncio.Event()
        load = asyncio.create_task(workload(catalog.dsn, stop))
        rss: list[int] = []
        fds: list[int] = []
        conns: list[int] = []
        async with running_daemon(config) as d:
            target = d._targets[0]
            started = time.monotonic()
            while time.monotonic() - started < SECONDS:
                await asyncio.sleep(SAMPLE_EVERY)
                rss.append(rss_bytes())
                fds.append(open_fds())
                conns.append(target.open_connections)
            status = {k[1]: (st.runs, st.errors_total) for k, st in d.snapshot.status.items()}
            up = d.snapshot.up.get("soak")
        stop.set()
        await load
    finally:
        cluster.stop()
        cluster.remove()
    warm = max(1, len(rss) // 4)
    growth = max(rss[warm:]) - rss[warm]
    print(f"\nsoak {SECONDS:.0f}s: RSS {rss[warm] / 2**20:.0f} -> max {max(rss[warm:]) / 2**20:.0f} MiB, "
          f"fds {fds[warm]} -> max {max(fds[warm:])}, connections max {max(conns)}, runs/errors {status}")
    assert up is True
    assert growth < 16 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB after warm-up"
    assert max(fds[warm:]) <= fds[warm] + 5, (fds[warm], max(fds[warm:]))
    assert max(conns) <= 3
    # Every collector kept running (a run that times out still counts as one).
    assert all(runs >= SECONDS / 4 for runs, _ in status.values()), status
