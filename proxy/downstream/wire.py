"""Answers as bytes on the wire: what aiohttp would send, rendered by us for the answers we write whole.

`render_head` and `render_bodiless` write the status line and headers `web.Response` would
send; a `RawAnswer` carries a whole rendered answer to either front end. `json_response` and
`error_response` build the proxy's own answers (errors, `/health`).
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http import HttpVersion11

from proxy.downstream.server_name import SERVER_NAME

# A stored or upstream answer carrying one of these is written by aiohttp, which knows what to do with it.
_NOT_RENDERED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_DRAIN_ABOVE = 256 * 1024  # bytes waiting in the socket's buffer before a whole answer waits for the caller


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer of the proxy's own."""
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def error_response(status: int, error: str, request_id: str, detail: str | None = None,
                   cache: str = "MISS", extra: dict[str, Any] | None = None) -> web.Response:
    """The proxy's error body (`{"error", "detail", "request_id"}`) with its X-Cache and X-Request-ID."""
    body: dict[str, Any] = {"error": error}
    if detail:
        body["detail"] = detail
    if extra:
        body.update(extra)
    body["request_id"] = request_id
    return json_response(status, body, {"X-Cache": cache, "X-Request-ID": request_id})


class RawAnswer:
    """A whole HTTP/1.1 answer already rendered to bytes, written to the socket in one call.

    aiohttp's server only calls `prepare` and `write_eof` on what a handler returns and reads
    its `keep_alive`; this gives it exactly that, without the per-answer header objects and
    serialisation of `web.Response`. Only for answers `render_head` could render exactly (fast
    HITs and buffered answers to keep-alive HTTP/1.1 requests); everything else is a web.Response.
    """

    __slots__ = ("data", "status", "keep_alive")

    def __init__(self, data: bytes, status: int) -> None:
        self.data = data
        self.status = status
        self.keep_alive = True

    async def prepare(self, request: web.BaseRequest) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the caller closed the connection")
        transport.write(self.data)
        if transport.get_write_buffer_size() > _DRAIN_ABOVE:
            await request.writer.drain()  # a caller that does not read holds this connection, not our memory

    async def write_eof(self, data: bytes = b"") -> None:
        return None

    def close_after(self) -> None:
        """Make it end its connection (`Connection: close`, then aiohttp closes it)."""
        self.data = self.data.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)  # after the status line
        self.keep_alive = False


def render_head(status: int, reason: str | None, headers: list[tuple[str, str]], own: list[tuple[str, str]],
                drop: frozenset[str] | set[str], body_length: int | None) -> tuple[bytes, bool] | None:
    """The status line and headers `web.Response` would send for this answer, each line ending
    in CRLF, and whether `headers` carry their own Date (else one is to be added).

    `headers` minus the names in `drop` (lower case) and any Server, then `own`; Content-Type and
    Content-Length are filled in as aiohttp does, Server is always ours (`SERVER_NAME`, as
    nginx replaces an upstream's); a `body_length` of None means a body of
    unknown length, sent chunked (as `web.StreamResponse` sends it). None when the answer is
    not a plain one (bodiless statuses, framing headers, characters aiohttp would refuse):
    those go through `web.Response`.
    """
    if status < 200 or status in (204, 304):
        return None
    lines = [f"HTTP/1.1 {status} {reason or _phrase(status)}"]
    names = set()
    for name, value in headers:
        lower = name.lower()
        if lower in _NOT_RENDERED:
            return None
        if lower in drop or lower == "server":
            continue
        names.add(lower)
        lines.append(f"{name}: {value}")
    lines.extend(f"{name}: {value}" for name, value in own)
    if body_length != 0 and "content-type" not in names:
        lines.append("Content-Type: application/octet-stream")
    lines.append(f"Server: {SERVER_NAME}")
    lines.append("Transfer-Encoding: chunked" if body_length is None else f"Content-Length: {body_length}")
    return _encoded(lines, names)


def render_bodiless(status: int, reason: str | None, headers: list[tuple[str, str]]) -> tuple[bytes, bool] | None:
    """`render_head` for the statuses that never carry a body (1xx, 204, 304): no framing headers,
    as aiohttp sends them."""
    lines = [f"HTTP/1.1 {status} {reason or _phrase(status)}"]
    names = set()
    for name, value in headers:
        lower = name.lower()
        if lower in ("content-length", "transfer-encoding", "server"):
            continue
        names.add(lower)
        lines.append(f"{name}: {value}")
    lines.append(f"Server: {SERVER_NAME}")
    return _encoded(lines, names)


def render_response(response: web.Response) -> bytes | None:
    """A buffered `web.Response` as the bytes aiohttp would send (header order aside), or None."""
    body = response.body
    if not isinstance(body, bytes):  # a payload object (a file, a stream): only aiohttp writes those
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


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _encoded(lines: list[str], names: set[str]) -> tuple[bytes, bool] | None:
    text = "\r\n".join(lines) + "\r\n"
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        return None  # a line break inside a line: aiohttp refuses to send these too (response splitting)
    # A header byte that was not UTF-8 arrives as a lone surrogate (decoded with surrogateescape);
    # aiohttp's header writer leaves those out, and so does this.
    return text.encode("utf-8", "ignore"), "date" in names


def plain_keep_alive(request: Any) -> bool:
    """An HTTP/1.1 request whose connection stays open: one that a `RawAnswer` may answer."""
    return request.version == HttpVersion11 and request.keep_alive


_date_second = -1
_date_line = b""


def date_header() -> bytes:
    """`Date: ...` for the current second, formatted once per second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        _date_second = now
    return _date_line
