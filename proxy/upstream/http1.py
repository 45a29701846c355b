"""A lean HTTP/1.1 client for the calls to upstreams: pooled keep-alive connections, no more.

aiohttp's ClientSession cost as much per request as all the rest of a minimal proxy:
request and response objects with tracing hooks, cookie, redirect, proxy and
decompression machinery that the transport turns off anyway. This client does what an
attempt needs: one connection pool per origin (a limit, LIFO reuse, idle connections
closed after `keepalive` seconds), the request written in one call, the answer parsed by
httptools (llhttp, the parser of Node.js) and handed back once its headers are in, the
body buffered or read in chunks with back-pressure. Timeouts are the caller's
(`asyncio.timeout`); only the connect step has its own.

An answer's head is collected here until its blank line, bounded as it arrives, and only
then handed to llhttp, whole and in canonical form: bare LF line ends become CRLF and an
obs-fold becomes one space (RFC 9112 §2.2, §5.2), so llhttp stays strict about everything
else. What could be read two ways is refused as a `BadAnswer`: whitespace before the colon
or before the first header, a folded Content-Length, Transfer-Encoding or Connection, a
bare CR, control characters, an interim (1xx) answer announcing a body. A connection whose
answer was framed inconsistently (a 204 or 304 announcing a body) is never reused: the
bytes it announced may still come.

A request on a *reused* connection that closes before any byte of the answer arrives is
sent once more on a new connection when the method is idempotent and the body is in
memory: the upstream closed an idle connection as we picked it up (the race every
keep-alive client meets), and that is not a failure of the upstream.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools
from yarl import URL

_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_LENGTH_EXPECTED = frozenset({"POST", "PUT", "PATCH"})
MAX_HEAD_BYTES = 64 * 1024    # status line and headers of one answer (and the most chunk framing or trailers
                              # that may arrive between two pieces of a body)
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})  # never unfolded
_PAUSE_ABOVE = 256 * 1024     # body bytes waiting for the reader before the socket is paused


class ConnectFailed(Exception):
    """No connection could be made (refused, unreachable, DNS, TLS handshake)."""


class ConnectTimeout(ConnectFailed):
    """The connection was not made within the connect timeout."""


class ConnectRefused(ConnectFailed):
    """The upstream's host answered that nothing listens on the port."""


class Disconnected(Exception):
    """The upstream closed the connection before its answer was complete."""


class BadAnswer(Exception):
    """What the upstream sent is not a valid HTTP/1.1 answer."""


