"""Rendering and the snapshot store, without servers: formats, escaping, grouping, replacement."""

from __future__ import annotations

import gzip
import math

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.collector import CollectResult
from exporter.snapshot import Snapshot, render_openmetrics, render_text

HOSTILE = 'q"uo\\te\nnew ü'


def families(target: str, n: int = 3) -> list:
    g = GaugeMetricFamily("pgcache_table_live_rows", "Live rows.\nSecond line \\ here", labels=["target", "table"])
    c = CounterMetricFamily("pgcache_table_seq_scans", "Scans.", labels=["target", "table"])
    for i in range(n):
        g.add_metric([target, f"t{i}"], i * 10)
        c.add_metric([target, f"t{i}"], i)
    g.add_metric([target, HOSTILE], math.inf)
    c.add_metric([target, HOSTILE], 1e20)
    h = HistogramMetricFamily("pgcache_cache_load_duration_seconds", "Loads.", labels=["target"])
    h.add_metric([target], [("0.1", 1.0), ("+Inf", 3.0)], 0.5)
    return [g, c, h]


def test_text_round_trips_through_the_reference_parser() -> None:
    body = render_text(families("main")).decode()
    parsed = {f.name: f for f in parse_text(body)}
    assert parsed["pgcache_table_seq_scans"].type == "counter"
    values = {(s.name, s.labels["table"]): s.value for s in parsed["pgcache_table_live_rows"].samples}
    assert values[("pgcache_table_live_rows", HOSTILE)] == math.inf
    assert values[("pgcache_table_live_rows", "t2")] == 20
    scans = {s.labels["table"]: s.value for s in parsed["pgcache_table_seq_scans"].samples}
    assert scans[HOSTILE] == 1e20
    assert "# TYPE pgcache_table_seq_scans_total counter" in body
    assert parsed["pgcache_table_live_rows"].documentation == "Live rows.\nSecond line \\ here"


def test_openmetrics_round_trips_through_the_strict_parser() -> None:
    body = render_openmetrics(families("main")).decode()
    assert body.endswith("# EOF\n")
    parsed = {f.name: f for f in parse_openmetrics(body)}
    assert parsed["pgcache_table_seq_scans"].type == "counter"
    assert parsed["pgcache_cache_load_duration_seconds"].type == "histogram"
    assert {s.labels["table"] for s in parsed["pgcache_table_live_rows"].samples} == {"t0", "t1", "t2", HOSTILE}


def snapshot_with(*targets: str) -> Snapshot:
    snap = Snapshot()
    snap.configure([(t, "tables", 60) for t in targets], list(targets))
    for t in targets:
        snap.record(t, "tables", result=CollectResult(families(t)), duration=0.1, error=None, reachable=True)
    return snap


def test_same_family_from_two_targets_is_one_group() -> None:
    snap = snapshot_with("a", "b")
    body = snap.text().decode()
    assert body.count("# TYPE pgcache_table_live_rows gauge") == 1
    lines = [line for line in body.splitlines() if line.startswith("pgcache_table_live_rows{")]
    assert [line.split('"')[1] for line in lines] == ["a"] * 4 + ["b"] * 4  # contiguous, per target
    parse_openmetrics(snap.openmetrics().decode())  # the strict parser rejects split groups
    assert gzip.decompress(snap.text_gzip()) == snap.text()


def test_a_run_replaces_its_part_whole_and_a_failure_keeps_it() -> None:
    snap = snapshot_with("a")
    snap.record("a", "tables", result=CollectResult(families("a", n=1)), duration=0.1, error=None, reachable=True)
    body = snap.text().decode()
    assert 'table="t2"' not in body and 'table="t0"' in body  # the vanished label sets are gone
    snap.record("a", "tables", result=None, duration=5, error="timed out", reachable=None)
    after = snap.text().decode()
    assert 'table="t0"' in after
    assert 'pgcache_collector_success{target="a",collector="tables"} 0\n' in after
    assert 'pgcache_collector_errors_total{target="a",collector="tables"} 1\n' in after


def test_cached_bytes_change_only_with_a_new_version() -> None:
    snap = snapshot_with("a")
    first = snap.text()
    assert snap.text() is first  # no re-render without a change
    snap.prepare()
    zipped = snap.text_gzip()
    assert snap.text_gzip() is zipped
    snap.record("a", "tables", result=CollectResult(families("a", n=2)), duration=0.1, error=None, reachable=True)
    assert snap.text() is not first and gzip.decompress(snap.text_gzip()) == snap.text()


def test_reconfigure_forgets_removed_jobs_and_targets() -> None:
    snap = snapshot_with("a", "b")
    snap.configure([("a", "tables", 60)], ["a"])
    body = snap.text().decode()
    assert 'target="b"' not in body and 'target="a"' in body
    assert snap.ready
    snap.configure([("a", "tables", 60), ("c", "tables", 60)], ["a", "c"])
    assert not snap.ready  # c has not run yet
    assert 'pgcache_up{target="c"}' not in snap.text().decode()  # unknown is not "down"
