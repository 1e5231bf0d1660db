"""HTTP: /metrics (ready bytes), / (landing page with every collector's state), /healthz, /ready.

A scrape hands out the snapshot's rendered bytes: every client gets a view of the same immutable
object, written in 64 KiB chunks with a wait for the socket after every 64 KiB (see httpserver.py),
so many slow clients never multiply the exposition in memory.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import __version__
from .snapshot import Snapshot

__all__ = ["make_app"]

log = logging.getLogger(__name__)

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

SNAPSHOT_KEY = web.AppKey("snapshot", Snapshot)
TargetsFn = Callable[[], list[tuple[str, str]]]
TARGETS_KEY: web.AppKey[TargetsFn] = web.AppKey("targets")


CHUNK = 64 * 1024


async def send_shared(request: web.Request, body: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """Send `body` (shared by every client, never copied whole) in chunks; aiohttp drains after
    every 64 KiB, and with the connection's high-water mark at 0 that means until the kernel has
    taken every byte."""
    response = web.StreamResponse(headers=headers)
    response.content_length = len(body)
    await response.prepare(request)
    try:
        if request.method != "HEAD":
            view = memoryview(body)
            for start in range(0, len(body), CHUNK):
                await response.write(view[start:start + CHUNK])
        await response.write_eof()
    except ConnectionError:
        # The client left, or was cut off by the write timeout: routine, not an error.
        log.debug("%s %s: the client went away before the response was sent", request.method, request.path)
    return response


async def metrics(request: web.Request) -> web.StreamResponse:
    snap = request.app[SNAPSHOT_KEY]
    if "application/openmetrics-text" in request.headers.get("Accept", ""):
        return await send_shared(request, snap.openmetrics(), {"Content-Type": OPENMETRICS_CONTENT_TYPE})
    headers = {"Content-Type": TEXT_CONTENT_TYPE}
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return await send_shared(request, snap.served(gzipped=True), headers)
    return await send_shared(request, snap.served(gzipped=False), headers)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[SNAPSHOT_KEY].ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready: the first collection round has not finished\n")


def _ago(ts: float | None, now: float) -> str:
    return "never" if ts is None else f"{now - ts:.1f}s ago"


async def landing(request: web.Request) -> web.Response:
    snap = request.app[SNAPSHOT_KEY]
    now = time.time()
    e = html.escape
    rows = []
    for st in sorted(snap.status.values(), key=lambda s: (s.target, s.collector)):
        state = "pending" if st.runs == 0 else ("ok" if st.success else "failing")
        duration = "" if st.duration is None else f"{st.duration * 1000:.0f} ms"
        rows.append(
            f"<tr class={state}><td>{e(st.target)}</td><td>{e(st.collector)}</td><td>{state}</td>"
            f"<td>{e(_ago(st.last_run, now))}</td><td>{duration}</td>"
            f"<td>{e(_ago(st.last_success, now))}</td><td>{st.runs}</td><td>{st.errors_total}</td>"
            f"<td>{e(st.last_error or '')}</td></tr>"
        )
    targets = "".join(
        f"<tr><td>{e(name)}</td><td>{e(kind)}</td>"
        f"<td>{ {True: 'up', False: 'down', None: 'pending'}[snap.up.get(name)] }</td></tr>"
        for name, kind in request.app[TARGETS_KEY]()
    )
    warnings = "".join(f"<p class=warning>Warning: {e(h.privilege_warning)}</p>"
                       for _, h in sorted(snap.health.items()) if h.privilege_warning)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pgcache-exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:left}}
tr.failing{{background:#fdd}}tr.pending{{background:#eee}}</style></head>
<body><h1>pgcache-exporter {e(__version__)}</h1>
<p><a href="/metrics">Metrics</a> · <a href="/healthz">Health</a> · <a href="/ready">Ready</a>
 ({"ready" if snap.ready else "not ready"})</p>{warnings}
<h2>Targets</h2><table><tr><th>target</th><th>kind</th><th>state</th></tr>{targets}</table>
<h2>Collectors</h2><table><tr><th>target</th><th>collector</th><th>status</th><th>last run</th>
<th>duration</th><th>last success</th><th>runs</th><th>errors</th><th>last error</th></tr>
{"".join(rows)}</table></body></html>
"""
    return web.Response(text=page, content_type="text/html")


def make_app(
    snapshot: Snapshot,
    targets: Callable[[], list[tuple[str, str]]],
    middlewares: Sequence[Middleware] = (),
) -> web.Application:
    app = web.Application(middlewares=list(middlewares))
    app[SNAPSHOT_KEY] = snapshot
    app[TARGETS_KEY] = targets
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ready", ready)
    app.router.add_get("/", landing)
    return app
