"""One APScheduler job per (target, collector): own interval, first run at start-up, never two
runs of the same job at once, and a timeout that bounds the whole run (the SQL is bounded by
statement_timeout on the session as well)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from .collector import Collector, CollectResult
from .errors import CollectError, ConnectError
from .logs import redactor
from .snapshot import Snapshot

__all__ = ["CollectionLoop", "Job", "Scheduler", "run_job"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Job:
    collector: Collector
    interval: float
    timeout: float
    last_error: str | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.collector.target, self.collector.name)

    @property
    def id(self) -> str:
        return f"{self.collector.target}/{self.collector.name}"


async def run_job(job: Job, snapshot: Snapshot) -> bool:
    """Run one collection, record it in the snapshot, log changes of state. Never raises
    (but for cancellation): one failing collector must not disturb anything else."""
    target, name = job.key
    start = time.monotonic()
    result: CollectResult | None = None
    reachable: bool | None = None
    bug: Exception | None = None
    try:
        async with asyncio.timeout(job.timeout):
            result = await job.collector.collect()
        reachable = True
        error = "; ".join(result.partial_errors) or None
    except ConnectError as e:
        error, reachable = str(e), False
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
        # The target is gone: its last figures are no longer true (pgcache_up says why); only
        # what the collector still knows for sure replaces them.
        result = CollectResult(job.collector.unreachable_families())
    snapshot.record(target, name, result=result, duration=duration, error=error, reachable=reachable)
    if error != job.last_error:
        if error is None:
            log.info("target %s: collector %s recovered", target, name)
        elif bug is not None:  # the traceback once, not on every run
            log.error("%s", error, exc_info=bug)
        else:
            log.warning("%s", error)
        job.last_error = error
    return error is None


class Scheduler:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._sched: AsyncIOScheduler | None = None
        self._jobs: list[Job] = []
        self._running: set[asyncio.Task[bool]] = set()

    async def _run(self, job: Job) -> bool:
        task = asyncio.current_task()
        assert task is not None
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
            self._running.discard(task)  # type: ignore[arg-type]

    def start(self, jobs: list[Job]) -> None:
        self._jobs = jobs
        self._sched = AsyncIOScheduler(timezone=UTC)
        now = datetime.now(UTC)
        for job in jobs:
            self._sched.add_job(
                self._run,
                IntervalTrigger(seconds=job.interval, timezone=UTC),
                args=[job],
                id=job.id,
                name=job.id,
                next_run_time=now,
                max_instances=1,  # never two runs of one job at once
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
