"""Operator commands on a PostgreSQL target (the seed design's QueryOptimizer and
PerformanceMonitor, as commands): slow queries, unused and redundant indexes, table sizes,
connections, a safe EXPLAIN, and ANALYZE of chosen tables. They reuse the collectors' SQL and
rules (exporter.postgres); nothing here drops or changes data, except the statistics ANALYZE
writes."""

from __future__ import annotations

from .cli import add_commands

__all__ = ["add_commands"]
