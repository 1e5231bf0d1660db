"""`activity` (definitions/activity.yaml): the hand-written part is the configurable label set of
pgcache_connections (`collectors.activity.labels`): the connections query is narrowed to those
columns, in its SELECT and GROUP BY, so dropping a label really merges the series.

The exporter's own sessions (application_name pgcache-exporter) are left out of every figure.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..config import ActivitySettings
from ..definitions import definition
from .engine import PostgresTarget
from .queries import DefinitionCollector, run_query, sql_for

__all__ = ["AGES_SQL", "LABEL_COLUMNS", "SETTINGS_SQL", "ActivityCollector", "activity_sql"]

_DEF = definition("activity")
# Only these column names ever reach the SQL text (they come from a Literal-typed setting).
LABEL_COLUMNS = _DEF.query("connections").labels
# The reports run these through SQLAlchemy, where `:app` is the exporter's application name.
AGES_SQL = _DEF.query("ages").sql[0].query.replace("'pgcache-exporter'", ":app")
SETTINGS_SQL = """
SELECT name, setting::int AS value FROM pg_settings
WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')
"""


def activity_sql(labels: Sequence[str], *, app: str = ":app") -> str:
    cols = [c for c in LABEL_COLUMNS if c in labels]
    select = "".join(f"coalesce({c}::text, '') AS {c}, " for c in cols)
    group = f"GROUP BY {', '.join(str(i + 1) for i in range(len(cols)))}" if cols else ""
    return (
        f"SELECT {select}count(*) AS n FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
        f"AND application_name IS DISTINCT FROM {app} {group}"
    )


class ActivityCollector(DefinitionCollector):
    def __init__(self, target: PostgresTarget, settings: ActivitySettings) -> None:
        super().__init__(target, settings, _DEF)
        self.labels = [c for c in LABEL_COLUMNS if c in settings.labels]
        self._connections_sql = activity_sql(self.labels, app="'pgcache-exporter'")

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        families = []
        for query in self.definition.queries:
            if query.name == "connections":
                cols, rows = await run_query(conn, self._connections_sql)
                out = self.render(query, cols, rows, datname, labels=self.labels)
            else:
                sql = sql_for(query, self.pg.server_version_num or 0, {})
                assert sql is not None
                cols, rows = await run_query(conn, sql)
                out = self.render(query, cols, rows, datname)
            families += out.families
        return CollectResult(families)