class Response:
    """An upstream's answer: status and headers at once, the body as it arrives."""

    __slots__ = ("status", "reason", "headers", "content_length", "_chunks", "_buffered", "_done", "_error",
                 "_waiter", "_connection")

    def __init__(self, connection: "_Connection") -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._connection: _Connection | None = connection

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read(self) -> bytes:
        """The next piece of the body; b"" once it is complete. Raises Disconnected or BadAnswer."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        connection = self._connection
        if connection is not None and connection.reading_paused and self._buffered <= _PAUSE_ABOVE // 2:
            connection.resume_reading()
        return chunk

    async def read_all(self, limit: int) -> tuple[bytes, bool]:
        """The body up to `limit` bytes, and whether that was all of it (else the rest is to `read`)."""
        if self._done and self._error is None and self._buffered <= limit:
            body = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
            self._chunks.clear()
            self._buffered = 0
            return body, True
        parts = []
        size = 0
        while True:
            chunk = await self.read()
            if not chunk:
                return b"".join(parts), True
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(parts), False

    def release(self) -> None:
        """Done with this answer: its connection goes back to the pool, or is closed if the body was not all read."""
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.finished(self, clean=self._done and self._error is None)

    # --- fed by the connection ---

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._done:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, pool: "Pool") -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser = self._strict_parser()
        self.closed = False
        self.idle_since = 0.0
        self.reading_paused = False
        self._response: Response | None = None
        self._head: asyncio.Future[Response] | None = None
        self._pending = bytearray() # the start of a head whose end has not arrived yet
        self._early: httptools.HttpResponseParser | None = None  # fed `_pending` as it grows: garbage fails at once
        self._awaiting_head = False # the final answer's head is not complete yet
        self._in_head = False       # the parser is between a status line and the end of its headers
        self._received = False      # any byte of the current answer arrived
        self._head_only = False     # a HEAD request: the answer ends with its headers
        self._until_close = False   # the body ends when the connection does
        self._informational = False
        self._reusable = False
        self._doubtful = False      # the answer's framing contradicts itself: never reuse the connection
        self._chunks_due = False    # Transfer-Encoding ends in chunked: llhttp must read chunks, not raw bytes
        self._moved = False         # the body moved (or ended) during the last feed
        self._still_bytes = 0       # bytes parsed since the body last moved: chunk framing, trailers
        self._body_cut = False      # the request body was not sent to its end: the framing is broken
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self.counted_out = False    # the pool no longer counts it against its limit

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._response is None:
            self._abort()  # bytes nobody asked for: this connection cannot be trusted with another request
            return
        self._received = True
        try:
            if self._awaiting_head:
                data = self._take_heads(data)
                if not data or self._response is None:
                    return
            self._parser.feed_data(data)
            if self._moved:
                self._moved = False
                self._still_bytes = 0
            elif self._response is not None:
                self._still_bytes += len(data)
                if self._still_bytes > MAX_HEAD_BYTES:  # an endless trailer or chunk line: bounded like a head
                    raise BadAnswer(f"more than {MAX_HEAD_BYTES} bytes of chunk framing or trailers in a row")
        except BadAnswer as exc:
            self._error(exc)
        except httptools.HttpParserUpgrade:
            self._error(BadAnswer("an upgrade nobody asked for"))
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._error(cause if isinstance(cause, BadAnswer) else BadAnswer(f"{type(cause).__name__}: {cause}"))
        except httptools.HttpParserError as exc:
            self._error(BadAnswer(str(exc) or type(exc).__name__))

    def _strict_parser(self) -> httptools.HttpResponseParser:
        parser = httptools.HttpResponseParser(self)
        parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)  # "5 \r\n": unambiguous
        return parser

    def _take_heads(self, data: bytes) -> bytes | memoryview:
        """Hand the parser whole heads only (1xx ones, then the final one); the bytes after the final head.

        The usual read holds a whole head in canonical form and is parsed as it came; any other
        (a head cut between reads, bare LFs, obs-folds, an error) is parsed again from its start
        by `_collect_heads`, which has the last word.
        """
        if not self._pending and len(data) <= MAX_HEAD_BYTES:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError:
                if not self._awaiting_head:
                    raise  # the head was read; what follows it is at fault
            else:
                if not self._awaiting_head or self._response is None:
                    return b""
            self._parser = self._strict_parser()  # forget the partial head, and any state it left
            self._in_head = self._informational = False
            if self._response is not None:
                self._response.headers.clear()
        return self._collect_heads(data)

    def _collect_heads(self, data: bytes) -> bytes | memoryview:
        """`_take_heads` for a head in pieces or not in canonical form.

        A head is bounded as it arrives: once more than MAX_HEAD_BYTES came without its blank
        line, the answer is refused. Each read is searched once (plus two bytes of overlap), and
        an unfinished head is also fed, read by read, to a lenient parser that fails on garbage.
        """
        pending = self._pending
        start = 0
        read = data
        if pending:
            start = len(pending) - 2
            pending += data
            data = pending  # type: ignore[assignment]
        while True:
            end = _head_end(data, start)
            if end < 0 or end > MAX_HEAD_BYTES:
                if end > MAX_HEAD_BYTES or len(data) > MAX_HEAD_BYTES:
                    self._pending = bytearray()
                    raise BadAnswer(f"status line and headers larger than {MAX_HEAD_BYTES} bytes")
                if data is not pending:  # a head starts in this read
                    self._pending = bytearray(data)
                    self._early = _lenient_parser()
                    read = data
                self._early.feed_data(read)
                return b""
            self._pending = bytearray()
            self._early = None
            self._parser.feed_data(_canonical(bytes(data[:end])))
            if not self._awaiting_head or self._response is None:
                return memoryview(data)[end:]  # the body's first bytes, not copied
            data = data[end:]  # after an interim answer (100, 103): the next head
            start = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        response = self._response
        if response is not None:
            # The body was delimited by the close. A reset is no such end, unless we stopped sending an
            # upload the upstream had refused: its kernel resets a socket closed with our bytes unread.
            if self._until_close and (exc is None or self._body_cut) and self._head is not None \
                    and self._head.done():
                response._finish()
            elif not self._received:
                self._error(Disconnected("Server disconnected"), before_answer=True)
            else:
                self._error(Disconnected("Server disconnected before the answer was complete"))
        self._wake_drain()  # `send` stops writing; the answer (or its absence) says what happened
        self._pool.lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if self._response is None:
            raise BadAnswer("bytes after the end of the answer")
        self._response.reason = ""  # a final status line without a reason must not keep a 100's
        self._in_head = True

    def on_status(self, reason: bytes) -> None:
        assert self._response is not None
        self._response.reason = reason.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer after a chunked body: too late to pass on as a header, and rarely meant for us
        assert self._response is not None
        # llhttp drops the whitespace before a value, not after it (RFC 9110 §5.5: neither is part of it)
        self._response.headers.append((name.decode("utf-8", "surrogateescape"),
                                       value.rstrip(b" \t").decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        self._in_head = False
        status = self._parser.get_status_code()
        if status < 100:  # no such status (RFC 9110 §15); parsers disagree on whether a body follows it
            raise BadAnswer(f"status {status:03d}")
        if status == 101:
            raise BadAnswer("an upgrade nobody asked for")
        length = _content_length(response.header("Content-Length"))
        codings = _codings(response.headers)
        announces_body = bool(codings or length)
        if status < 200:
            if announces_body:  # llhttp reads a body after a 1xx other than 100-103: we would take it for a head
                raise BadAnswer(f"an interim answer ({status}) announcing a body")
            self._informational = True  # 100 Continue, 103 Early Hints: the real answer follows
            response.headers.clear()
            return
        bodiless = status in (204, 304)
        if bodiless and announces_body:
            self._doubtful = True  # the body it announces may still come, and would be read as the next answer
        self._awaiting_head = False
        response.status = status
        response.content_length = length
        # RFC 9112 §6.3: without chunked as the final coding, an answer's body ends with the connection.
        self._chunks_due = not bodiless and bool(codings) and codings[-1] == "chunked"
        self._until_close = not bodiless and length is None and not self._chunks_due
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)
        self._wake_drain()  # answered while the request body is still going out: `send` stops there
        if self._head_only:
            # llhttp cannot be told the request was HEAD: end the answer here and never reuse the connection.
            self._reusable = False
            response._finish()
            self._response = None
            self._abort()

    # llhttp's reading of Transfer-Encoding is not exposed: where it disagrees with ours, the answer is refused.

    def on_chunk_header(self) -> None:
        if self._until_close:
            raise BadAnswer("chunks where Transfer-Encoding does not end in chunked")
        self._chunks_due = False
        self._moved = True

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None:
            return
        if self._chunks_due:  # e.g. "chunked\t": llhttp reads until the close, the RFC says chunks
            raise BadAnswer(f"Transfer-Encoding {response.header('Transfer-Encoding')!r} not read as chunked")
        self._moved = True
        response._feed(body)
        if response._buffered > _PAUSE_ABOVE and not self.reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        response = self._response
        if response is None:
            return
        self._reusable = self._parser.should_keep_alive() and not self._until_close and not self._doubtful
        self._response = None
        response._finish()

    # --- used by the pool and the response ---

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    async def send(self, head: bytes, body: bytes | AsyncIterator[bytes] | None, head_only: bool) -> Response:
        transport = self.transport
        if transport is None or self.closed:
            raise Disconnected("Server disconnected")
        response = Response(self)
        self._response = response
        self._received = False
        self._head_only = head_only
        self._awaiting_head = True
        self._until_close = self._informational = self._reusable = self._body_cut = self._doubtful = False
        self._chunks_due = False
        self._still_bytes = 0
        self._head = asyncio.get_running_loop().create_future()
        if body is None or isinstance(body, bytes):
            transport.write(head + body if body else head)
        else:
            transport.write(head)
            await self._stream(transport, body)
        return await self._head

    async def _stream(self, transport: asyncio.Transport, body: AsyncIterator[bytes]) -> None:
        """Send `body` chunked until it ends, or until the answer (or the close) makes the rest unwanted."""
        head = self._head
        assert head is not None
        chunks = body.__aiter__()
        while True:
            # The next chunk comes from our caller, who may be slow: an answer must not wait for it.
            following = asyncio.ensure_future(chunks.__anext__())
            try:
                await asyncio.wait((following, head), return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                _abandon_chunk(following)
                raise
            if not following.done():
                _abandon_chunk(following)
                self._body_cut = True  # answered (or gone) before the whole body was sent
                return
            try:
                chunk = following.result()
            except StopAsyncIteration:
                if not self.closed:
                    transport.write(b"0\r\n\r\n")
                return
            if chunk:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if self._write_paused:  # woken by the socket draining, by an answer or by the close
                    self._drain = asyncio.get_running_loop().create_future()
                    try:
                        await self._drain
                    finally:
                        self._drain = None
            if head.done():
                self._body_cut = True
                return

    def finished(self, response: Response, clean: bool) -> None:
        """The caller is done with `response`: keep the connection if the exchange ended cleanly."""
        if self._response is response:
            self._response = None
            clean = False  # released before the answer was complete
        reusable = clean and self._reusable and not self._body_cut and not self.closed
        if reusable:
            self.resume_reading()  # paused under a large body that ended while the reader lagged
        self._pool.put_back(self, reusable)

    def discard(self) -> None:
        """The exchange broke off (an error or a timeout in the caller): never reuse this connection."""
        self._response = None
        self._reusable = False
        self._pool.put_back(self, False)

    def _error(self, error: BaseException, before_answer: bool = False) -> None:
        response = self._response
        self._reusable = False
        head = self._head
        if head is not None and not head.done():
            if before_answer:
                error = _NothingReceived(str(error))
            head.set_exception(error)
        elif response is not None:
            response._fail(error)
        self._response = None
        self._abort()

    def _wake_drain(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _EarlyEnd:
    """What a lenient parser reading an unfinished head calls: it saw an end where there is no blank line."""

    @staticmethod
    def on_headers_complete() -> None:
        raise BadAnswer("a head that lenient parsers end early (whitespace or a bare CR before the blank line)")


def _lenient_parser() -> httptools.HttpResponseParser:
    """A parser as lenient as aiohttp's for unfinished heads: what it refuses no later byte can mend."""
    parser = httptools.HttpResponseParser(_EarlyEnd())
    parser.set_dangerous_leniencies(lenient_headers=True, lenient_optional_cr_before_lf=True)
    return parser


