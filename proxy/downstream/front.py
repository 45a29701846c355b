"""The proxy port's front end: plain GETs are parsed and answered here, everything else by aiohttp.

Per request, aiohttp's server makes a task, a request object with its payload stream and
writer, a response object, and runs the handler a loop turn after the bytes arrived. With
only our upstream client behind each, an httptools front end held a request ~90 µs from
reading it to writing it upstream where aiohttp's held it ~150 (c=10 over a 20 ms upstream,
bpftrace from read to write; the bench's latency case). Most proxied traffic is simpler than
what that machinery is for: GETs without a body on a keep-alive HTTP/1.1 connection. A
`LeanConnection` (connection.py) parses those itself with httptools (llhttp, the parser
aiohttp's own is built on) and hands the way in (handler.py) a `LeanRequest` and a
`LeanResponder` that writes the answer's bytes (lean.py).

Anything else makes the connection aiohttp's for good, starting from the first byte not yet
answered, which aiohttp's parser reads again: another method, a body, HTTP/1.0 or
`Connection: close`, `Expect`, an upgrade, a target that is not a plain path (absolute form,
percent-encoding, dot segments, `//`), the proxy's own endpoints, two requests in one read
(pipelining), a header past aiohttp's limits, bytes llhttp refuses. So whatever aiohttp
answered before, it still answers, in the same words. (A request sent while the previous one
is being answered is read once that answer is out, and may stay here.)

`LeanFront` bounds every connection of the port, its own and those it handed to aiohttp, the
same way: a header deadline, a keep-alive idle timeout, and a cap on open connections that
closes the longest idle one first (see `LeanFront`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.downstream.connection import LeanConnection
from proxy.downstream.responder import Responder, answer_on_aiohttp
from proxy.downstream.server_name import request_factory
from proxy.downstream.wire import RawAnswer

log = structlog.get_logger("resilience-proxy")

Answer = Callable[[Any, Responder], Awaitable[None]]
Hit = Callable[[Any], RawAnswer | None]


class LeanFront:
    """Makes the proxy port's connections (a protocol factory for `loop.create_server`) and bounds them.

    Both kinds of connection answer a request the same way: `hit(request)` may answer at once
    (stage 0: a fresh cached copy) or return None; then `answer(request, responder)` answers
    through the connection's `Responder` (a `LeanResponder` here, an `AiohttpResponder` on a
    connection handed to aiohttp's server, `self.aiohttp`).

    Every connection on the port, lean or handed to aiohttp, is bounded alike: the head of a
    request must arrive whole within `header_timeout` of its first byte (of the connection, for
    its first request), an idle keep-alive connection is closed after `keepalive_timeout`, and
    past `max_connections` a new connection closes the one idle for longest (since its last
    answer, or since its next request began; never one being answered) or, when every one is
    being answered, is closed itself. So neither slow heads nor
    idle connections can use up the process's file descriptors and lock callers out.
    """

    def __init__(self, answer: Answer, hit: Hit, *, max_line_size: int, max_field_size: int, max_headers: int,
                 header_timeout: float, keepalive_timeout: float, max_connections: int,
                 lean: bool = True) -> None:
        self.answer = answer
        self.hit = hit
        self.max_line_size = max_line_size
        self.max_field_size = max_field_size
        self.max_headers = max_headers
        # aiohttp's access log would repeat the request lines.
        self._handler_options: dict[str, Any] = dict(
            auto_decompress=False, access_log=None, max_line_size=max_line_size, max_field_size=max_field_size,
            max_headers=max_headers)
        self.set_bounds(header_timeout, keepalive_timeout, max_connections, lean)
        self.aiohttp = web.Server(self._aiohttp_request, request_factory=request_factory(), **self._handler_options)
        self.connections: set[LeanConnection] = set()
        self.handed: set[HandedOff] = set()
        self.idle: dict[LeanConnection | HandedOff, None] = {}  # not being answered, the longest idle first
        self.closing = False
        self.lean_requests = 0  # answered here, for tests and the curious
        self.handed_off = 0     # connections given to aiohttp
        self.closed = {"header_timeout": 0, "shed": 0, "refused": 0}  # connections closed to protect the port
        self._reported = dict(self.closed)
        self._sweep: asyncio.TimerHandle | None = None

    def __call__(self) -> "LeanConnection | HandedOff":
        if self.lean:
            return LeanConnection(self)
        # `server.front: aiohttp`: aiohttp's server reads every request, bounded as a handed-off connection.
        return HandedOff(self, self.aiohttp, loop=asyncio.get_running_loop(), first=True, **self._handler_options)

    def set_bounds(self, header_timeout: float, keepalive_timeout: float, max_connections: int,
                   lean: bool = True) -> None:
        """At start and at a reload: what the sweep and the next connections go by (`lean`: whose parser)."""
        self.lean = lean
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self._handler_options["keepalive_timeout"] = keepalive_timeout  # aiohttp's own idle timer agrees
        self._sweep_every = min(header_timeout, keepalive_timeout) / 4

    # --- which connections are open, and which idle ---

    def opened(self, connection: "LeanConnection | HandedOff", now: float) -> bool:
        """A new connection: make room for it at the cap; False when none can be made."""
        if len(self.connections) + len(self.handed) >= self.max_connections:
            if not self.idle:
                self.closed["refused"] += 1
                return False
            oldest = next(iter(self.idle))
            self.forget(oldest)  # counted out now: its connection_lost comes a loop turn later
            oldest.close_connection()
            self.closed["shed"] += 1
        if isinstance(connection, HandedOff):
            self.handed.add(connection)  # `server.front: aiohttp`
        else:
            self.connections.add(connection)
        connection.reading_since = now  # its first request's head is due within header_timeout
        self.now_idle(connection, now)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._sweep_every, self._swept)
        return True

    def now_idle(self, connection: "LeanConnection | HandedOff", now: float) -> None:
        """Its answer is out (or it just connected): idle from `now`, the newest of the idle ones."""
        connection.idle_since = now
        self.idle.pop(connection, None)
        self.idle[connection] = None

    def now_reading(self, connection: "LeanConnection | HandedOff", now: float) -> None:
        """The first byte of its next request came: its head is due, and it is the newest idle one
        (a keep-alive caller sending its next request is not the one to close for room)."""
        connection.reading_since = now
        self.idle.pop(connection, None)
        self.idle[connection] = None

    def now_answering(self, connection: "LeanConnection | HandedOff") -> None:
        connection.idle_since = connection.reading_since = None
        self.idle.pop(connection, None)

    def forget(self, connection: "LeanConnection | HandedOff") -> None:
        self.connections.discard(connection)  # type: ignore[arg-type]
        self.handed.discard(connection)  # type: ignore[arg-type]
        self.idle.pop(connection, None)

    # --- handing off to aiohttp ---

    def hand_off(self, transport: asyncio.Transport, data: bytes, connection: "LeanConnection",
                 head_whole: bool) -> None:
        """Give the connection to aiohttp; `data` are the bytes it has not answered yet.

        When they hold no whole request head yet, its header deadline goes with it.
        """
        self.handed_off += 1
        loop = asyncio.get_running_loop()
        protocol = HandedOff(self, self.aiohttp, loop=loop, **self._handler_options)
        self.handed.add(protocol)
        protocol.reading_since = connection.reading_since or loop.time()
        self.now_idle(protocol, connection.idle_since or loop.time())
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)
        if head_whole:  # being answered from here on: never shed while aiohttp gets to it
            self.now_answering(protocol)

    async def _aiohttp_request(self, request: web.BaseRequest) -> RawAnswer | web.StreamResponse:
        protocol = request.protocol
        if protocol in self.handed:
            self.now_answering(protocol)  # type: ignore[arg-type]
        return await answer_on_aiohttp(request, self.hit, self.answer)

    # --- timeouts ---

    def sweep(self, now: float) -> int:
        """Close the connections past their deadline at loop time `now`; returns how many."""
        late = []
        for connection in self.idle:
            if connection.reading_since is not None:
                if now - connection.reading_since > self.header_timeout:
                    late.append(connection)
                    self.closed["header_timeout"] += 1
            elif now - connection.idle_since > self.keepalive_timeout:  # type: ignore[operator]
                late.append(connection)
        for connection in late:
            self.forget(connection)
            connection.close_connection()
        return len(late)

    def _swept(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        self.sweep(loop.time())
        if self.closed != self._reported:
            counts = {k: v - self._reported[k] for k, v in self.closed.items()}
            log.warning("connections closed to protect the proxy port", kind="connections", **counts,
                        open=len(self.connections) + len(self.handed), max_connections=self.max_connections)
            self._reported = dict(self.closed)
        if (self.connections or self.handed) and not self.closing:
            self._sweep = loop.call_later(self._sweep_every, self._swept)

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now, let the others finish their answer (up to `timeout`), then cut them."""
        self.closing = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in list(self.connections):
            if connection.idle_since is not None:
                connection.close()
        busy = [c.answering for c in self.connections if c.answering is not None]
        if busy:
            _, late = await asyncio.wait(busy, timeout=timeout)
            for task in late:  # as aiohttp cancels its handlers past the drain: nothing runs on after stop
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        for connection in list(self.connections):
            # Those closing are sending what is left of their last answer; the rest is cut.
            if connection.transport is not None and not connection.transport.is_closing():
                connection.abort()


