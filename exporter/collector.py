"""What a collector is: one query round per target (or per database), turned into fresh metric
families by pure functions. The scheduler runs it; the snapshot stores what it returns whole."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from prometheus_client.core import Metric

from .families import Family

__all__ = ["CollectResult", "Collector"]


@dataclass
class CollectResult:
    """The families one run produced, and how many series its limits cut (counted, never hidden)."""

    families: Sequence[Metric | Family] = field(default_factory=list)
    dropped: int = 0
    # Problems that did not fail the whole run (one database of several refused us, ...).
    partial_errors: list[str] = field(default_factory=list)


class Collector(ABC):
    """One collector for one target. Instances live as long as the config: they may keep state
    between runs (the statements collector caches query texts and its exported selection)."""

    name: ClassVar[str]

    def __init__(self, target: str) -> None:
        self.target = target

    @abstractmethod
    async def collect(self) -> CollectResult:
        """Run one collection. Raise ConnectError, QueryError or anything else on failure."""

    def unreachable_families(self) -> Sequence[Metric | Family]:
        """What is still true while the target cannot be reached; it replaces the collector's
        figures until the target answers again (default: nothing, pgcache_up says it all)."""
        return []

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the collector holds (the target's pools are closed by their owner)."""
