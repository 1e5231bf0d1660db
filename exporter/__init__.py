"""pgcache-exporter: a Prometheus exporter for PostgreSQL and its Redis query-result cache.

This package root stays light on purpose: `from exporter.cache import CachingService` must not
pull in the daemon's dependencies (aiohttp, APScheduler, SQLAlchemy).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
