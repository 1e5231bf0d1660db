"""The latest metric families of every (target, collector), rendered once per change.

A finished run replaces its part whole (so a label set that vanished from the database vanishes
from /metrics). The part is rendered right away and only the rendered bytes are kept (the metric
objects are dropped: they cost several times the text). After each change the parts are joined
and gzipped once, off the request path (`prepare`), so a scrape only hands out ready bytes: it never
waits on a database and never re-renders what did not change.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.core import Metric

from .collector import CollectResult
from .families import Family, escape_label, format_value

__all__ = ["CollectorStatus", "Snapshot", "TargetHealth", "render_openmetrics", "render_text"]

Key = tuple[str, str]  # (target, collector)


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
class TargetHealth:
    """What the probe of one PostgreSQL target found: the exporter's connections to it and
    whether its role sees everything (None: not known yet)."""

    connections: int = 0
    budget: int = 0
    privileged: bool | None = None
    privilege_warning: str | None = None
    down_reason: str | None = None


# -- rendering -----------------------------------------------------------------------------------

# A rendered family: HELP/TYPE lines for the text format, the same for OpenMetrics, and the sample
# lines, which both formats share (a counter's samples are called <name>_total in both).
Rendered = tuple[bytes, bytes, bytes]
Part = dict[str, Rendered]

_TEXT_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram",
               "summary": "summary", "info": "gauge"}
_OM_TYPES = {"counter", "gauge", "histogram", "summary", "info"}


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _headers(name: str, om_name: str, mtype: str, doc: str) -> tuple[bytes, bytes]:
    doc = _escape_help(doc)
    om_type = mtype if mtype in _OM_TYPES else "unknown"
    return (f"# HELP {name} {doc}\n# TYPE {name} {_TEXT_TYPES.get(mtype, 'untyped')}\n".encode(),
            f"# HELP {om_name} {doc}\n# TYPE {om_name} {om_type}\n".encode())


def _render_written(fam: Family) -> tuple[str, Rendered]:
    name = fam.sample_name
    text_h, om_h = _headers(name, fam.name, fam.type, fam.help)
    return name, (text_h, om_h, "".join(fam.lines).encode())


def _render_family(fam: Metric | Family) -> tuple[str, Rendered]:
    if isinstance(fam, Family):
        return _render_written(fam)
    suffix = {"counter": "_total", "info": "_info"}.get(fam.type, "")
    name = fam.name + suffix
    text_h, om_h = _headers(name, fam.name if suffix else name, fam.type, fam.documentation)
    # Label values repeat across thousands of samples (target, datname, schema): escape each once.
    escaped: dict[str, str] = {}
    lines = []
    for s in fam.samples:
        if s.name.endswith("_created"):
            continue
        if s.labels:
            pairs = []
            for k, v in s.labels.items():
                e = escaped.get(v)
                if e is None:
                    e = escaped[v] = escape_label(v)
                pairs.append(f'{k}="{e}"')
            lines.append(f"{s.name}{{{','.join(pairs)}}} {format_value(s.value)}\n")
        else:
            lines.append(f"{s.name} {format_value(s.value)}\n")
    return name, (text_h, om_h, "".join(lines).encode())


def render_part(families: Iterable[Metric | Family]) -> Part:
    out: Part = {}
    for fam in families:
        name, rendered = _render_family(fam)
        have = out.get(name)
        # The same family twice in one part: one header, both bodies.
        out[name] = rendered if have is None else (have[0], have[1], have[2] + rendered[2])
    return out


def join_parts(parts: Iterable[Part], *, openmetrics: bool = False) -> bytes:
    """One group per family name across all parts: the header once, then every part's samples
    (families with the same name from several targets form one group, as the format requires)."""
    which = 1 if openmetrics else 0
    groups: dict[str, list[bytes]] = {}
    for part in parts:
        for name, r in part.items():
            group = groups.get(name)
            if group is None:
                groups[name] = [r[which], r[2]]
            else:
                group.append(r[2])
    body = b"".join(b"".join(g) for g in groups.values())
    return body + b"# EOF\n" if openmetrics else body


def render_text(families: Iterable[Metric | Family]) -> bytes:
    """Families -> Prometheus text exposition format 0.0.4."""
    return join_parts([render_part(families)])


def render_openmetrics(families: Iterable[Metric | Family]) -> bytes:
    """Families -> OpenMetrics 1.0 text."""
    return join_parts([render_part(families)], openmetrics=True)


# -- the store -----------------------------------------------------------------------------------


class Snapshot:
    """Thread-safe store of the latest rendered parts plus the exporter's own status table."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[Key, Part] = {}
        self.status: dict[Key, CollectorStatus] = {}
        self.up: dict[str, bool] = {}
        # Targets whose pgcache_up a probe decides (collectors' runs do not flip it).
        self.probed: set[str] = set()
        self.health: dict[str, TargetHealth] = {}
        self._version = 0
        self._text: tuple[int, bytes] | None = None
        self._gzip: tuple[int, bytes] | None = None
        self._openmetrics: tuple[int, bytes] | None = None
        self._served: tuple[int, bytes, bytes] | None = None  # version, text, gzipped text

    # -- configuration -------------------------------------------------------------------------
    def configure(self, jobs: Iterable[tuple[str, str, float]], targets: Iterable[str]) -> None:
        """Keep the parts and status of the jobs that still exist; forget the others."""
        with self._lock:
            wanted = {(t, c): iv for t, c, iv in jobs}
            self._parts = {k: p for k, p in self._parts.items() if k in wanted}
            status = {}
            for key, interval in wanted.items():
                st = self.status.get(key) or CollectorStatus(key[0], key[1], interval)
                st.interval = interval
                status[key] = st
            self.status = status
            # pgcache_up appears after a target's first run: unknown is not "down".
            keep = set(targets)
            self.up = {t: ok for t, ok in self.up.items() if t in keep}
            self.probed &= keep
            self.health = {t: h for t, h in self.health.items() if t in keep}
            self._version += 1

    def probe_targets(self, targets: Iterable[str]) -> None:
        """These targets' pgcache_up comes from their probe from now on."""
        with self._lock:
            self.probed = set(targets)
            self._version += 1

    def record_probe(self, target: str, *, up: bool, health: TargetHealth) -> None:
        with self._lock:
            if target not in self.probed:
                return
            changed = self.up.get(target) != up or self.health.get(target) != health
            self.up[target] = up
            self.health[target] = health
            if changed:
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
        # May raise (a value no exposition can hold): the caller records the run as failed then.
        part = render_part(result.families) if result is not None else None
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
            if reachable is not None and target not in self.probed:
                self.up[target] = reachable
            self._version += 1

    @property
    def ready(self) -> bool:
        """Every configured job has finished its first run (successfully or not), and every
        probed target has been probed once."""
        with self._lock:
            return (all(st.runs > 0 for st in self.status.values())
                    and all(t in self.up for t in self.probed))

    # -- exposition ----------------------------------------------------------------------------
    def _parts_now(self) -> tuple[int, list[Part]]:
        """The current version and every part, the exporter's own metrics first (under the lock)."""
        from .selfmetrics import self_families  # late: selfmetrics imports this module's types

        own = render_part(self_families(list(self.status.values()), dict(self.up), dict(self.health)))
        return self._version, [own] + [p for _, p in sorted(self._parts.items())]

    def text(self) -> bytes:
        with self._lock:
            cached = self._text
            if cached is not None and cached[0] == self._version:
                return cached[1]
            version, parts = self._parts_now()
            body = join_parts(parts)
            self._text = (version, body)
            return body

    def text_gzip(self) -> bytes:
        body = self.text()
        with self._lock:
            cached = self._gzip
            if cached is not None and cached[0] == self._version:
                return cached[1]
            version = self._version
        # Level 1: half the CPU of level 5 for about a fifth more bytes; this runs after every
        # collector run, on the whole exposition (benchmarks/RESULTS.md).
        data = gzip.compress(body, compresslevel=1)
        with self._lock:
            if version == self._version:
                self._gzip = (version, data)
        return data

    def prepare(self) -> None:
        """Join and gzip the current version (on the collection thread, after every run), and make it
        what scrapes are served."""
        with self._lock:
            version = self._version
        text, zipped = self.text(), self.text_gzip()
        with self._lock:
            if self._served is None or self._served[0] <= version:
                self._served = (version, text, zipped)

    def served(self, *, gzipped: bool) -> bytes:
        """What a scrape gets: the last prepared version, never computed on the request path
        (only before the very first preparation)."""
        with self._lock:
            served = self._served
        if served is None:
            self.prepare()
            with self._lock:
                served = self._served
            assert served is not None
        return served[2] if gzipped else served[1]

    def openmetrics(self) -> bytes:
        with self._lock:
            cached = self._openmetrics
            if cached is not None and cached[0] == self._version:
                return cached[1]
            version, parts = self._parts_now()
            body = join_parts(parts, openmetrics=True)
            self._openmetrics = (version, body)
            return body
