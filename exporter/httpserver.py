"""The HTTP listener: aiohttp's request handling behind our own accept loop, so a flood of slow or
stalled clients costs a bounded number of sockets and bytes instead of the exporter's health.

- At most `max_connections` connections are open. At the cap the loop stops accepting: new clients
  wait in the kernel's listen backlog (back-pressure), nothing is refused and nothing is logged.
- A connection must deliver a complete request header within `header_timeout` of opening (or of
  its first byte after a keep-alive pause); a keep-alive connection that sends nothing is closed
  after `idle_timeout`.
- Writes are flow-controlled to the socket: at most two 64 KiB chunks wait in user space per
  connection, and a response the client stops reading for `write_timeout` is aborted.
- accept() failures (EMFILE and friends) back off and are logged at most once per interval, with a
  count, instead of once per attempt.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["ConnectionGuard", "GuardedSite", "HttpLimits", "connection_cap"]

log = logging.getLogger(__name__)

# Out-of-resource errors from accept(): wait for a connection to close rather than retry at once.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# The peer gave up before we accepted: nothing to do.
_TRANSIENT_ERRNOS = {errno.ECONNABORTED, errno.EAGAIN, errno.EPROTO, errno.EPERM}
# File descriptors kept free for database pools, Redis, logs and the config file.
FD_RESERVE = 100


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    write_timeout: float = 30.0
    max_connections: int = 512
    backlog: int = 128


def connection_cap(configured: int) -> tuple[int, str | None]:
    """The connection cap to use: `configured`, lowered to fit the open-files limit (RLIMIT_NOFILE)
    with FD_RESERVE to spare; the second value says why it was lowered."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or configured <= soft - FD_RESERVE:
        return configured, None
    cap = max(1, soft - FD_RESERVE)
    return cap, (
        f"web.max_connections {configured} does not fit the open-files limit ({soft}, ulimit -n) "
        f"with {FD_RESERVE} to spare: serving at most {cap} connections at once"
    )