def _head_end(data: bytes | bytearray, start: int) -> int:
    """Where the head in `data` ends (just past its blank line, CRLF or bare LF), or -1; searched from `start`."""
    crlf = data.find(b"\n\r\n", max(start, 0))
    lf = data.find(b"\n\n", max(start, 0), crlf + 2 if crlf >= 0 else len(data))
    if lf >= 0:
        return lf + 2
    return crlf + 3 if crlf >= 0 else -1


def _canonical(head: bytes) -> bytes:
    """`head` as llhttp's strict parser wants it: bare LF line ends made CRLF, obs-folds unfolded."""
    lines = head.count(b"\n")
    folded = b"\n " in head or b"\n\t" in head
    if not folded and head.count(b"\r\n") == lines:
        return head
    if head.count(b"\r\n") != lines:  # RFC 9112 §2.2: a recipient MAY take a bare LF for a line end
        head = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # a bare CR stays, for llhttp to refuse
    return _unfolded(head) if folded else head


def _unfolded(head: bytes) -> bytes:
    """Each obs-fold (whitespace, CRLF, whitespace) replaced by one space, as RFC 9112 §5.2 lets a proxy do.

    Refused: whitespace before the first header (a header to some parsers, ignored by others)
    and a fold inside Content-Length, Transfer-Encoding or Connection (framing and persistence
    must read one way only).
    """
    lines: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] not in (b" ", b"\t"):
            if line or lines:  # blank lines before the status line are llhttp's to skip
                lines.append(line)
            continue
        if len(lines) < 2:
            raise BadAnswer("whitespace before the first header line")
        name = lines[-1].split(b":", 1)[0].lower()
        if name in _FRAMING:
            raise BadAnswer(f"{name.decode()} folded over two lines")
        rest = line.strip(b" \t")
        lines[-1] = lines[-1].rstrip(b" \t") + (b" " + rest if rest else b"")
    return b"\r\n".join(lines)


