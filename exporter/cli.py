"""Command line: run (default), check-config, once, demo, --version.

Exit codes: 0 success, 1 a runtime failure (a target failed in `once`), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import Config, load_config
from .errors import ConfigError

log = logging.getLogger("exporter")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _common(parser: argparse.ArgumentParser, *, suppress: bool, reports: bool = False) -> None:
    """Flags accepted both before and after the subcommand (SUPPRESS keeps the outer value);
    `reports`: only those the report commands use (a config, a PostgreSQL target, the log level)."""
    d = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config.file", dest="config_file", metavar="FILE", default=d,
                        help="YAML config file (env PGCACHE_CONFIG_FILE)")
    parser.add_argument("--postgres-dsn", dest="postgres_dsn", action="append", metavar="[NAME=]DSN",
                        default=d, help="PostgreSQL target; repeatable; overrides the file (env PGCACHE_POSTGRES_DSN; "
                                        "prefer the variable or a file: a flag is visible in ps)")
    if reports:
        parser.add_argument("--log.level", dest="log_level", choices=["debug", "info", "warning", "error"],
                            default=d, help="debug shows the traceback of an unexpected failure")
        return
    parser.add_argument("--redis-url", dest="redis_url", action="append", metavar="[NAME=]URL",
                        default=d, help="Redis target; repeatable; overrides the file (env PGCACHE_REDIS_URL)")
    parser.add_argument("--web.listen-address", dest="listen_address", metavar="ADDR", default=d,
                        help="host:port to serve on (default :19187)")
    parser.add_argument("--web.config.file", dest="web_config_file", metavar="FILE", default=d,
                        help="TLS and basic auth config (exporter-toolkit format)")
    parser.add_argument("--shard.index", dest="shard_index", metavar="N|POD-NAME", default=d,
                        help="this replica's shard (env PGCACHE_SHARD_INDEX; a pod name ending in -N works)")
    parser.add_argument("--shard.total", dest="shard_total", metavar="N", default=d,
                        help="number of replicas sharing the targets (env PGCACHE_SHARD_TOTAL)")
    parser.add_argument("--log.level", dest="log_level", choices=["debug", "info", "warning", "error"],
                        default=d, help="debug also shows the traceback of an unexpected failure")
    parser.add_argument("--log.format", dest="log_format", choices=["text", "json"], default=d)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgcache-exporter",
        description="Prometheus exporter for PostgreSQL and its Redis query-result cache.",
    )
    p.add_argument("--version", action="version", version=f"pgcache-exporter {__version__}")
    _common(p, suppress=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="run the exporter (the default)")
    _common(r, suppress=True)
    c = sub.add_parser("check-config", help="validate a config file and exit (2 if invalid)")
    c.add_argument("file", metavar="FILE")
    o = sub.add_parser("once", help="collect every enabled collector once, print the exposition, exit")
    _common(o, suppress=True)
    o.add_argument("--format", choices=["text", "openmetrics"], default="text")
    d = sub.add_parser("demo", help="run against throwaway PostgreSQL and Redis servers, with a workload")
    _common(d, suppress=True)
    w = sub.add_parser("demo-workload", help="run the demo's blog workload against --postgres-dsn and --redis-url")
    _common(w, suppress=True)
    w.add_argument("--rate", type=float, default=20.0, help="operations per second (default 20)")
    from .reports.cli import add_commands

    p.set_defaults(extra_handlers=add_commands(sub, lambda q: _common(q, suppress=True, reports=True)))
    return p


def config_loader(args: argparse.Namespace) -> Callable[[], Config]:
    """A function that builds the effective config again (used at start and on SIGHUP)."""
    path = args.config_file or os.environ.get("PGCACHE_CONFIG_FILE") or None

    def load() -> Config:
        return load_config(
            path,
            postgres_dsns=args.postgres_dsn or (),
            redis_urls=args.redis_url or (),
            listen_address=args.listen_address,
            log_level=args.log_level,
            log_format=args.log_format,
            web_config_file=args.web_config_file,
            shard_index=args.shard_index,
            shard_total=args.shard_total,
        )

    return load


def _fail_config(e: ConfigError, prefix: str = "pgcache-exporter: ") -> int:
    """One line per problem, each naming its key; exit code 2."""
    for line in str(e).splitlines() or [str(e)]:
        print(f"{prefix}{line}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate everything that can be known without connecting: keys, types, durations, every
    DSN and URL in full, every ${VAR}, the secret files and the web config file."""
    from .webconfig import load_web_config

    try:
        config = load_config(args.file)
        if config.web.config_file is not None:
            load_web_config(config.web.config_file)
    except ConfigError as e:
        return _fail_config(ConfigError("\n".join(_every_problem(args.file, e))), prefix=f"{args.file}: ")
    print(f"{args.file}: OK ({len(config.postgres)} PostgreSQL and {len(config.redis)} Redis target(s))")
    return EXIT_OK


