"""Smoke version of the benchmark (`python benchmarks/run.py --smoke`), so it cannot rot.

Tiny catalog (40 tables, 150 statements), one round, short windows. It always runs our exporter,
the raw SQL floor and the cache benchmark (when benchmarks/cache_bench.py is present). The anchors
(postgres_exporter, query-exporter) take part ONLY if they are already cached in
benchmarks/.cache (put there by a full `python benchmarks/run.py`); this test never downloads
them, so it needs no network. Which anchors ran is printed and asserted from what is on disk,
not skipped silently. It checks the pipeline, not the targets: the numbers it asserts are sanity
bounds, and speed targets live in benchmarks/RESULTS.md, never in timed tests.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

from exporter.definitions import builtin_definitions

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"

@pytest.fixture(scope="module")
def run_module():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))


def test_smoke_pipeline(run_module, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import anchors  # benchmarks/anchors.py, importable once run is

    cached = anchors.cached_anchors()
    out = tmp_path / "RESULTS.md"
    assert run_module.main(["--smoke", "--output", str(out)]) == 0
    with capsys.disabled():
        print(f"\nbenchmark smoke: anchors cached and run: {cached or 'none'}")

    import json

    res = json.loads((tmp_path / "results.json").read_text())
    names = set(res["exporters"])
    assert names == {"ours", *cached}

    report = out.read_text()
    for title, key, _ in run_module.COLUMNS:
        assert f"| {title} |" in report
        for name in names:
            value = res["exporters"][name][key]
            assert isinstance(value, int | float) and math.isfinite(value), (name, key, value)
            assert value >= 0, (name, key, value)

    ours = res["exporters"]["ours"]
    # Sane, not fast: a scrape of a pre-rendered snapshot answers within a second.
    assert 0 < ours["p50_1_ms"] <= ours["p99_1_ms"] < 1000
    assert 0 < ours["p50_4_ms"] <= ours["p99_4_ms"] < 1000
    assert ours["series"] > 3 * res["catalog"]["tables"]  # per-table and per-index series
    assert ours["body_bytes"] >= ours["wire_bytes"] > 0
    assert ours["db_s_per_h_15s"] > 0 and ours["cpu_s_per_h_15s"] > 0
    assert 10 < ours["peak_rss_mb"] < 2000
    for name in cached:
        anchor = res["exporters"][name]
        assert anchor["series"] > 0 and anchor["p50_1_ms"] > 0 and anchor["db_s_per_h_15s"] > 0
        assert "| " + name in report

    rv = res["round_vs_floor"]
    assert rv["round_ms"] > 0 and rv["floor_ms"] > 0 and math.isfinite(rv["ratio"])
    assert set(rv["per_collector_ms"]) == {d.name for d in builtin_definitions() if d.enabled}
    assert "## Targets" in report and "## Full collection round" in report

    if (BENCH / "cache_bench.py").exists():
        assert res["cache"]["returncode"] == 0, res["cache"]["stderr"]
        assert {"raw", "pgcache"} <= set(res["cache"]["ratios"])
        assert "## Cache hit path" in report
