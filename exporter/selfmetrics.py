"""The exporter's own health metrics, built fresh from the status table on every change."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import __version__
from .snapshot import CollectorStatus, TargetHealth

__all__ = ["self_families"]


def self_families(
    statuses: Sequence[CollectorStatus], up: Mapping[str, bool],
    health: Mapping[str, TargetHealth] | None = None,
) -> list[Metric]:
    build = GaugeMetricFamily(
        "pgcache_build_info",
        "pgcache-exporter build information (always 1).",
        labels=["version", "python_version"],
    )
    build.add_metric([__version__, platform.python_version()], 1)

    up_f = GaugeMetricFamily(
        "pgcache_up",
        "Whether the target answers (1) or not (0): for PostgreSQL, a probe (connect and SELECT 1) "
        "bounded by the shortest collector timeout; for Redis, the cache collector's last run.",
        labels=["target"],
    )
    for target, ok in sorted(up.items()):
        up_f.add_metric([target], 1 if ok else 0)
    conns = GaugeMetricFamily(
        "pgcache_exporter_connections",
        "Connections the exporter holds open to the PostgreSQL target now, in use or idle "
        "(its own sessions, left out of pgcache_connections).",
        labels=["target"],
    )
    conns_max = GaugeMetricFamily(
        "pgcache_exporter_connections_max",
        "The exporter's connection budget for the target (postgres[].max_connections).",
        labels=["target"],
    )
    privileged = GaugeMetricFamily(
        "pgcache_role_privileged",
        "1 when the exporter's role is superuser or has pg_monitor's privileges; 0 when other "
        "roles' sessions, statements and sizes are hidden from it (the figures are incomplete).",
        labels=["target"],
    )
    for target, h in sorted((health or {}).items()):
        conns.add_metric([target], h.connections)
        conns_max.add_metric([target], h.budget)
        if h.privileged is not None:
            privileged.add_metric([target], 1 if h.privileged else 0)

    labels = ["target", "collector"]
    success = GaugeMetricFamily(
        "pgcache_collector_success", "Whether the collector's last run succeeded.", labels=labels
    )
    duration = GaugeMetricFamily(
        "pgcache_collector_duration_seconds", "Wall time of the collector's last run.", labels=labels
    )
    last_ok = GaugeMetricFamily(
        "pgcache_collector_last_success_timestamp_seconds",
        "Unix time of the collector's last successful run (0 before the first).",
        labels=labels,
    )
    errors = CounterMetricFamily(
        "pgcache_collector_errors", "Failed runs of the collector since the exporter started.",
        labels=labels,
    )
    runs = CounterMetricFamily(
        "pgcache_collector_runs", "Runs of the collector since the exporter started.", labels=labels
    )
    dropped = CounterMetricFamily(
        "pgcache_series_dropped",
        "Series the collector's cardinality limits cut (summed over runs).",
        labels=labels,
    )
    for st in sorted(statuses, key=lambda s: (s.target, s.collector)):
        lv = [st.target, st.collector]
        runs.add_metric(lv, st.runs)
        errors.add_metric(lv, st.errors_total)
        dropped.add_metric(lv, st.dropped_total)
        if st.runs == 0:
            continue
        success.add_metric(lv, 1 if st.success else 0)
        duration.add_metric(lv, st.duration or 0.0)
        last_ok.add_metric(lv, st.last_success or 0.0)
    return [build, up_f, conns, conns_max, privileged, success, duration, last_ok, errors, runs,
            dropped]
