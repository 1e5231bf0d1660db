"""The latest metric families of every (target, collector), rendered once per change.

A finished run replaces its part whole (so a label set that vanished from the database vanishes
from /metrics), the part is rendered to exposition text right away, and a scrape only joins the
ready parts: it never waits on a database and never re-renders what did not change.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import cast

from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString as _float_to_go_string

from .collector import CollectResult, merge_families

__all__ = ["CollectorStatus", "Snapshot", "render_text"]

Key = tuple[str, str]  # (target, collector)
floatToGoString = cast(Callable[[float], str], _float_to_go_string)
render_openmetrics = cast(Callable[[object], bytes], generate_openmetrics)


@dataclass
class CollectorStatus:
    """What `/` and the self metrics say about one (target, collector)."""

    target: str
    collector: str
    interval: float
    runs: int = 0
    last_run: float | None = None  # wall clock, end of the last run
    duration: float | None = None
    success: bool | None = None
    last_success: float | None = None
    last_error: str | None = None
    errors_total: int = 0
    dropped_total: int = 0


@dataclass
class _Part:
    """One source's families, pre-rendered: name -> (HELP/TYPE header, sample lines)."""

    families: list[Metric]
    rendered: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)


# -- text format 0.0.4 ---------------------------------------------------------------------------


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _exposed_name(fam: Metric) -> tuple[str, str]:
    """(name on the HELP/TYPE lines, type) as the text format wants them."""
    if fam.type == "counter":
        return fam.name + "_total", "counter"
    if fam.type == "info":
        return fam.name + "_info", "gauge"
    if fam.type in ("gauge", "histogram", "summary"):
        return fam.name, fam.type
    return fam.name, "untyped"


def _render_family(fam: Metric) -> tuple[str, bytes, bytes]:
    name, typ = _exposed_name(fam)
    header = f"# HELP {name} {_escape_help(fam.documentation)}\n# TYPE {name} {typ}\n"
    lines = []
    for s in fam.samples:
        if s.name.endswith("_created"):
            continue
        if s.labels:
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels.items())
            lines.append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}\n")
        else:
            lines.append(f"{s.name} {floatToGoString(s.value)}\n")
    return name, header.encode(), "".join(lines).encode()


def _render_part(families: Iterable[Metric]) -> dict[str, tuple[bytes, bytes]]:
    out: dict[str, tuple[bytes, bytes]] = {}
    for fam in families:
        name, header, body = _render_family(fam)
        if name in out:  # the same family twice in one part: keep one header
            out[name] = (out[name][0], out[name][1] + body)
        else:
            out[name] = (header, body)
    return out


def _join(parts: Iterable[dict[str, tuple[bytes, bytes]]]) -> bytes:
    """One group per family name across all parts: header once, then every part's samples."""
    groups: dict[str, list[bytes]] = {}
    for rendered in parts:
        for name, (header, body) in rendered.items():
            group = groups.get(name)
            if group is None:
                groups[name] = [header, body]
            else:
                group.append(body)
    return b"".join(b"".join(g) for g in groups.values())


def render_text(families: Iterable[Metric]) -> bytes:
    """Families -> Prometheus text exposition format 0.0.4."""
    return _join([_render_part(families)])


# -- the store -----------------------------------------------------------------------------------


class _Registry:
    """The minimal registry interface prometheus_client's OpenMetrics renderer needs."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class Snapshot:
    """Thread-safe store of the latest parts plus the exporter's own status table."""

    SELF = ("", "self")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[Key, _Part] = {}
        self.status: dict[Key, CollectorStatus] = {}
        self.up: dict[str, bool] = {}
        self._version = 0
        self._text: tuple[int, bytes] | None = None
        self._gzip: tuple[int, bytes] | None = None
        self._openmetrics: tuple[int, bytes] | None = None

    # -- configuration -------------------------------------------------------------------------
    def configure(self, jobs: Iterable[tuple[str, str, float]], targets: Iterable[str]) -> None:
        """Keep the parts and status of the jobs that still exist; forget the others."""
        with self._lock:
            wanted = {(t, c): iv for t, c, iv in jobs}
            self._parts = {k: p for k, p in self._parts.items() if k in wanted or k == self.SELF}
            status = {}
            for key, interval in wanted.items():
                st = self.status.get(key) or CollectorStatus(key[0], key[1], interval)
                st.interval = interval
                status[key] = st
            self.status = status
            # pgcache_up appears after a target's first run: unknown is not "down".
            self.up = {t: ok for t, ok in self.up.items() if t in set(targets)}
            self._version += 1

    # -- results -------------------------------------------------------------------------------
    def record(
        self,
        target: str,
        collector: str,
        *,
        result: CollectResult | None,
        duration: float,
        error: str | None,
        reachable: bool | None,
    ) -> None:
        """Store one finished run. `result` None keeps the previous families (a failed run
        shows as pgcache_collector_success 0 rather than as vanished series)."""
        key = (target, collector)
        part = _Part(result.families, _render_part(result.families)) if result is not None else None
        with self._lock:
            st = self.status.get(key)
            if st is None:  # the job was removed by a reload while it ran
                return
            now = time.time()
            st.runs += 1
            st.last_run = now
            st.duration = duration
            st.success = error is None
            st.last_error = error
            if error is None:
                st.last_success = now
            else:
                st.errors_total += 1
            if result is not None:
                st.dropped_total += result.dropped
            if part is not None:
                self._parts[key] = part
            if reachable is not None:
                self.up[target] = reachable
            self._version += 1

    def drop_part(self, target: str, collector: str) -> None:
        with self._lock:
            if self._parts.pop((target, collector), None) is not None:
                self._version += 1

    @property
    def ready(self) -> bool:
        """Every configured job has finished its first run (successfully or not)."""
        with self._lock:
            return all(st.runs > 0 for st in self.status.values())

    # -- exposition ----------------------------------------------------------------------------
    def _self_part(self) -> _Part:
        from .selfmetrics import self_families  # late: selfmetrics imports this module's types

        fams = self_families(list(self.status.values()), dict(self.up))
        return _Part(fams, _render_part(fams))

    def text(self) -> bytes:
        with self._lock:
            cached = self._text
            if cached is not None and cached[0] == self._version:
                return cached[1]
            version = self._version
            parts = [p.rendered for k, p in sorted(self._parts.items())]
            parts.insert(0, self._self_part().rendered)
            body = _join(parts)
            self._text = (version, body)
            return body

    def text_gzip(self) -> bytes:
        body = self.text()
        with self._lock:
            cached = self._gzip
            if cached is not None and cached[0] == self._version:
                return cached[1]
            version = self._version
        data = gzip.compress(body, compresslevel=5)
        with self._lock:
            self._gzip = (version, data)
        return data

    def openmetrics(self) -> bytes:
        with self._lock:
            cached = self._openmetrics
            if cached is not None and cached[0] == self._version:
                return cached[1]
            version = self._version
            groups = [self._self_part().families] + [p.families for _, p in sorted(self._parts.items())]
        body = render_openmetrics(_Registry(merge_families(groups)))
        with self._lock:
            self._openmetrics = (version, body)
        return body

    def families(self) -> list[Metric]:
        """Every family as one merged list (for `once` in OpenMetrics and for tests)."""
        with self._lock:
            groups = [self._self_part().families] + [p.families for _, p in sorted(self._parts.items())]
        return merge_families(groups)
