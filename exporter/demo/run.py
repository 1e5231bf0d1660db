"""`pgcache-exporter demo`: the exporter against a throwaway PostgreSQL and redis-server.

Nothing to configure: both servers are started in temporary directories, the daemon watches
them, and Ctrl-C (or SIGTERM) stops everything and removes the servers' files.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

from ..config import Config
from ..errors import ConfigError
from .servers import PostgresCluster, RedisServer, ServerNotFound

log = logging.getLogger(__name__)


def run_demo(
    args: argparse.Namespace, config_loader: Callable[[argparse.Namespace], Callable[[], Config]]
) -> int:
    from ..daemon import Daemon
    from ..logs import setup_logging

    setup_logging(args.log_level or "info", args.log_format or "text")
    try:
        pg = PostgresCluster()
        redis = RedisServer()
    except ServerNotFound as e:
        print(f"pgcache-exporter demo: {e}", file=sys.stderr)
        return 1
    with pg:
        with redis:
            args.postgres_dsn = [f"demo={pg.dsn}"]
            args.redis_url = [f"cache={redis.url}"]
            args.listen_address = args.listen_address or "127.0.0.1:19187"
            load = config_loader(args)

            async def main() -> None:
                daemon = Daemon(load)
                host_port = args.listen_address
                print(
                    f"pgcache-exporter demo: PostgreSQL {pg.major} on 127.0.0.1:{pg.port}, "
                    f"Redis on 127.0.0.1:{redis.port}\n"
                    f"  metrics: http://{host_port.replace('0.0.0.0', '127.0.0.1')}/metrics\n"
                    "  Ctrl-C stops and removes everything.",
                    flush=True,
                )
                await daemon.serve()

            try:
                asyncio.run(main())
            except ConfigError as e:
                print(f"pgcache-exporter demo: {e}", file=sys.stderr)
                return 2
    return 0
