"""Run the daemon in-process (fast) or as a real process (for signals) in tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from exporter.config import build_config
from exporter.daemon import Daemon
from exporter.definitions import builtin_definitions
from exporter.demo.servers import free_port

FAST = {"interval": "1s", "timeout": "1s"}


def fast_collectors(**overrides: Any) -> dict[str, Any]:
    """Every collector on a 1 s schedule (tests wait for a collection, not for minutes)."""
    out: dict[str, Any] = {n: dict(FAST) for n in collector_names()}
    for name, extra in overrides.items():
        out[name] = {**out[name], **extra}
    return out


def collector_names() -> list[str]:
    """Every collector the daemon can run (the definitions, and cache): the one list tests use."""
    return [d.name for d in builtin_definitions()] + ["cache"]


def all_off_except(*keep: str) -> dict[str, Any]:
    """`collectors:` with every collector but `keep` switched off."""
    return {name: {"enabled": False} for name in collector_names() if name not in keep}


@asynccontextmanager
async def running_daemon(raw: dict[str, Any] | Callable[[], dict[str, Any]]) -> AsyncIterator[Daemon]:
    """A Daemon listening on an ephemeral loopback port; `raw` may be a function (read on reload)."""
    raw_fn = raw if callable(raw) else (lambda: raw)

    def load():  # type: ignore[no-untyped-def]
        doc = dict(raw_fn())
        doc.setdefault("web", {"listen_address": "127.0.0.1:0"})
        return build_config(doc)

    daemon = Daemon(load)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def url(daemon: Daemon, path: str = "/metrics") -> str:
    assert daemon.bound is not None
    host, port = daemon.bound
    return f"http://{host}:{port}{path}"


async def fetch(daemon_or_url: Daemon | str, path: str = "/metrics", **kw: Any) -> tuple[int, str]:
    target = daemon_or_url if isinstance(daemon_or_url, str) else url(daemon_or_url, path)
    async with aiohttp.ClientSession() as s, s.get(target, **kw) as r:
        return r.status, await r.text()


async def wait_for(predicate: Callable[[], Any], timeout: float = 15, what: str = "condition") -> Any:
    """Poll an async or sync predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def runs_of(daemon: Daemon, collector: str, target: str | None = None) -> int:
    return min(
        (st.runs for (t, c), st in daemon.snapshot.status.items()
         if c == collector and (target is None or t == target)),
        default=0,
    )


async def next_round(daemon: Daemon, collector: str, target: str | None = None) -> None:
    """Wait until `collector` has finished a run that started after this call."""
    start = await runs_of(daemon, collector, target)
    await wait_for(lambda: runs_of_gt(daemon, collector, target, start + 1), what=f"{collector} run")


async def runs_of_gt(daemon: Daemon, collector: str, target: str | None, n: int) -> bool:
    return await runs_of(daemon, collector, target) > n


class DaemonProcess:
    """`python -m exporter ...` as a child process, with its stderr captured to a file."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, logfile: str) -> None:
        self.port = free_port()
        self.logfile = logfile
        self.args = [sys.executable, "-m", "exporter", *args, "--web.listen-address", f"127.0.0.1:{self.port}"]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DaemonProcess:
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
