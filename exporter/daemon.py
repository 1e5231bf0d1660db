"""Wiring: config -> targets and collectors -> scheduler jobs -> snapshot -> HTTP; signals and reload."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .advisor.collector import AdvisorCollector
from .cache.collector import CacheCollector
from .collector import Collector
from .config import CollectorSettings, Config, split_listen_address
from .definitions import Definition, builtin_definitions
from .errors import ConfigError
from .httpserver import ConnectionGuard, GuardedSite, HttpLimits, connection_cap
from .logs import redactor, setup_logging
from .postgres.activity import ActivityCollector
from .postgres.engine import PostgresTarget
from .postgres.indexes import IndexesCollector
from .postgres.queries import DefinitionCollector
from .postgres.statements import StatementsCollector
from .scheduler import CollectionLoop, Job, Probe, Scheduler, probe_once, run_job
from .snapshot import Snapshot
from .web import make_app
from .webconfig import WebSecurity

__all__ = ["HAND_WRITTEN", "Daemon", "build_jobs", "postgres_collector"]

log = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.001

# The built-in collectors with a hand-written part (real rules beyond rows -> families); every
# other definition runs on the generic path alone.
HAND_WRITTEN: dict[str, Callable[[PostgresTarget, Any], Collector]] = {
    "activity": ActivityCollector,
    "statements": StatementsCollector,
    "indexes": IndexesCollector,
    "advisor": AdvisorCollector,
}


def postgres_collector(
    target: PostgresTarget, definition: Definition, settings: CollectorSettings
) -> Collector:
    make = HAND_WRITTEN.get(definition.name)
    if make is not None:
        return make(target, settings)
    return DefinitionCollector(target, settings, definition)


def build_jobs(config: Config) -> tuple[list[PostgresTarget], list[Job]]:
    """The runtime targets and one job per (target, enabled collector): every built-in
    definition, every user query, and the cache collector per Redis target."""
    targets: list[PostgresTarget] = []
    jobs: list[Job] = []
    for pg_cfg in config.postgres:
        if not config.shard.owns(pg_cfg.name):
            continue
        target = PostgresTarget(pg_cfg)
        targets.append(target)
        for defn in builtin_definitions():
            settings = config.collectors.settings(defn.name)
            if settings.enabled:
                jobs.append(Job(postgres_collector(target, defn, settings),
                                settings.interval, settings.timeout))
        for query in config.queries:
            if query.enabled:
                settings = CollectorSettings(interval=query.interval, timeout=query.timeout)
                jobs.append(Job(DefinitionCollector(target, settings, query),
                                query.interval, query.timeout))
    cache = config.collectors.cache
    if cache.enabled:
        for redis_cfg in config.redis:
            if config.shard.owns(redis_cfg.name):
                jobs.append(Job(CacheCollector(redis_cfg, cache), cache.interval, cache.timeout))
    return targets, jobs


def target_kinds(config: Config) -> list[tuple[str, str]]:
    """The targets this replica collects (all of them unless shard.total > 1)."""
    kinds = [(t.name, "postgres") for t in config.postgres] + [(t.name, "redis") for t in config.redis]
    return [(name, kind) for name, kind in kinds if config.shard.owns(name)]


def lay_out(snapshot: Snapshot, config: Config, jobs: list[Job]) -> None:
    """Tell the snapshot which jobs and targets exist now (the others are forgotten)."""
    snapshot.configure(
        [(j.collector.target, j.collector.name, j.interval) for j in jobs],
        [name for name, _ in target_kinds(config)],
    )


def require_targets(config: Config) -> None:
    if not config.postgres and not config.redis:
        raise ConfigError(
            "no targets configured: give --postgres-dsn (or PGCACHE_POSTGRES_DSN, or a `postgres:` "
            "list in --config.file); or run `pgcache-exporter demo` to try it on throwaway servers"
        )


class Daemon:
    """The running exporter. `load` builds the effective config (file + flags); SIGHUP calls it again."""

    def __init__(self, load: Callable[[], Config]) -> None:
        self._load = load
        self.config = load()
        require_targets(self.config)
        self.security = WebSecurity(self.config.web.config_file)
        self.security.load()
        self.snapshot = Snapshot()
        self.scheduler = Scheduler(self.snapshot)
        # Collection runs on its own loop and thread; this one only serves HTTP and signals.
        self._collection = CollectionLoop()
        self._targets: list[PostgresTarget] = []
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.bound: tuple[str, int] | None = None

    async def _apply(self, config: Config) -> None:
        """On the collection loop: targets, jobs, snapshot layout, schedule."""
        redactor.add_secrets(config.secrets())
        targets, jobs = build_jobs(config)
        lay_out(self.snapshot, config, jobs)
        # Removed targets and jobs leave what scrapes are served now, not at the next run.
        self.snapshot.prepare()
        self._targets = targets
        self.config = config
        self.scheduler.start(jobs, targets)
        log.info(
            "collecting from %d target(s) with %d job(s)", len(target_kinds(config)), len(jobs)
        )

    async def _swap(self, config: Config) -> None:
        """On the collection loop: stop the old jobs and pools, apply the new config."""
        await self.scheduler.stop()
        old_targets = self._targets
        await self._apply(config)
        for t in old_targets:
            await t.dispose()

    async def _shutdown(self) -> None:
        """On the collection loop: stop the jobs, close the pools."""
        await self.scheduler.stop()
        for t in self._targets:
            await t.dispose()
        self._targets = []

    async def start(self) -> None:
        # The HTTP loop asks for the interpreter several times per scrape; with collection busy in
        # other threads, a shorter switch interval (default 5 ms) keeps each wait short.
        sys.setswitchinterval(SWITCH_INTERVAL)
        web_cfg = self.config.web
        cap, lowered = connection_cap(web_cfg.max_connections)
        if lowered:
            log.warning("%s", lowered)
        self.http_guard = ConnectionGuard(HttpLimits(
            header_timeout=web_cfg.header_timeout, idle_timeout=web_cfg.idle_timeout,
            write_timeout=web_cfg.write_timeout, max_connections=cap,
        ))
        app = make_app(
            self.snapshot, lambda: target_kinds(self.config),
            [self.http_guard.middleware, self.security.middleware],
        )
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, keepalive_timeout=web_cfg.idle_timeout
        )
        await self._runner.setup()
        host, port = split_listen_address(web_cfg.listen_address)
        site = GuardedSite(self._runner, host, port, self.http_guard,
                           ssl_context=self.security.ssl_context)
        try:
            # The port first: when it is taken, nothing else has started (no connections to the
            # targets, no log lines besides the one error).
            site.bind()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            # One line, exit code 2 (ConfigError): the usual cause is another process on the port.
            reason = e.strerror or str(e)
            hint = " (is another exporter running? choose another port with --web.listen-address)" \
                if e.errno == errno.EADDRINUSE else ""
            raise ConfigError(
                f"web.listen_address: cannot listen on {web_cfg.listen_address}: {reason}{hint}"
            ) from None
        try:
            self._collection.start()
            await self._collection.run(self._apply(self.config))
        except BaseException:
            site.unbind()
            raise
        await site.start()
        sockets = [s for s in (self._runner.addresses or [])]
        if sockets:
            self.bound = (str(sockets[0][0]), int(sockets[0][1]))
        log.info("listening on %s", self.config.web.listen_address)

    async def reload(self) -> bool:
        """Apply a new config without a restart; an invalid one is logged and the old one kept."""
        async with self._reload_lock:
            try:
                new = self._load()
                require_targets(new)
                self.security.reload(new.web.config_file)
            except ConfigError as e:
                log.error("reload rejected, keeping the running config: %s", e)
                return False
            if new.web != self.config.web:
                log.warning("web.* settings changed: they take effect at the next restart")
                new = new.model_copy(update={"web": self.config.web})
            setup_logging(new.log.level, new.log.format)
            await self._collection.run(self._swap(new))
            log.info("configuration reloaded")
            return True

    async def stop(self) -> None:
        await self._collection.run(self._shutdown())
        self._collection.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve(self) -> None:
        """Start, run until SIGTERM/SIGINT, stop cleanly. SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        await self.start()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        try:
            await self._stopping.wait()
        finally:
            # Handlers stay installed until the pools are closed: a second Ctrl-C while stopping
            # must not interrupt the shutdown half-way.
            log.info("stopping")
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)


async def collect_once(config: Config, snapshot: Snapshot) -> bool:
    """Run every enabled collector once, concurrently; True if all succeeded."""
    require_targets(config)
    redactor.add_secrets(config.secrets())
    targets, jobs = build_jobs(config)
    lay_out(snapshot, config, jobs)
    probes = [Probe.for_target(t, jobs) for t in targets]
    snapshot.probe_targets(p.target.name for p in probes)
    try:
        results = await asyncio.gather(*(probe_once(p, snapshot) for p in probes),
                                       *(run_job(j, snapshot) for j in jobs))
    finally:
        for j in jobs:
            await j.collector.close()
        for t in targets:
            await t.dispose()
    return all(results)
