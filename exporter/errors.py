"""Errors the exporter raises on purpose.

    PgcacheError
    ├── ConfigError          bad configuration; the message names the key path (exit code 2)
    └── CollectError         one collection run failed; the target and collector name it
        ├── ConnectError     the server could not be reached or refused us (pgcache_up = 0)
        ├── QueryError       connected, but a statement failed (missing extension, privilege)
        └── CollectTimeout   the run exceeded the collector's timeout
"""

from __future__ import annotations

__all__ = ["CollectError", "CollectTimeout", "ConfigError", "ConnectError", "PgcacheError", "QueryError"]


class PgcacheError(Exception):
    """Base of every error the exporter raises on purpose."""


class ConfigError(PgcacheError):
    """The configuration is invalid; str(e) is the message for the operator."""


class CollectError(PgcacheError):
    """A collection run failed."""


class ConnectError(CollectError):
    """The target could not be reached, or refused the connection."""


class QueryError(CollectError):
    """Connected, but a statement failed."""


class CollectTimeout(CollectError):
    """The run took longer than the collector's timeout."""
