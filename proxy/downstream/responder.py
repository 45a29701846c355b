"""How a handler answers, whichever front end read the request.

A handler gets a `Responder` with the request and calls one of its methods: `send` a whole
answer already rendered to bytes, `send_response` an aiohttp response (the proxy's own
answers, or one `render_head` cannot render), `upgraded` for a WebSocket that took the
connection over, or `stream` a large answer chunk by chunk (`abort` when it breaks after its
head went out). The lean front end's writer (`proxy.downstream.connection.LeanResponder`) and
`AiohttpResponder` implement it, so no handler asks which front end it runs under.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

from aiohttp import hdrs, web
from multidict import CIMultiDict

from proxy.downstream.wire import RawAnswer


class Stream(Protocol):
    """A streamed answer whose head is out: its body goes out chunk by chunk."""

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes = b"") -> None: ...


class Responder(Protocol):
    """Where a handler puts its answer (see the module's docstring)."""

    @property
    def started(self) -> bool:
        """Whether an answer was given (no second one may follow)."""
        ...

    def send(self, answer: RawAnswer) -> None: ...

    def send_response(self, response: web.Response) -> None: ...

    def upgraded(self, response: web.StreamResponse) -> None: ...

    async def stream(self, status: int, reason: str | None, headers: CIMultiDict[str],
                     content_length: int | None) -> Stream: ...

    def abort(self) -> None: ...


class AiohttpResponder:
    """A `Responder` for a request aiohttp's server read: `result()` is what its handler returns.

    With `close_after`, the answer ends the connection (aiohttp's parser drops what was sent
    after an upgrade it does not switch to; a next request there would wait forever), unless
    the answer switched protocols itself.
    """

    __slots__ = ("_request", "_answer", "_close", "_close_after")

    def __init__(self, request: web.BaseRequest, *, close_after: bool = False) -> None:
        self._request = request
        self._answer: RawAnswer | web.StreamResponse | None = None
        self._close: Callable[[], None] | None = None  # how this answer is made to end its connection
        self._close_after = close_after

    @property
    def started(self) -> bool:
        return self._answer is not None

    def send(self, answer: RawAnswer) -> None:
        self._answer, self._close = answer, answer.close_after

    def send_response(self, response: web.Response) -> None:
        self._answer, self._close = response, response.force_close

    def upgraded(self, response: web.StreamResponse) -> None:
        self._answer, self._close = response, None

    async def stream(self, status: int, reason: str | None, headers: CIMultiDict[str],
                     content_length: int | None) -> web.StreamResponse:
        response = web.StreamResponse(status=status, reason=reason, headers=headers)
        if content_length is not None:
            response.content_length = content_length
        self._answer, self._close = response, response.force_close
        await response.prepare(self._request)
        return response

    def abort(self) -> None:
        if self._close is not None:
            self._close()
        if self._request.transport is not None:
            self._request.transport.abort()

    def result(self) -> RawAnswer | web.StreamResponse:
        """What aiohttp's server is handed to finish (and, for a RawAnswer, write)."""
        if self._answer is None:
            raise RuntimeError("the handler gave no answer")
        if self._close_after and self._close is not None:
            self._close()
        return self._answer


async def answer_on_aiohttp(request: web.BaseRequest, hit: Callable[[Any], RawAnswer | None],
                            answer: Callable[[Any, Responder], Awaitable[None]]) -> RawAnswer | web.StreamResponse:
    """The way in for a request aiohttp's server read: stage 0, else `answer`; what its handler returns."""
    # aiohttp's parser drops what was sent after an upgrade it does not switch to (all but
    # WebSocket): a request there would wait for an answer forever. The connection ends instead.
    responder = AiohttpResponder(request, close_after=hdrs.UPGRADE in request.headers or request.method == "CONNECT")
    raw = hit(request)
    if raw is not None:
        responder.send(raw)
    else:
        await answer(request, responder)
    return responder.result()
