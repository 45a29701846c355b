"""An upstream's answer as the HTTP/1.1 client hands it back, and the rules that check its head.

`Response` is fed by its connection and read by the transport; the functions below put a
head in the one canonical form llhttp's strict parser accepts, or refuse it as a `BadAnswer`.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import TYPE_CHECKING, Awaitable, Callable

import httptools

if TYPE_CHECKING:
    from proxy.upstream.http1.connection import _Connection

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


class HostUnknown(ConnectFailed):
    """The resolver answered that the upstream's host name does not exist (not a transient DNS failure)."""


# getaddrinfo's "no such host" answers; EAI_AGAIN (the resolver did not answer) is transient, so not here.
NO_SUCH_HOST = frozenset(code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
                         if code is not None)


def connect_failure(exc: OSError) -> type[ConnectFailed]:
    """Which kind of connect failure an OSError from connecting is (both clients classify alike)."""
    if isinstance(exc, socket.gaierror) and exc.errno in NO_SUCH_HOST:
        return HostUnknown
    return ConnectRefused if isinstance(exc, ConnectionRefusedError) else ConnectFailed


class Disconnected(Exception):
    """The upstream closed the connection before its answer was complete."""


class BadAnswer(Exception):
    """What the upstream sent is not a valid HTTP/1.1 answer."""


async def read_up_to(read: Callable[[], Awaitable[bytes]], limit: int) -> tuple[bytes, bool]:
    """Chunks from `read` until the end or past `limit` bytes: the bytes, and whether that was all of them
    (else the rest is still to `read`). Both clients' answers buffer a body this way."""
    parts = []
    size = 0
    while True:
        chunk = await read()
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts), False


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
        return await read_up_to(self.read, limit)

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


class _NothingReceived(Disconnected):
    """Closed before any byte of the answer: on a reused connection, the request may be sent again."""
