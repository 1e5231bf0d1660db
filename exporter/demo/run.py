"""`pgcache-exporter demo`: the exporter against a throwaway PostgreSQL and redis-server, with the
seed design's blog running a steady workload through the cache, so every dashboard has data.

Nothing to configure: both servers are started in temporary directories, the daemon watches
them, and Ctrl-C (or SIGTERM) stops everything and removes the servers' files.
`pgcache-exporter demo-workload` runs only the workload, against servers you name.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..config import Config, split_target_flag
from ..errors import ConfigError
from .servers import PostgresCluster, RedisServer, ServerNotFound

log = logging.getLogger(__name__)

# The demo shows unused indexes at once (a real deployment waits for a week of statistics) and
# refreshes sizes every 30 s instead of every 5 minutes.
DEMO_CONFIG = """\
postgres:
  - name: demo
    dsn: {dsn}
redis:
  - name: cache
    url: {redis_url}
collectors:
  indexes: {{interval: 30s, timeout: 20s, unused_min_stats_age: 0s, unused_min_size: 0}}
  tables: {{interval: 30s, timeout: 20s}}
"""


async def _stop_workload(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    try:
        await asyncio.wait_for(task, timeout=10)
    except Exception as e:  # the demo ends either way; say why the workload did not end cleanly
        log.warning("demo workload ended with %r", e)


def run_demo(
    args: argparse.Namespace, config_loader: Callable[[argparse.Namespace], Callable[[], Config]]
) -> int:
    from ..daemon import Daemon
    from ..logs import setup_logging
    from .blog import run_demo_workload

    setup_logging(args.log_level or "info", args.log_format or "text")
    try:
        pg = PostgresCluster()
        redis = RedisServer()
    except ServerNotFound as e:
        print(f"pgcache-exporter demo: {e}", file=sys.stderr)
        return 1
    with pg, redis:
        config_file = Path(pg.base) / "demo.yaml"
        config_file.write_text(DEMO_CONFIG.format(dsn=pg.dsn, redis_url=redis.url))
        args.config_file = str(config_file)
        args.postgres_dsn = args.redis_url = None
        args.listen_address = args.listen_address or "127.0.0.1:19187"
        load = config_loader(args)

        async def announce(daemon: Daemon) -> None:
            # Only once the port is ours: a URL printed before could be another process's.
            while daemon.bound is None:  # noqa: ASYNC110 - the daemon sets no event when it binds
                await asyncio.sleep(0.05)
            host, port = daemon.bound
            host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            host = f"[{host}]" if ":" in host else host
            print(
                f"pgcache-exporter demo: started\n  {pg.describe()} at {pg.dsn}\n"
                f"  {redis.describe()} at {redis.url}\n"
                f"  metrics: http://{host}:{port}/metrics\n"
                "  the blog workload runs through the cache; Ctrl-C stops and removes everything.",
                flush=True,
            )

        async def main() -> None:
            daemon = Daemon(load)
            stop = asyncio.Event()
            workload = asyncio.create_task(run_demo_workload(pg.dsn, redis.url, stop))
            announcer = asyncio.create_task(announce(daemon))
            try:
                await daemon.serve()
            finally:
                announcer.cancel()
                await _stop_workload(workload, stop)

        try:
            asyncio.run(main())
        except ConfigError as e:
            print(f"pgcache-exporter demo: {e}", file=sys.stderr)
            return 2
    return 0


def run_workload_only(args: argparse.Namespace) -> int:
    """`demo-workload`: the blog workload against the first --postgres-dsn and --redis-url."""
    from ..logs import setup_logging
    from .blog import run_demo_workload

    setup_logging(args.log_level or "info", args.log_format or "text")
    if not args.postgres_dsn or not args.redis_url:
        print("pgcache-exporter demo-workload: give --postgres-dsn and --redis-url "
              "(a role that may create tables in that database)", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        _, dsn = split_target_flag(args.postgres_dsn[0])
        _, url = split_target_flag(args.redis_url[0])
        done: dict[str, int] = {}
        started = time.monotonic()
        reporter = asyncio.create_task(_report_progress(done, stop, started, PROGRESS_EVERY))
        try:
            await run_demo_workload(dsn, url, stop, rate=args.rate, done=done)
        finally:
            reporter.cancel()
            print(_progress_line(done, time.monotonic() - started, final=True), flush=True)

    asyncio.run(main())
    return 0


PROGRESS_EVERY = 5.0


def _progress_line(done: dict[str, int], elapsed: float, *, final: bool = False) -> str:
    failed = done.get("failed", 0)
    ops = sum(n for op, n in done.items() if op != "failed")
    rate = ops / elapsed if elapsed > 0 else 0.0
    word = "finished" if final else "running"
    return (f"pgcache-exporter demo-workload: {word}: {ops} operations in {elapsed:.0f}s "
            f"({rate:.1f}/s), {failed} errors")


async def _report_progress(done: dict[str, int], stop: asyncio.Event, started: float, every: float) -> None:
    """A line every few seconds: operations done, the rate since start, errors."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            print(_progress_line(done, time.monotonic() - started), flush=True)