class RateLimitedLog:
    """Log the first occurrence at once, then at most one summary line per `interval` seconds."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0
        self._last = ""

    def __call__(self, message: str) -> bool:
        """Log `message` (or count it); True if a line was written."""
        now = self._clock()
        self._last = message
        if now < self._next:
            self._suppressed += 1
            return False
        if self._suppressed:
            self._log.warning("%s (and %d more like it in the last %.0fs)", message,
                              self._suppressed, self._interval)
        else:
            self._log.warning("%s", message)
        self._suppressed = 0
        self._next = now + self._interval
        return True


class _Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's RequestHandler inside, our timeouts around it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self.transport: asyncio.Transport | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._partial = False  # bytes of an unfinished request header have arrived
        self._tail = b""
        self._released = False

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = transport  # type: ignore[assignment]
        assert isinstance(t, asyncio.Transport)
        # High-water mark 0: the handler's drain() (after every 64 KiB) waits until every byte
        # reached the kernel, so a client that does not read pins two chunks at most, never a
        # copy of the whole response; and pause_writing starts the write timeout.
        t.set_write_buffer_limits(high=0)
        self._guard.connections[t] = self
        self._arm_header_timer()
        self._inner.connection_made(t)

    def data_received(self, data: bytes) -> None:
        self._scan(data)
        if not self._busy and self._partial and self._header_timer is None:
            # The start of a request on a kept-alive connection: its header has to follow.
            self._arm_header_timer()
        self._inner.data_received(data)

    def _scan(self, data: bytes) -> None:
        """Track whether bytes of an unfinished request header are waiting (anything after the
        last blank line). Only GET and HEAD are served, so a body never confuses this for long:
        at worst its connection is closed header_timeout after the answer."""
        buf = self._tail + data
        end = buf.rfind(b"\r\n\r\n")
        if end >= 0:
            self._partial = bool(buf[end + 4:].strip(b"\r\n"))
        else:
            self._partial = self._partial or bool(data.strip(b"\r\n"))
        self._tail = buf[-3:]

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._write_timer is None:
            loop = asyncio.get_running_loop()
            self._write_timer = loop.call_later(self._guard.limits.write_timeout, self._write_stalled)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_write_timer()
        if self.transport is not None:
            self._guard.connections.pop(self.transport, None)
        self.release()
        self._inner.connection_lost(exc)

    # -- request state (told by the guard's middleware) -----------------------------------------
    def request_started(self) -> None:
        self._busy = True
        self._cancel_header_timer()

    def request_finished(self) -> None:
        # Waiting for the next request is aiohttp's keep-alive timeout (idle_timeout) again,
        # unless part of one already arrived (pipelined behind this one).
        self._busy = False
        if self._partial:
            self._arm_header_timer()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._guard.slots.release()

    # -- timers ----------------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self._guard.limits.header_timeout, self._header_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _header_expired(self) -> None:
        self._header_timer = None
        self._guard.closed_for_header_timeout += 1
        self._close(abort=False)

    def _write_stalled(self) -> None:
        self._write_timer = None
        self._guard.closed_for_write_timeout += 1
        log.debug("aborting a response the client has not read for %.0fs",
                  self._guard.limits.write_timeout)
        self._close(abort=True)

    def _close(self, *, abort: bool) -> None:
        t = self.transport
        if t is None or t.is_closing() and not abort:
            return
        # close() would wait for unsent bytes forever when the client does not read: abort then.
        if abort or t.get_write_buffer_size():
            t.abort()
        else:
            t.close()


class ConnectionGuard:
    """The live connections of one HTTP server and the middleware that tells each of them when a
    request is being handled (the header timeout stops, the idle timeout is aiohttp's)."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.connections: dict[asyncio.BaseTransport, _Connection] = {}
        self._slots: asyncio.Semaphore | None = None
        self.closed_for_header_timeout = 0
        self.closed_for_write_timeout = 0

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:  # created on the serving loop
            self._slots = asyncio.Semaphore(self.limits.max_connections)
        return self._slots

    @property
    def middleware(self) -> Any:
        @web.middleware
        async def track(request: web.Request, handler: Any) -> web.StreamResponse:
            conn = self.connections.get(request.transport) if request.transport else None
            if conn is not None:
                conn.request_started()
            try:
                response: web.StreamResponse = await handler(request)
                return response
            finally:
                if conn is not None:
                    conn.request_finished()

        return track


class _Listener:
    """What aiohttp's runner expects of a site's server: the listening sockets, and close()."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self._sockets = sockets

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def close(self) -> None:
        for s in self._sockets:
            s.close()

    async def wait_closed(self) -> None:
        return None


def _listening_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """One listening socket per address `host` resolves to (like asyncio's create_server)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
            if port == 0:  # every address on the same ephemeral port, as asyncio does
                port = sock.getsockname()[1]
    except OSError:
        for s in sockets:
            s.close()
        raise
    return sockets


class GuardedSite(web.BaseSite):
    """A TCP site whose accept loop enforces the ConnectionGuard's limits."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=guard.limits.backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._tasks: set[asyncio.Task[None]] = set()
        self._sockets: list[socket.socket] | None = None
        self._accept_errors = RateLimitedLog(log)

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    def bind(self) -> None:
        """Take the address now (OSError if it is in use); connections are accepted from start()."""
        if self._sockets is None:
            self._sockets = _listening_sockets(self._host, self._port, self._backlog)

    def unbind(self) -> None:
        """Give the address back when start() will not be called after bind()."""
        if self._server is None and self._sockets:
            for s in self._sockets:
                s.close()
            self._sockets = None

    async def start(self) -> None:
        await super().start()
        self.bind()
        assert self._sockets is not None
        self._server = _Listener(self._sockets)  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            self._spawn(loop.create_task(self._accept_loop(sock)))

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.unbind()
        await super().stop()

    def _spawn(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        slots = self._guard.slots
        backoff = 0.05
        while True:
            # At the cap, stop here: new clients queue in the kernel backlog until one closes.
            await slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                slots.release()
                if e.errno in _TRANSIENT_ERRNOS:
                    continue
                self._accept_errors(f"cannot accept HTTP connections: {e.strerror or e}")
                # Out of file descriptors (or memory): retrying at once only spins. Wait, longer
                # each time, for a connection to close.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            except BaseException:
                slots.release()
                raise
            backoff = 0.05
            self._spawn(loop.create_task(self._connect(conn)))

    async def _connect(self, conn: socket.socket) -> None:
        """Hand an accepted socket to aiohttp (after the TLS handshake, bounded by header_timeout)."""
        loop = asyncio.get_running_loop()
        server = self._runner.server
        made: list[_Connection] = []

        def factory() -> _Connection:
            assert server is not None
            c = _Connection(self._guard, server())
            made.append(c)
            return c

        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            kwargs: dict[str, Any] = {}
            if self._ssl_context is not None:
                kwargs = {"ssl": self._ssl_context,
                          "ssl_handshake_timeout": self._guard.limits.header_timeout}
            await loop.connect_accepted_socket(factory, conn, **kwargs)
        except BaseException as e:
            # A failed TLS handshake (or shutdown): the connection never reached aiohttp.
            if made:
                made[0].release()
            else:
                self._guard.slots.release()
            conn.close()
            if not isinstance(e, Exception):
                raise
            log.debug("HTTP connection dropped before its first request: %r", e)