class HandedOff(RequestHandler):
    """aiohttp's protocol for a connection the lean front end handed over, with the same bounds.

    aiohttp closes idle connections itself (`keepalive_timeout`) but has no deadline for a
    request's head: this one tells its front end when it is answering and when bytes of a next
    request start arriving, and the front end's sweep closes it as it closes its own.
    """

    __slots__ = ("_front", "idle_since", "reading_since", "_early", "_first")

    def __init__(self, front: LeanFront, manager: web.Server, *, first: bool = False, **options: Any) -> None:
        super().__init__(manager, **options)
        self._front = front
        self.idle_since: float | None = None
        self.reading_since: float | None = None
        self._early = False  # bytes of a next request came while one was being answered
        self._first = first  # aiohttp's from the connect (`server.front: aiohttp`), not handed over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._first and (self._front.closing or not self._front.opened(self, asyncio.get_running_loop().time())):
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self.idle_since is None:
            self._early = True
        elif self.reading_since is None:
            self._front.now_reading(self, asyncio.get_running_loop().time())
        super().data_received(data)

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if self.transport is not None:  # else the caller left, and the front end forgot it
                now = asyncio.get_running_loop().time()
                self._front.now_idle(self, now)
                if self._early:
                    self._early = False
                    self.reading_since = now  # the next request's turn starts now

    def connection_lost(self, exc: BaseException | None) -> None:
        self._front.forget(self)
        super().connection_lost(exc)

    def close_connection(self) -> None:
        """Close it now (aiohttp's own `close()` only stops it after the request in hand)."""
        self.force_close()
