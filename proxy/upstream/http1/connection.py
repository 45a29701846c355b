"""One keep-alive connection to an upstream: writes a request, parses its answer with llhttp (httptools).

The head is collected until its blank line and checked (`answer.py`) before the strict
parser sees it; the body is fed to the `Response` with back-pressure on the socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httptools

from proxy.upstream.http1.answer import (
    _PAUSE_ABOVE,
    MAX_HEAD_BYTES,
    BadAnswer,
    Disconnected,
    Response,
    _canonical,
    _codings,
    _content_length,
    _head_end,
    _lenient_parser,
    _NothingReceived,
)

if TYPE_CHECKING:
    from proxy.upstream.http1.pool import Pool


# What a lost connection keeps in place of its parser: one that calls nobody back (never fed).
_DETACHED = httptools.HttpResponseParser(object())


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
        # The parser calls this connection back, so the two hold each other; nothing is read any more.
        self._parser = _DETACHED

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


def _abandon_chunk(following: asyncio.Future[bytes]) -> None:
    """Stop waiting for the caller's next chunk; whatever its end, nobody is waiting for it."""
    following.cancel()
    following.add_done_callback(lambda done: done.cancelled() or done.exception())
