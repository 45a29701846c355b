"""A plain GET as the lean front end reads it, and how handlers answer on a lean connection.

`LeanRequest` has the part of aiohttp's request the handlers read; `LeanResponder` is the
`Responder` (proxy/downstream/responder.py) a handler answers it through, writing bytes
straight to the connection, framed as aiohttp frames them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from proxy.downstream.ids import new_request_id
from proxy.downstream.wire import (
    RawAnswer,
    date_header,
    error_response,
    render_bodiless,
    render_head,
    render_response,
)

if TYPE_CHECKING:
    from proxy.downstream.connection import LeanConnection

log = structlog.get_logger("resilience-proxy")

# aiohttp's parser spells the header names it knows (aiohttp.hdrs) its own way, whatever the caller
# sent; so do we, so that an upstream sees the same names from either front end.
_CANONICAL = {str(name).lower().encode(): str(name) for name in vars(hdrs).values() if isinstance(name, istr)}


class LeanRequest:
    """The part of `web.BaseRequest` the proxy's handlers read, for a plain GET.

    `HitStage`, `ProxyHandler` and `request_id_of` use exactly these; a request that would
    need more (a body, the proxy's own endpoints) never becomes a LeanRequest.
    """

    __slots__ = ("raw_path", "path", "raw_headers", "transport", "_headers", "_url")

    method = "GET"
    version = HttpVersion11
    keep_alive = True
    content_length = None
    body_exists = False

    def __init__(self, target: str, raw_headers: tuple[tuple[bytes, bytes], ...], connection: Any) -> None:
        self.raw_path = target
        self.path = target.split("?", 1)[0]  # no percent-encoding here: decoded is as received
        self.raw_headers = raw_headers
        self.transport = connection.transport
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
    def remote(self) -> str | None:
        """The caller's address, as aiohttp's `request.remote` gives it."""
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, (tuple, list)) and peer else None

    @property
    def rel_url(self) -> URL:
        if self._url is None:
            path, _, query = self.raw_path.partition("?")
            self._url = URL.build(path=path, query_string=query, encoded=True)  # as aiohttp's parser builds it
        return self._url


class LeanStream:
    """A streamed answer on a lean connection (`Stream`), framed as aiohttp frames it:
    Content-Length when known, else chunked."""

    __slots__ = ("_connection", "_status", "_reason", "_headers", "content_length", "_chunked", "_bodiless")

    def __init__(self, connection: "LeanConnection", status: int, reason: str | None,
                 headers: CIMultiDict[str]) -> None:
        self._connection = connection
        self._status = status
        self._reason = reason
        self._headers = headers
        self.content_length: int | None = None
        self._chunked = False
        self._bodiless = status < 200 or status in (204, 304)

    async def prepare(self) -> None:
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


class LeanResponder:
    """The `Responder` of a lean connection: whole answers are written at once, streams as they come.

    `keep_alive` turns False when the connection is to end after this answer; `lost` when the
    caller left before it could be written.
    """

    __slots__ = ("_connection", "_started", "keep_alive", "lost")

    def __init__(self, connection: "LeanConnection") -> None:
        self._connection = connection
        self._started = False
        self.keep_alive = True
        self.lost = False

    @property
    def started(self) -> bool:
        return self._started

    def send(self, answer: RawAnswer) -> None:
        self._write(answer.data)

    def send_response(self, response: web.Response) -> None:
        data = render_response(response)
        if data is None:
            log.error("an answer the lean front end cannot write; connection closed",
                      kind="front", answer=type(response).__name__, status=response.status)
            data = render_response(error_response(500, "internal_error", new_request_id())) or b""
            self.keep_alive = False
        self._write(data)

    def upgraded(self, response: web.StreamResponse) -> None:
        raise RuntimeError("a lean connection is never upgraded: the proxy's own endpoints are aiohttp's")

    async def stream(self, status: int, reason: str | None, headers: CIMultiDict[str],
                     content_length: int | None) -> LeanStream:
        self._started = True
        stream = LeanStream(self._connection, status, reason, headers)
        stream.content_length = content_length
        await stream.prepare()
        return stream

    def abort(self) -> None:
        self.keep_alive = False
        self._connection.abort()

    def _write(self, data: bytes) -> None:
        self._started = True
        try:
            self._connection.write(data)
        except ConnectionError:
            self.lost = True