def _content_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadAnswer(f"invalid Content-Length {value[:40]!r}") from None


def _codings(headers: list[tuple[str, str]]) -> list[str]:
    """The transfer codings of every Transfer-Encoding header, in order, lower case."""
    return [coding.strip().lower() for name, value in headers if name.lower() == "transfer-encoding"
            for coding in value.split(",")]


def _abandon_chunk(following: asyncio.Future[bytes]) -> None:
    """Stop waiting for the caller's next chunk; whatever its end, nobody is waiting for it."""
    following.cancel()
    following.add_done_callback(lambda done: done.cancelled() or done.exception())


class _NothingReceived(Disconnected):
    """Closed before any byte of the answer: on a reused connection, the request may be sent again."""


class Pool:
    """Keep-alive connections to one origin, at most `limit` at a time."""

    def __init__(self, url: URL, *, limit: int = 256, keepalive: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if url.scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {url.scheme!r}")
        self.origin = (url.scheme, url.host, url.port)
        self._host = url.raw_host or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if url.scheme == "https" else None
        self.host_header = url.host_port_subcomponent or self._host
        self.authorization = None
        if url.user is not None:  # credentials in the URL, as a browser or aiohttp would send them
            token = base64.b64encode(f"{url.user}:{url.password or ''}".encode()).decode()
            self.authorization = f"Basic {token}"
        self._limit = limit
        self._keepalive = keepalive
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False

    def usage(self) -> dict[str, int]:
        """Connections open, idle and busy (an answer being read), callers waiting for one, and the limit."""
        idle = len(self._idle)
        return {"open": self._open, "idle": idle, "busy": self._open - idle, "waiting": len(self._waiters),
                "limit": self._limit}

    async def request(self, method: str, target: str, headers: Any,
                      body: bytes | AsyncIterator[bytes] | None, connect_timeout: float) -> Response:
        """Send one request; returns once the answer's status and headers are in."""
        head = self._head(method, target, headers, body)
        head_only = method == "HEAD"
        connection, reused = await self._acquire(connect_timeout)
        try:
            return await connection.send(head, body, head_only)
        except _NothingReceived:
            if not (reused and method in _REPLAYABLE and not isinstance(body, AsyncIterator)):
                raise Disconnected("Server disconnected") from None
        except BaseException:
            connection.discard()
            raise
        connection, _ = await self._acquire(connect_timeout, fresh=True)
        try:
            return await connection.send(head, body, head_only)
        except _NothingReceived:
            raise Disconnected("Server disconnected") from None
        except BaseException:
            connection.discard()
            raise

    def _head(self, method: str, target: str, headers: Any, body: Any) -> bytes:
        """The request line and headers; `headers` is a multidict (every value of every name is sent)."""
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        if self.authorization is not None and "Authorization" not in headers:
            lines.append(f"Authorization: {self.authorization}\r\n")
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise ValueError(f"header {name!r} holds a line break or a colon: refused (request splitting)")
            lines.append(f"{name}: {value}\r\n")
        if isinstance(body, bytes) or body is None:
            if body or method in _LENGTH_EXPECTED:
                lines.append(f"Content-Length: {len(body or b'')}\r\n")
        else:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    async def _acquire(self, connect_timeout: float, fresh: bool = False) -> tuple[_Connection, bool]:
        if self.closed:
            raise ConnectFailed("the upstream's connection pool is closed (route table reloaded)")
        loop = asyncio.get_running_loop()
        while True:
            if not fresh:
                now = loop.time()
                while self._idle:
                    connection = self._idle.pop()
                    if not connection.closed and now - connection.idle_since < self._keepalive:
                        return connection, True
                    self._close(connection)
            elif self._open >= self._limit and self._idle:
                # A new connection is wanted (the re-send): the oldest idle one makes room for it.
                self._retire(self._idle.pop(0), wake=False)
            if self._open < self._limit:
                break
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the slot we were given on
                raise
        self._open += 1
        made: list[_Connection] = []

        def protocol() -> _Connection:
            made.append(_Connection(self))
            return made[0]

        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(protocol, self._host, self._port, ssl=self._ssl,
                                             server_hostname=(self._host.strip("[]") if self._ssl else None))
        except TimeoutError:
            self._abandon(made)
            raise ConnectTimeout("connect timeout") from None
        except OSError as exc:
            self._abandon(made)
            failure = ConnectRefused if isinstance(exc, ConnectionRefusedError) else ConnectFailed
            raise failure(f"Cannot connect to host {self.host_header} [{exc.strerror or exc}]") from None
        except BaseException:
            self._abandon(made)
            raise
        return made[0], False

    def _abandon(self, made: list[_Connection]) -> None:
        """A connect that did not finish gives its slot back, once: its connection may already be lost."""
        if made:
            self._retire(made[0])
        else:
            self._slot_freed()

    def put_back(self, connection: _Connection, reusable: bool) -> None:
        if reusable and not self.closed:
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
            self._wake_one()
        else:
            self._close(connection)

    def lost(self, connection: _Connection) -> None:
        """A connection closed (by either side): it no longer counts against the limit."""
        self._count_out(connection)

    def _close(self, connection: _Connection) -> None:
        connection._abort() if connection.transport is not None else self.lost(connection)

    def _retire(self, connection: _Connection, wake: bool = True) -> None:
        """Close `connection` and give its slot back now rather than when asyncio reports it lost."""
        connection._abort()
        self._count_out(connection, wake)

    def _count_out(self, connection: _Connection, wake: bool = True) -> None:
        """Take `connection` off the pool's books, once, whichever of `lost` and `_retire` comes first."""
        if connection in self._idle:
            self._idle.remove(connection)
        if not connection.counted_out:
            connection.counted_out = True
            self._open -= 1
            if wake:
                self._wake_one()

    def _slot_freed(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close idle connections now; connections in use close when their answer is released."""
        self.closed = True
        for connection in list(self._idle):
            self._close(connection)
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the upstream's connection pool is closed"))
        self._waiters.clear()
