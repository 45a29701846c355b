"""One downstream connection of the lean front end, parsed with httptools (see `proxy.downstream.front`).

A `LeanConnection` reads plain GETs itself and answers them through its front end: the HIT
stage first, else the way in (`Downstream.answer`) with a `LeanResponder`. The first request
that is not plain hands the connection to aiohttp, from the first byte not yet answered.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import httptools
import structlog

from proxy.downstream.handler import own_endpoint
from proxy.downstream.ids import new_request_id
from proxy.downstream.lean import LeanRequest, LeanResponder
from proxy.downstream.wire import error_response

if TYPE_CHECKING:
    from proxy.downstream.front import LeanFront

log = structlog.get_logger("resilience-proxy")

_NOT_PLAIN = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade",
                        b"sec-websocket-key1"})  # aiohttp refuses the old WebSocket handshake: let it
# Headers aiohttp's parser refuses to see twice (aiohttp/http_parser.py SINGLETON_HEADERS; a test
# checks this covers them): a request repeating one is aiohttp's to refuse.
SINGLETONS = frozenset({b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
                        b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent"})
_HELD_MAX = 64 * 1024   # bytes of a request not yet whole (or sent early) before aiohttp takes over


def is_plain_target(url: bytes) -> bool:
    """A target `LeanRequest` can stand for: an origin-form path whose decoded form is itself."""
    path = url.split(b"?", 1)[0]
    if not path.startswith(b"/") or not url.isascii():
        return False
    if b"%" in path or b"/." in path or b"//" in path or b"#" in url:
        return False
    return not own_endpoint(path.decode("ascii"))  # those handlers need aiohttp's request objects


class LeanConnection(asyncio.Protocol):
    """One downstream connection while its requests are plain (see the module's docstring)."""

    def __init__(self, front: "LeanFront") -> None:
        self._front = front
        # The parser calls this connection's methods back, so the two hold each other: dropped when the
        # connection ends or is handed off, or both would wait for the garbage collector.
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
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
        self._parser = None
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
        assert parser is not None  # called back from its own feed_data
        if not (parser.get_method() == b"GET" and parser.get_http_version() == "1.1" and b"host" in self._seen
                and parser.should_keep_alive() and not parser.should_upgrade() and is_plain_target(self._url)):
            self._plain = False

    def on_message_complete(self) -> None:
        if self._plain and not self._ended:  # a plain target is ASCII
            self._complete = (self._url.decode("ascii"), tuple(self._headers))
        self._ended = True

    # --- parsing, answering, handing off ---

    def _parse(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            return  # the connection is gone or handed off
        self._complete = None
        self._ended = self._more = False
        try:
            parser.feed_data(data)
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
        self._parser = None  # from here on aiohttp's parser reads this connection
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
        raw = front.hit(request)
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
        responder = LeanResponder(self)
        try:
            await self._front.answer(request, responder)
        except Exception:
            log.exception("unhandled error while proxying", path=request.raw_path)
            if not responder.started:
                responder.send_response(error_response(500, "internal_error", new_request_id()))
        if not responder.started:
            log.error("no answer was given; connection closed", kind="front", path=request.raw_path)
            responder.send_response(error_response(500, "internal_error", new_request_id()))
            responder.keep_alive = False
        if self.transport is None or responder.lost:
            return  # the caller left; the chain's work (a cached copy, the breaker's count) still counted
        await self._drained(responder.keep_alive)

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
