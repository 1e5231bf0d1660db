"""Fixtures that start real servers for the suite: a throwaway PostgreSQL cluster with
pg_stat_statements preloaded and a throwaway redis-server. A missing server binary fails the
test loudly (never a skip): CI installs them through .ci/run."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.demo.servers import PostgresCluster, RedisServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    """One cluster for the session. Tests that stop or break it use `pg_private` instead."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def pg_private() -> Iterator[PostgresCluster]:
    """A cluster of the test's own, for tests that stop, kill or reconfigure the server."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_private() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (.ci/run does)")
    return exe


def promtool_check_metrics(promtool: str, exposition: bytes) -> None:
    """Fail with promtool's own words when the exposition is not valid."""
    r = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True)
    # promtool exits 1 on lint problems as well as on parse errors; both are failures for us.
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


# Test helper modules (daemon_harness, metrics_text) live beside the tests.
import sys as _sys  # noqa: E402

_sys.path.insert(0, str(Path(__file__).resolve().parent))
_sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
