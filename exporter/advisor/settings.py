"""`collectors.advisor` in the config file."""

from __future__ import annotations

from pydantic import Field

from ..config import CollectorSettings
from ..definitions import definition
from ..units import Duration

_DEF = definition("advisor")

__all__ = ["AdvisorSettings"]


class AdvisorSettings(CollectorSettings):
    # Off unless asked for: it plans the application's statements, which needs SELECT on its
    # tables (pg_monitor alone is not enough) and HypoPG in each database for proven advice.
    enabled: bool = _DEF.enabled
    interval: Duration = _DEF.interval
    timeout: Duration = _DEF.timeout
    # The statements of each database that took the most time, by pg_stat_statements.
    top_statements: int = Field(default=20, ge=1, le=1000)
    # At most this many advices (and as many sequential-scan findings) exported; the rest counted.
    limit: int = Field(default=20, ge=1, le=10_000)
    # Suggest an index only when it cuts a statement's estimated cost by at least this share.
    min_saving: float = Field(default=0.5, gt=0, lt=1)
    # Tables with fewer (estimated) rows are never given an index: a scan of them is cheap anyway.
    min_table_rows: int = Field(default=10_000, ge=0)
