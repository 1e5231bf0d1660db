"""One APScheduler job per (target, collector): own interval, first run at start-up, never two
runs of the same job at once, and a timeout that bounds the whole run (the SQL is bounded by
statement_timeout on the session as well)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from .collector import Collector, CollectResult
from .errors import CollectError, ConnectError
from .logs import redactor
from .postgres.engine import ConnectionLost, PostgresTarget
from .snapshot import Snapshot, TargetHealth

__all__ = ["CollectionLoop", "Job", "Probe", "Scheduler", "probe_once", "run_job"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Job:
    collector: Collector
    interval: float
    timeout: float
    last_error: str | None = field(default=None, repr=False)
    running: bool = field(default=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.collector.target, self.collector.name)

    @property
    def id(self) -> str:
        return f"{self.collector.target}/{self.collector.name}"


async def run_job(job: Job, snapshot: Snapshot) -> bool:
    """Run one collection, record it in the snapshot, log changes of state. Never raises
    (but for cancellation): one failing collector must not disturb anything else, and anything
    raised while recording or rendering the run fails that run, visibly, not the job."""
    target, name = job.key
    start = time.monotonic()
    result: CollectResult | None = None
    reachable: bool | None = None
    bug: Exception | None = None
    connect_failure = False
    try:
        async with asyncio.timeout(job.timeout):
            result = await job.collector.collect()
        reachable = True
        error = "; ".join(result.partial_errors) or None
    except ConnectionLost as e:  # lost twice (retried once): the server may well be there
        error, reachable = str(e), None
    except ConnectError as e:
        error, reachable, connect_failure = str(e), False, True
    except TimeoutError:
        error = f"target {target}: collector {name} timed out after {job.timeout:g}s"
    except CollectError as e:
        error, reachable = str(e), True
    except Exception as e:  # a bug in a collector: count it, show it, keep going
        error = f"target {target}: collector {name} failed unexpectedly: {type(e).__name__}: {e}"
        bug = e
    duration = time.monotonic() - start
    if error is not None:
        error = redactor(error)
    if reachable is False:
        # The target cannot be reached: its last figures are no longer true (pgcache_up says
        # why); only what the collector still knows for sure replaces them. (A connection lost
        # mid-run keeps the previous figures: success 0 says enough.)
        result = CollectResult(job.collector.unreachable_families())
    try:
        snapshot.record(target, name, result=result, duration=duration, error=error,
                        reachable=reachable)
    except Exception as e:  # a value no exposition can hold, a bug in rendering
        error = redactor(
            f"target {target}: collector {name}: its figures could not be recorded: "
            f"{type(e).__name__}: {e}"
        )
        bug = e
        snapshot.record(target, name, result=None, duration=duration, error=error, reachable=None)
    _log_change(job, error, bug, quiet=connect_failure and snapshot.up.get(target) is False)
    return error is None


def _log_change(job: Job, error: str | None, bug: Exception | None, *, quiet: bool) -> None:
    """One line when the job starts failing (the cause named), one when it recovers; changes of
    the message while it keeps failing go to debug. `quiet`: the target is down and its probe has
    said so already."""
    target, name = job.key
    was_failing = job.last_error is not None
    job.last_error = error
    if error is None:
        if was_failing:
            log.info("target %s: collector %s recovered", target, name)
        return
    if was_failing or quiet:
        log.debug("target %s: collector %s failing: %s", target, name, error)
    elif bug is not None:  # the traceback once, not on every run
        log.error("target %s: collector %s failing: %s", target, name, error, exc_info=bug)
    else:
        log.warning("target %s: collector %s failing: %s", target, name, error)


@dataclass
class Probe:
    """The `pgcache_up` probe of one PostgreSQL target: connect and SELECT 1, every `interval`
    (the target's shortest collector interval), bounded by `timeout` (its shortest timeout)."""

    target: PostgresTarget
    interval: float
    timeout: float
    last_error: str | None = field(default=None, repr=False)
    probed: bool = field(default=False, repr=False)
    running: bool = field(default=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.target.name}/pgcache_up"

    @classmethod
    def for_target(cls, target: PostgresTarget, jobs: Sequence[Job]) -> Probe:
        mine = [j for j in jobs if j.collector.target == target.name]
        interval = min((j.interval for j in mine), default=15.0)
        timeout = min([j.timeout for j in mine] + [interval])
        return cls(target, interval, timeout)


async def probe_once(probe: Probe, snapshot: Snapshot) -> bool:
    """Probe the target, record pgcache_up and the exporter's connections, log changes."""
    target = probe.target
    error = await target.probe(probe.timeout)
    if error is not None:
        error = redactor(error)
    privileges = target.privileges
    snapshot.record_probe(target.name, up=error is None, health=TargetHealth(
        connections=target.open_connections, budget=target.budget,
        privileged=None if privileges is None else privileges.sufficient,
        privilege_warning=None if privileges is None else privileges.warning(target.name),
        down_reason=error,
    ))
    if error is not None and (probe.last_error is None or not probe.probed):
        log.warning("target %s: down: %s", target.name, error)
    elif error is None and probe.last_error is not None:
        log.info("target %s: up again", target.name)
    elif error is not None:
        log.debug("target %s: still down: %s", target.name, error)
    probe.last_error = error
    probe.probed = True
    return error is None


class Scheduler:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._sched: AsyncIOScheduler | None = None
        self._jobs: list[Job] = []
        self._probes: list[Probe] = []
        self._running: set[asyncio.Task[bool]] = set()

    async def _run(self, job: Job) -> bool:
        if job.running:
            # The previous run still goes on (timeout as long as the interval): this one is simply
            # not started (APScheduler would log a warning every interval for it).
            return False
        task = asyncio.current_task()
        assert task is not None
        job.running = True
        self._running.add(task)  # type: ignore[arg-type]
        try:
            ok = await run_job(job, self.snapshot)
            # Join and gzip the new version now, on the collection thread: no scrape pays for it.
            self.snapshot.prepare()
            return ok
        except asyncio.CancelledError:
            # Only stop() cancels a job (shutdown or reload); that is not an error to report.
            log.debug("job %s cancelled while running", job.id)
            return False
        finally:
            job.running = False
            self._running.discard(task)  # type: ignore[arg-type]

    async def _probe(self, probe: Probe) -> bool:
        if probe.running:
            return False
        task = asyncio.current_task()
        assert task is not None
        probe.running = True
        self._running.add(task)  # type: ignore[arg-type]
        try:
            ok = await probe_once(probe, self.snapshot)
            self.snapshot.prepare()
            return ok
        except asyncio.CancelledError:
            return False
        finally:
            probe.running = False
            self._running.discard(task)  # type: ignore[arg-type]

    def start(self, jobs: list[Job], targets: Sequence[PostgresTarget] = ()) -> None:
        self._jobs = jobs
        self._probes = [Probe.for_target(t, jobs) for t in targets]
        self.snapshot.probe_targets(p.target.name for p in self._probes)
        self._sched = AsyncIOScheduler(timezone=UTC)
        now = datetime.now(UTC)
        for probe in self._probes:
            self._sched.add_job(
                self._probe,
                IntervalTrigger(seconds=probe.interval, timezone=UTC),
                args=[probe], id=probe.id, name=probe.id, next_run_time=now,
                # The function itself skips a round while the previous one runs (no log spam).
                max_instances=2, coalesce=True, misfire_grace_time=max(1, int(probe.interval)),
            )
        for job in jobs:
            self._sched.add_job(
                self._run,
                IntervalTrigger(seconds=job.interval, timezone=UTC),
                args=[job],
                id=job.id,
                name=job.id,
                next_run_time=now,
                # Never two runs of one job at once: _run skips a round while one goes on.
                max_instances=2,
                coalesce=True,  # runs missed while busy collapse into one
                misfire_grace_time=max(1, int(job.interval)),
            )
        self._sched.start()
    async def stop(self, grace: float = 2.0) -> None:
        """Stop scheduling, give running jobs `grace` seconds, cancel the rest."""
        if self._sched is not None:
            self._sched.shutdown(wait=False)
            self._sched = None
        running = list(self._running)
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=grace)
        for job in self._jobs:
            await job.collector.close()
        self._jobs = []
        self._probes = []


class CollectionLoop:
    """An event loop of its own, in a thread, where the scheduler and every collector run.

    Reading and decoding thousands of rows, and turning them into families, is CPU work that an
    event loop cannot interleave; on the HTTP server's loop it would hold scrapes up. Here it only
    competes for the interpreter, which switches threads every few milliseconds, so a scrape is
    answered within milliseconds even while a big collection runs. The snapshot between the two
    loops is thread-safe.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="pgcache-collection", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
            # As asyncio.run does: whatever is still pending (a query being cancelled, a pool
            # closing) is cancelled and drained, so nothing dies with the loop half-done.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
        finally:
            self._loop.close()

    def start(self) -> None:
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the collection loop and wait for it from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
