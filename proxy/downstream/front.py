"""The proxy port's front end: plain GETs are parsed and answered here, everything else by aiohttp.

Per request, aiohttp's server makes a task, a request object with its payload stream and
writer, a response object, and runs the handler a loop turn after the bytes arrived. With
only our upstream client behind each, an httptools front end held a request ~90 µs from
reading it to writing it upstream where aiohttp's held it ~150 (c=10 over a 20 ms upstream,
bpftrace from read to write; the bench's latency case). Most proxied traffic is simpler than
what that machinery is for: GETs without a body on a keep-alive HTTP/1.1 connection. A
`LeanConnection` parses those itself with httptools (llhttp, the parser aiohttp's own is
built on), gives the handler a `LeanRequest` and writes the answer's bytes.

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
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import structlog
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from proxy.downstream.handler import (
    RawAnswer,
    date_header,
    error_response,
    new_request_id,
    own_endpoint,
    render_bodiless,
    render_head,
)
from proxy.downstream.server_name import request_factory

log = structlog.get_logger("resilience-proxy")

_NOT_PLAIN = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade",
                        b"sec-websocket-key1"})  # aiohttp refuses the old WebSocket handshake: let it
# Headers aiohttp's parser refuses to see twice (aiohttp/http_parser.py SINGLETON_HEADERS; a test
# checks this covers them): a request repeating one is aiohttp's to refuse.
SINGLETONS = frozenset({b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
                        b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent"})
_HELD_MAX = 64 * 1024   # bytes of a request not yet whole (or sent early) before aiohttp takes over
# aiohttp's parser spells the header names it knows (aiohttp.hdrs) its own way, whatever the caller
# sent; so do we, so that an upstream sees the same names from either front end.
_CANONICAL = {str(name).lower().encode(): str(name) for name in vars(hdrs).values() if isinstance(name, istr)}

Handler = Callable[[Any], Awaitable[Any]]


class LeanRequest:
    """The part of `web.BaseRequest` the proxy's handlers read, for a plain GET.

    `HitPath`, `ProxyHandler` and `request_id_of` use exactly these; a request that would
    need more (a body, the proxy's own endpoints) never becomes a LeanRequest.
    """

    __slots__ = ("raw_path", "path", "raw_headers", "transport", "_connection", "_headers", "_url")

    method = "GET"
    version = HttpVersion11
    keep_alive = True
    content_length = None
    body_exists = False

    def __init__(self, target: str, raw_headers: tuple[tuple[bytes, bytes], ...], connection: "LeanConnection") -> None:
        self.raw_path = target
        self.path = target.split("?", 1)[0]  # no percent-encoding here: decoded is as received
        self.raw_headers = raw_headers
        self.transport = connection.transport
        self._connection = connection
        self._headers: CIMultiDictProxy[str] | None = None
        self._url: URL | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            # Decoded as aiohttp decodes them: UTF-8, undecodable bytes kept as surrogates.
            self._headers = CIMultiDictProxy(CIMultiDict(
                (_CANONICAL.get(name.lower()) or name.decode("utf-8", "surrogateescape"),
                 value.decode("utf-8", "surrogateescape"))
                for name, value in self.raw_headers))
        return self._headers

    @property
    def rel_url(self) -> URL:
        if self._url is None:
            path, _, query = self.raw_path.partition("?")
            self._url = URL.build(path=path, query_string=query, encoded=True)  # as aiohttp's parser builds it
        return self._url

    @property
    def remote(self) -> str | None:
        """The caller's address, as aiohttp's `request.remote` gives it."""
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, (tuple, list)) and peer else None

    def stream_response(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> "LeanStream":
        """What `ProxyHandler` streams a large answer through (in place of `web.StreamResponse`)."""
        return LeanStream(self._connection, status, reason, headers)


class LeanStream:
    """`web.StreamResponse`'s prepare / write / write_eof / force_close on a lean connection,
    framed as aiohttp frames it: Content-Length when known, else chunked."""

    __slots__ = ("_connection", "_status", "_reason", "_headers", "content_length", "keep_alive", "_chunked",
                 "_bodiless")

    def __init__(self, connection: "LeanConnection", status: int, reason: str | None,
                 headers: CIMultiDict[str]) -> None:
        self._connection = connection
        self._status = status
        self._reason = reason
        self._headers = headers
        self.content_length: int | None = None
        self.keep_alive = True
        self._chunked = False
        self._bodiless = status < 200 or status in (204, 304)

    async def prepare(self, request: LeanRequest) -> None:
        headers = list(self._headers.items())
        if self._bodiless:  # e.g. a 304 whose Content-Length describes the representation
            rendered = render_bodiless(self._status, self._reason, headers)
        else:
            rendered = render_head(self._status, self._reason, headers, [], frozenset(), self.content_length)
            self._chunked = self.content_length is None
        if rendered is None:
            raise ValueError(f"answer {self._status} cannot be written as it is")  # as aiohttp refuses it
        head, dated = rendered
        self._connection.write(b"".join((head, b"" if dated else date_header(), b"\r\n")))

    async def write(self, data: bytes) -> None:
        if not data or self._bodiless:
            return
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._connection.write(data)
        await self._connection.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        await self.write(data)
        if self._chunked:
            self._connection.write(b"0\r\n\r\n")
        await self._connection.drain()

    def force_close(self) -> None:
        self.keep_alive = False


def render_response(response: web.Response) -> bytes | None:
    """A buffered `web.Response` as the bytes aiohttp would send (header order aside), or None."""
    body = response.body
    if not isinstance(body, bytes):
        return None
    headers = list(response.headers.items())
    if response.status < 200 or response.status in (204, 304):
        rendered = render_bodiless(response.status, response.reason, headers)
        body = b""
    else:
        rendered = render_head(response.status, response.reason, headers, [], frozenset(), len(body))
    if rendered is None:
        return None
    head, dated = rendered
    return b"".join((head, b"" if dated else date_header(), b"\r\n", body))


def is_plain_target(url: bytes) -> bool:
    """A target `LeanRequest` can stand for: an origin-form path whose decoded form is itself."""
    path = url.split(b"?", 1)[0]
    if not path.startswith(b"/") or not url.isascii():
        return False
    if b"%" in path or b"/." in path or b"//" in path or b"#" in url:
        return False
    return not own_endpoint(path.decode("ascii"))  # those handlers need aiohttp's request objects


class LeanFront:
    """Makes the proxy port's connections (a protocol factory for `loop.create_server`) and bounds them.

    `fast(request)` may answer at once (a fresh cached copy) or return None; `handler(request)`
    answers the rest; `aiohttp_handler(request)` answers what aiohttp's server (`self.aiohttp`)
    reads on a connection handed to it.

    Every connection on the port, lean or handed to aiohttp, is bounded alike: the head of a
    request must arrive whole within `header_timeout` of its first byte (of the connection, for
    its first request), an idle keep-alive connection is closed after `keepalive_timeout`, and
    past `max_connections` a new connection closes the one idle for longest (since its last
    answer, or since its next request began; never one being answered) or, when every one is
    being answered, is closed itself. So neither slow heads nor
    idle connections can use up the process's file descriptors and lock callers out.
    """

    def __init__(self, aiohttp_handler: Handler, handler: Handler, fast: Callable[[Any], RawAnswer | None],
                 *, max_line_size: int, max_field_size: int, max_headers: int, header_timeout: float,
                 keepalive_timeout: float, max_connections: int) -> None:
        self.handler = handler
        self.fast = fast
        self.max_line_size = max_line_size
        self.max_field_size = max_field_size
        self.max_headers = max_headers
        self._aiohttp_handler = aiohttp_handler
        # aiohttp's access log would repeat the request lines.
        self._handler_options: dict[str, Any] = dict(
            auto_decompress=False, access_log=None, max_line_size=max_line_size, max_field_size=max_field_size,
            max_headers=max_headers)
        self.set_bounds(header_timeout, keepalive_timeout, max_connections)
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

    def __call__(self) -> "LeanConnection":
        return LeanConnection(self)

    def set_bounds(self, header_timeout: float, keepalive_timeout: float, max_connections: int) -> None:
        """At start and at a reload: what the sweep and the next connections go by."""
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self._handler_options["keepalive_timeout"] = keepalive_timeout  # aiohttp's own idle timer agrees
        self._sweep_every = min(header_timeout, keepalive_timeout) / 4

    # --- which connections are open, and which idle ---

    def opened(self, connection: "LeanConnection", now: float) -> bool:
        """A new connection: make room for it at the cap; False when none can be made."""
        if len(self.connections) + len(self.handed) >= self.max_connections:
            if not self.idle:
                self.closed["refused"] += 1
                return False
            oldest = next(iter(self.idle))
            self.forget(oldest)  # counted out now: its connection_lost comes a loop turn later
            oldest.close_connection()
            self.closed["shed"] += 1
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

    async def _aiohttp_request(self, request: web.BaseRequest) -> Any:
        protocol = request.protocol
        if isinstance(protocol, HandedOff):
            self.now_answering(protocol)
        answer = await self._aiohttp_handler(request)
        if (hdrs.UPGRADE in request.headers or request.method == "CONNECT") \
                and not isinstance(answer, web.WebSocketResponse):
            # aiohttp's parser drops what was sent after an upgrade it does not switch to (all but
            # WebSocket): a request there would wait for an answer forever. The connection ends instead.
            _close_after(answer)
        return answer

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


def _close_after(answer: Any) -> None:
    """Make an answer end its connection (`Connection: close`, then aiohttp closes it)."""
    if isinstance(answer, RawAnswer):
        answer.data = answer.data.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)  # after the status line
        answer.keep_alive = False
    elif isinstance(answer, web.StreamResponse):
        answer.force_close()


class HandedOff(RequestHandler):
    """aiohttp's protocol for a connection the lean front end handed over, with the same bounds.

    aiohttp closes idle connections itself (`keepalive_timeout`) but has no deadline for a
    request's head: this one tells its front end when it is answering and when bytes of a next
    request start arriving, and the front end's sweep closes it as it closes its own.
    """

    __slots__ = ("_front", "idle_since", "reading_since", "_early")

    def __init__(self, front: LeanFront, manager: web.Server, **options: Any) -> None:
        super().__init__(manager, **options)
        self._front = front
        self.idle_since: float | None = None
        self.reading_since: float | None = None
        self._early = False  # bytes of a next request came while one was being answered

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


class LeanConnection(asyncio.Protocol):
    """One downstream connection while its requests are plain (see the module's docstring)."""

    def __init__(self, front: LeanFront) -> None:
        self._front = front
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._held = bytearray()       # bytes since the end of the last answered request
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._plain = True             # every request read so far can be answered here (once not, aiohttp's)
        self._seen: set[bytes] = set()  # its singleton headers so far
        self._complete: tuple[str, tuple[tuple[bytes, bytes], ...]] | None = None
        self._ended = False            # a request ended in the bytes being parsed
        self._more = False             # and bytes of a next one came with them
        self._head_whole = False       # the request being parsed has all its head
        self.answering: asyncio.Task[None] | None = None
        self.idle_since: float | None = None  # loop time of the last answer (or of the connect); None while answering
        self.reading_since: float | None = None  # loop time the next request's head started (or the connect)
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # as aiohttp's server sets them
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
        if self._front.closing or not self._front.opened(self, asyncio.get_running_loop().time()):
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._front.forget(self)
        self._wake_drain(exc or ConnectionResetError("the caller closed the connection"))

    def data_received(self, data: bytes) -> None:
        if self.reading_since is None and self.answering is None:
            self._front.now_reading(self, asyncio.get_running_loop().time())
        self._held += data
        if self.answering is not None:
            # Sent before its predecessor was answered: looked at once that answer is out.
            if len(self._held) > _HELD_MAX and not self._reading_paused and self.transport is not None:
                self.transport.pause_reading()
                self._reading_paused = True
            return
        self._parse(data)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain(None)

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if self._ended:
            self._more = True
        self._url = b""
        self._headers = []
        self._seen = set()  # (_plain is never set back: a connection with a request not plain is aiohttp's)
        self._head_whole = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._front.max_line_size:
            self._plain = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # What aiohttp's parser checks on top of llhttp's: a request failing any of it goes to aiohttp,
        # which answers it as it always did.
        headers = self._headers
        if len(name) + len(value) > self._front.max_field_size or len(headers) >= self._front.max_headers \
                or b"\x00" in value:
            self._plain = False
        lower = name.lower()
        if lower in _NOT_PLAIN:
            self._plain = False
        elif lower in SINGLETONS:
            if lower in self._seen:
                self._plain = False
            self._seen.add(lower)
        headers.append((name, value.rstrip(b" \t")))  # llhttp strips the space before a value, not after

    def on_headers_complete(self) -> None:
        self._head_whole = True
        parser = self._parser
        if not (parser.get_method() == b"GET" and parser.get_http_version() == "1.1" and b"host" in self._seen
                and parser.should_keep_alive() and not parser.should_upgrade() and is_plain_target(self._url)):
            self._plain = False

    def on_message_complete(self) -> None:
        if self._plain and not self._ended:  # a plain target is ASCII
            self._complete = (self._url.decode("ascii"), tuple(self._headers))
        self._ended = True

    # --- parsing, answering, handing off ---

    def _parse(self, data: bytes) -> None:
        self._complete = None
        self._ended = self._more = False
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # aiohttp has the answer for each
            self._plain = False
        if not self._plain or self._more:
            self._hand_off()
        elif self._complete is not None:
            target, headers = self._complete
            self._complete = None
            self._answer(LeanRequest(target, headers, self))
        elif len(self._held) > _HELD_MAX:
            self._hand_off()  # a request this large is aiohttp's to refuse or to take

    def _hand_off(self) -> None:
        transport = self.transport
        self._front.forget(self)
        if transport is None or transport.is_closing():
            return
        if self._front.closing:
            transport.close()
            return
        data, self._held = bytes(self._held), bytearray()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._front.hand_off(transport, data, self, self._head_whole)

    def _answer(self, request: LeanRequest) -> None:
        self._held.clear()  # the parse ended where this request does
        front = self._front
        front.now_answering(self)
        front.lean_requests += 1
        try:
            raw = front.fast(request)
        except Exception:
            log.exception("unhandled error on the cache fast path", path=request.raw_path)
            raw = None
        if raw is not None:
            try:
                self.write(raw.data)
            except ConnectionError:
                return
            if self._writing_paused:
                self.answering = asyncio.get_running_loop().create_task(self._drained())
            else:
                self._done(True)
            return
        self.answering = asyncio.get_running_loop().create_task(self._full(request))

    async def _drained(self, keep_alive: bool = True) -> None:
        try:
            await self.drain()  # a caller that does not read holds this connection, not our memory
        except ConnectionError:
            return
        self._done(keep_alive)

    async def _full(self, request: LeanRequest) -> None:
        try:
            answer = await self._front.handler(request)
        except Exception:
            log.exception("unhandled error while proxying", path=request.raw_path)
            answer = error_response(500, "internal_error", new_request_id())
        if self.transport is None:
            return  # the caller left; the chain's work (a cached copy, the breaker's count) still counted
        if isinstance(answer, RawAnswer):
            data: bytes | None = answer.data
        elif isinstance(answer, LeanStream):
            self._done(answer.keep_alive)  # already written by whoever streamed it
            return
        elif isinstance(answer, web.Response):
            data = render_response(answer)
        else:
            data = None
        keep_alive = True
        if data is None:
            log.error("an answer the lean front end cannot write; connection closed",
                      kind="front", answer=type(answer).__name__, status=getattr(answer, "status", None))
            data = render_response(error_response(500, "internal_error", new_request_id()))
            keep_alive = False
        try:
            self.write(data or b"")
        except ConnectionError:
            return
        await self._drained(keep_alive)

    def _done(self, keep_alive: bool) -> None:
        """The answer is out: wait for the next request, or read the one that came early."""
        self.answering = None
        transport = self.transport
        if transport is None:
            return
        if not keep_alive or self._front.closing:
            transport.close()
            return
        now = asyncio.get_running_loop().time()
        self._front.now_idle(self, now)
        if self._held:
            self.reading_since = now  # sent early: its head's time starts with its turn
            if self._reading_paused:
                self._reading_paused = False
                transport.resume_reading()
            self._parse(bytes(self._held))

    # --- writing ---

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the caller closed the connection")
        transport.write(data)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("the caller closed the connection")
        if not self._writing_paused:
            return
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
        await waiter

    def _wake_drain(self, exc: BaseException | None) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                # Whatever ended the connection (a reset, a keep-alive probe's ETIMEDOUT), to a writer
                # it is the caller gone.
                lost = ConnectionResetError("the caller's connection was lost")
                lost.__cause__ = exc
                waiter.set_exception(lost)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    close_connection = close  # what the front end calls on any of its connections

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
