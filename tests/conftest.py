"""Fixtures that start real servers for the suite: a throwaway PostgreSQL cluster with
pg_stat_statements preloaded and a throwaway redis-server. A missing server binary fails the
test loudly (never a skip): CI installs them through .ci/run."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.demo.servers import PostgresCluster, RedisServer

REPO = Path(__file__).resolve().parent.parent

# Test helper modules (daemon_harness, metrics_text) live beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))


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
