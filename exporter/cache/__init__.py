"""The caching library applications import: ``from exporter.cache import CachingService``.

Importing it loads redis and orjson only (never aiohttp, APScheduler or SQLAlchemy). The exporter's
side, ``exporter.cache.collector.CacheCollector``, is imported from its module on purpose: it pulls
in prometheus_client. So is the SQLAlchemy integration, ``exporter.cache.orm`` (``row_tags``,
``table_tag``), which ``CachingService.bind()`` and ``.query()`` import on first use.
"""

from .breaker import CircuitBreaker
from .keys import KeyParamError, cache_key, canonical_params, params_digest
from .serializers import (
    JsonSerializer,
    PayloadError,
    SerializationError,
    Serializer,
    SignedPickleSerializer,
)
from .service import DEFAULT_REDIS_URL, CachingService, Loader
from .stats import BUCKETS, ERROR_OPERATIONS, CacheStats, StatsSnapshot, parse_stats

__all__ = [
    "BUCKETS",
    "DEFAULT_REDIS_URL",
    "ERROR_OPERATIONS",
    "CacheStats",
    "CachingService",
    "CircuitBreaker",
    "JsonSerializer",
    "KeyParamError",
    "Loader",
    "PayloadError",
    "SerializationError",
    "Serializer",
    "SignedPickleSerializer",
    "StatsSnapshot",
    "cache_key",
    "canonical_params",
    "params_digest",
    "parse_stats",
]
