"""Relation sizes without waiting on locks.

pg_relation_size() and friends open the relation with AccessShareLock, so they queue behind an
AccessExclusiveLock (VACUUM FULL, ALTER TABLE, REINDEX, TRUNCATE...) until lock_timeout fails the
whole query. The size queries therefore skip relations that have such a lock granted right now
(read from pg_locks, which needs no lock itself), and the collectors count what they skipped.
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

__all__ = ["LOCKED_RELATIONS_CTE", "skipped_locked_family"]

# A CTE named `locked` with one column `oid`: relations of this database under an
# AccessExclusiveLock that some session holds.
LOCKED_RELATIONS_CTE = """
locked AS (
    SELECT DISTINCT l.relation AS oid FROM pg_locks l
    WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock' AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)"""


def skipped_locked_family(
    name: str, what: str, target: str, datname: str, count: int
) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(
        name,
        f"{what} whose size was not read in the last run because another session held an "
        "AccessExclusiveLock on them.",
        labels=["target", "datname"],
    )
    fam.add_metric([target, datname], count)
    return fam
