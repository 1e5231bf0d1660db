"""A circuit breaker: after ``threshold`` consecutive Redis errors, stop trying for ``cooldown``
seconds (callers go straight to the database), then let calls through again; the first error
after the cooldown opens it again at once."""

from __future__ import annotations

import logging
import time

__all__ = ["CircuitBreaker"]

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(self, threshold: int = 5, cooldown: float = 5.0) -> None:
        if threshold < 1:
            raise ValueError("breaker threshold must be at least 1")
        if cooldown < 0:
            raise ValueError("breaker cooldown must be >= 0 seconds")
        self.threshold = threshold
        self.cooldown = cooldown
        self._failures = 0
        self._open_until = 0.0

    @property
    def is_open(self) -> bool:
        return self._open_until > time.monotonic()

    def allow(self) -> bool:
        """May this call use Redis? (Cheap: called on every cache operation.)"""
        return not self._open_until or time.monotonic() >= self._open_until

    def success(self) -> None:
        if self._open_until:
            log.info("Redis answers again; cache re-enabled")
        self._failures = 0
        self._open_until = 0.0

    def failure(self) -> None:
        self._failures += 1
        if self._failures >= self.threshold:
            if not self.is_open:
                log.warning(
                    "Redis failed %d times in a row; bypassing the cache for %.1fs",
                    self._failures, self.cooldown,
                )
            self._open_until = time.monotonic() + self.cooldown