_UNSET_RE = re.compile(r"^(.*): environment variable (\w+) is not set$")


def _every_problem(path: str, error: ConfigError) -> list[str]:
    """The unset variables, and what else is wrong in the file: validated again with each unset
    variable empty, minus what that emptiness itself causes under the keys that use one."""
    lines = str(error).splitlines()
    unset = [m for m in map(_UNSET_RE.match, lines) if m]
    if not unset or len(unset) != len(lines):
        return lines
    env = {**os.environ, **{m.group(2): "" for m in unset}}
    keys = {m.group(1) for m in unset}
    try:
        load_config(path, env=env)
    except ConfigError as again:
        for line in str(again).splitlines():
            key = line.split(": ", 1)[0]
            if not any(key == k or key.startswith((k + ".", k + "[")) or k.startswith((key + ".", key + "["))
                       for k in keys):
                lines.append(line)
    return lines


def _once_config(config: Config) -> Config:
    """`once` runs every collector of a target at the same time: give each its own connection,
    so none waits on the pool (and for the pool timeout when the server is down)."""
    from .definitions import builtin_definitions

    enabled = sum(1 for d in builtin_definitions() if config.collectors.settings(d.name).enabled)
    enabled += sum(1 for q in config.queries if q.enabled)
    targets = tuple(
        t.model_copy(update={"max_connections": max(t.max_connections, min(10, enabled))})
        for t in config.postgres
    )
    return config.model_copy(update={"postgres": targets})


def cmd_once(args: argparse.Namespace) -> int:
    from .daemon import collect_once
    from .logs import setup_logging
    from .snapshot import Snapshot

    try:
        config = config_loader(args)()
    except ConfigError as e:
        return _fail_config(e)
    setup_logging(config.log.level, config.log.format)
    if config.log.level != "debug":
        # Each failure is summed up once below; the scheduler's per-run warning would repeat it.
        logging.getLogger("exporter.scheduler").setLevel(logging.ERROR)
    snapshot = Snapshot()
    try:
        ok = asyncio.run(collect_once(_once_config(config), snapshot))
    except ConfigError as e:
        return _fail_config(e)
    out = snapshot.openmetrics() if args.format == "openmetrics" else snapshot.text()
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    if not ok:
        # One line per distinct error, with the collectors that hit it.
        failed: dict[str, list[str]] = {}
        for st in snapshot.status.values():
            if not st.success:
                failed.setdefault(st.last_error or "failed", []).append(st.collector)
        for error, collectors in failed.items():
            which = "collector" if len(collectors) == 1 else "collectors"
            print(f"pgcache-exporter: {error} ({which} {', '.join(collectors)})", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon
    from .logs import setup_logging

    load = config_loader(args)

    async def main() -> None:
        daemon = Daemon(load)
        await daemon.serve()

    try:
        config = load()
        setup_logging(config.log.level, config.log.format)
        asyncio.run(main())
    except ConfigError as e:
        return _fail_config(e)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    return run_demo(args, config_loader)


def cmd_demo_workload(args: argparse.Namespace) -> int:
    from .demo.run import run_workload_only

    return run_workload_only(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": cmd_run, "check-config": cmd_check_config, "once": cmd_once, "demo": cmd_demo,
        "demo-workload": cmd_demo_workload, **getattr(args, "extra_handlers", {}),
    }
    try:
        return handlers[command](args)
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as e:
        # A failure nobody anticipated: one line; the traceback only when asked for.
        if getattr(args, "log_level", None) == "debug":
            raise
        from .logs import redactor

        detail = redactor(str(e).strip().splitlines()[0] if str(e).strip() else "")
        print(f"pgcache-exporter {command}: unexpected {type(e).__name__}"
              f"{': ' + detail if detail else ''} (--log.level debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
