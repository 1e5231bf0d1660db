"""`sequences`: a sequence pushed to 80 % of its range is exported with its used fraction and the
values it has left; one at 10 % is cut (counted in series); one the monitor role may not read is
counted as unreadable. collectors.sequences.threshold moves the cut."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from metrics_text import value

from collectors.collector_harness import (
    MONITOR_USER,
    builtin,
    collect,
    create_monitor_role,
    drop_database,
    fresh_database,
    promtool_check_metrics,
    target_for,
)
from exporter.demo.servers import PostgresCluster

SETUP = f"""
CREATE SEQUENCE nearly_out MAXVALUE 1000;
SELECT setval('nearly_out', 800);
CREATE SEQUENCE counting_down INCREMENT -1 MINVALUE 1 MAXVALUE 1000 START 1000;
SELECT setval('counting_down', 101);
CREATE SEQUENCE plenty MAXVALUE 1000;
SELECT setval('plenty', 100);
CREATE SEQUENCE secret MAXVALUE 1000;
SELECT setval('secret', 999);
GRANT SELECT ON nearly_out, counting_down, plenty TO {MONITOR_USER};
"""


@pytest.fixture
def seqdb(cluster: PostgresCluster) -> Iterator[str]:
    create_monitor_role(cluster)
    name = fresh_database(cluster, "seq_probe", SETUP)
    yield name
    drop_database(cluster, name)


async def test_a_sequence_at_80_percent_is_exported(cluster: PostgresCluster, seqdb: str, promtool: str) -> None:
    async with target_for(create_monitor_role(cluster), include=(f"^{seqdb}$",)) as t:
        got = await collect(builtin(t, "sequences"))
        stricter = await collect(builtin(t, "sequences", threshold=0.85))
    promtool_check_metrics(promtool, got.text.encode())
    at = {"datname": seqdb, "schemaname": "public"}
    assert value(got.text, "pgcache_sequence_used_ratio", sequencename="nearly_out", **at) == pytest.approx(799 / 999)
    assert value(got.text, "pgcache_sequence_remaining_values", sequencename="nearly_out", **at) == 200
    # Counting down from 1000 to 101: 90 % used, 100 values left.
    assert value(got.text, "pgcache_sequence_used_ratio", sequencename="counting_down", **at) == pytest.approx(899 / 999)
    assert value(got.text, "pgcache_sequence_remaining_values", sequencename="counting_down", **at) == 100
    assert value(got.text, "pgcache_sequence_used_ratio", sequencename="plenty", **at) is None
    assert got.result.dropped == 2  # plenty's two series
    assert value(got.text, "pgcache_sequences", datname=seqdb) == 4
    assert value(got.text, "pgcache_sequences_unreadable", datname=seqdb) == 1
    assert value(got.text, "pgcache_sequence_used_ratio", sequencename="secret", **at) is None
    # threshold 0.85: only counting_down is left.
    assert value(stricter.text, "pgcache_sequence_used_ratio", sequencename="nearly_out", **at) is None
    assert value(stricter.text, "pgcache_sequence_used_ratio", sequencename="counting_down", **at) is not None
    assert stricter.result.dropped == 4


async def test_a_user_query_gets_its_settings_defaults_as_parameters(cluster: PostgresCluster) -> None:
    """README: a user query's declared settings reach its SQL ($1, ...) with their defaults."""
    from exporter.config import CollectorSettings
    from exporter.definitions import Definition
    from exporter.postgres.queries import DefinitionCollector

    d = Definition.model_validate({
        "name": "knob_probe", "settings": {"factor": {"default": 7, "help": "A factor."}},
        "sql": "SELECT g::text AS g, g * $1::int AS v, g >= 2 AS big FROM generate_series(1, 3) g",
        "params": ["factor"], "keep": "big", "labels": ["g"],
        "metrics": [{"column": "v", "name": "pgcache_knob_probe", "type": "gauge", "help": "g times factor."}],
    })
    async with target_for(cluster.dsn) as t:
        got = await collect(DefinitionCollector(t, CollectorSettings(interval=60, timeout=10), d))
    assert value(got.text, "pgcache_knob_probe", g="2") == 14
    assert value(got.text, "pgcache_knob_probe", g="3") == 21
    assert value(got.text, "pgcache_knob_probe", g="1") is None
    assert got.result.dropped == 1
