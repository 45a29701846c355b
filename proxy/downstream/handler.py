"""The one way in: every request either front end reads is answered from here.

    Downstream.hit (stage 0: a fresh in-process copy, `proxy.downstream.hit`)
    → Downstream.answer: the proxy's own endpoints (`/health...`, `/events`), else
    → ProxyHandler: refusals (unsafe target, oversized headers or body, unknown prefix), an
      `Exchange` from the target's `Resolution`, the rest of the chain (`runtime.chain`), and
      the chain's `Answer` (or failure) written through the request's `Responder`.

Every answer on the proxy port that is not the proxy's own endpoint is told once: a
`RequestFinished` for a request a route took, a `RequestRefused` for one refused before (CONNECT
and absolute-form targets, 400, 404 no_route, 413, 431). Each request carries its W3C trace
(`proxy.observability.tracing`), whose id is on every line logged while it runs.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web
from multidict import CIMultiDict

from proxy import signals
from proxy.chain.build import Runtime
from proxy.chain.exchange import Answer, Exchange
from proxy.chain.fallback import RequestBodyTooLarge, UpstreamsFailed
from proxy.clock import Clock
from proxy.downstream.ids import client_of, request_id_of
from proxy.downstream.responder import Responder, answer_on_aiohttp
from proxy.downstream.wire import RawAnswer, date_header, error_response, json_response, plain_keep_alive, render_head
from proxy.observability.tracing import Trace, stamp, trace_of

log = structlog.get_logger("resilience-proxy")

Endpoint = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
HealthEndpoint = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]


def own_endpoint(path: str) -> bool:
    """A decoded path the proxy answers itself (`Downstream.answer`), never a route's."""
    return path == "/events" or path == "/health" or path.startswith("/health/")


class Downstream:
    """Answers what either front end reads, for whatever Runtime `current_runtime()` gives."""

    def __init__(self, current_runtime: Callable[[], Runtime], *, emit: signals.Subscriber,
                 health: HealthEndpoint, events: Endpoint, recording: bool = False) -> None:
        self._current_runtime = current_runtime
        self._proxy = ProxyHandler(current_runtime, emit, recording=recording)
        self._health = health
        self._events = events

    def hit(self, request: Any) -> RawAnswer | None:
        """Stage 0: a fresh in-process copy, answered without the rest of the chain; None: `answer` answers."""
        stage = self._current_runtime().hit
        if stage is None:
            return None
        try:
            return stage(request)
        except Exception:
            log.exception("unhandled error on the cache fast path", path=request.raw_path)
            return None

    async def on_aiohttp(self, request: web.BaseRequest) -> RawAnswer | web.StreamResponse:
        """A handler for an aiohttp server of its own (`web.Server(downstream.on_aiohttp)`): the same way in."""
        return await answer_on_aiohttp(request, self.hit, self.answer)

    async def answer(self, request: Any, responder: Responder) -> None:
        """Answer a request the HIT stage did not."""
        request_id = request_id_of(request)
        if request.method == "CONNECT" or not request.raw_path.startswith("/"):
            responder.send_response(self._proxy.refuse(
                request, request_id, 400, "bad_request",
                "CONNECT and absolute-form targets are refused: this is not an open proxy"))
            return
        path = request.path
        if path == "/events":
            responder.upgraded(await self._events(request))
            return
        if own_endpoint(path):
            response = await self._health(request, request_id)
            response.headers["X-Request-ID"] = request_id
            responder.send_response(response)  # type: ignore[arg-type]
            return
        try:
            await self._proxy(request, request_id, responder)
        except Exception:
            log.exception("unhandled error while proxying", request_id=request_id, path=request.path)
            if not responder.started:  # counted and logged like any answer, so error-rate alerts see it
                responder.send_response(self._proxy.refuse(request, request_id, 500, "internal_error"))


class ProxyHandler:
    """Forwards a request through the chain of the Runtime in force when it arrived.

    `recording`: spans are exported (`tracing.otlp_endpoint`), so each request's start is stamped
    and the upstreams' parent is the proxy's own span.
    """

    def __init__(self, current_runtime: Callable[[], Runtime], emit: signals.Subscriber, *,
                 recording: bool = False) -> None:
        self._current_runtime = current_runtime
        self._emit = emit
        self._recording = recording

    async def __call__(self, request: Any, request_id: str, responder: Responder) -> None:
        trace = trace_of(request.headers, recording=self._recording)
        # Every line logged while this request runs carries its trace id (structlog's contextvars).
        tokens = structlog.contextvars.bind_contextvars(trace_id=trace.trace_id)
        try:
            await self._handle(request, request_id, responder, trace)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    def refuse(self, request: Any, request_id: str, status: int, error: str, detail: str | None = None, *,
               service: str | None = None, trace: Trace | None = None, started: float | None = None,
               clock: Clock | None = None) -> web.Response:
        """An error answer to a request no route took, told once (`RequestRefused`)."""
        if trace is None:  # refused before the handler read it (CONNECT, absolute-form targets)
            trace = trace_of(request.headers, recording=self._recording)
        duration = 0.0 if started is None or clock is None else clock.monotonic() - started
        self._emit(signals.RequestRefused(
            status=status, error=error, service=service, method=request.method,
            path=request.raw_path.split("?", 1)[0][:200], request_id=request_id, duration=duration,
            client=client_of(request), trace=trace))
        return error_response(status, error, request_id, detail, cache="BYPASS")

    async def _handle(self, request: Any, request_id: str, responder: Responder, trace: Trace) -> None:
        runtime = self._current_runtime()  # read once: a reload mid-request does not affect this one
        config = runtime.config
        clock = runtime.clock
        started = clock.monotonic()
        if self._recording:
            stamp(trace, started)
        settings = config.server

        def refuse(status: int, error: str, detail: str | None = None, service: str | None = None) -> None:
            responder.send_response(self.refuse(request, request_id, status, error, detail, service=service,
                                                trace=trace, started=started, clock=clock))

        resolution = runtime.resolve(request.raw_path)
        refusal = resolution.refusal
        if refusal is not None and refusal.status == 400:
            refuse(400, refusal.error, refusal.detail)
            return
        header_bytes = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if header_bytes > settings.max_header_bytes:
            refuse(431, "request_headers_too_large",
                   f"{header_bytes} bytes of headers; the limit is {settings.max_header_bytes}")
            return
        service = resolution.service
        if refusal is not None or service is None:
            refuse(404, "no_route")
            return
        length = request.content_length
        if length is not None and length > settings.max_request_body:
            refuse(413, "request_body_too_large", f"{length} bytes; the limit is {settings.max_request_body}",
                   service.name)
            return

        exchange = Exchange(
            request_id=request_id, method=request.method, service=service, route=resolution.route,
            params=resolution.params, path=resolution.path, rest=resolution.rest,  # type: ignore[arg-type]
            query=tuple(request.rel_url.query.items()), headers=request.headers,
            deadline_at=started + service.deadline, trace=trace)
        runtime.active += 1  # from here on this request holds the table it started on
        try:
            await self._read_body(request, exchange, settings.replay_buffer, settings.max_request_body)
            answer = await runtime.chain(exchange)
            sent = await self._write(request, responder, answer, exchange, clock)
            self._finished(request, exchange, answer.status, answer.cache, answer.upstream, started, clock,
                           answer.fallback, bytes_out=sent)
        except UpstreamsFailed as failure:
            headers = {"X-Cache": "MISS", "X-Request-ID": request_id,
                       "Cache-Status": f"resilience-proxy; fwd=uri-miss; detail={failure.error}"}
            if failure.retry_after is not None:
                headers["Retry-After"] = str(int(failure.retry_after))  # when an upstream may be tried again
            response = json_response(failure.status, failure.body(request_id), headers)
            responder.send_response(response)
            self._finished(request, exchange, failure.status, "MISS", None, started, clock,
                           bytes_out=response.content_length)
        except RequestBodyTooLarge:
            refuse(413, "request_body_too_large", f"the limit is {settings.max_request_body} bytes", service.name)
        except Exception:
            if responder.started:
                raise  # part of an answer is out: nothing more can be said to this caller
            # A defect of ours: the caller gets a 500, and the request is counted and logged under its
            # service like any other, so an error-rate alert sees it.
            log.exception("unhandled error while proxying", request_id=request_id, path=request.path)
            responder.send_response(error_response(500, "internal_error", request_id))
            self._finished(request, exchange, 500, "MISS", None, started, clock, bytes_out=None)
        finally:
            runtime.active -= 1

    def _finished(self, request: Any, exchange: Exchange, status: int, cache: str, upstream: str | None,
                  started: float, clock: Clock, fallback: bool = False, *, bytes_out: int | None) -> None:
        self._emit(signals.RequestFinished(
            service=exchange.service.name, route=exchange.route_name, method=exchange.method, path=exchange.path,
            status=status, cache=cache, upstream=upstream,
            attempts=tuple((a.upstream, a.outcome) for a in exchange.attempts),
            duration=clock.monotonic() - started, request_id=exchange.request_id, fallback=fallback,
            client=client_of(request), bytes_in=len(exchange.body) if exchange.replayable else None,
            bytes_out=bytes_out, trace=exchange.trace))

    async def _read_body(self, request: Any, exchange: Exchange, replay: int, limit: int) -> None:
        """Buffer the body up to `replay` bytes; stream the rest (sent once, never replayed)."""
        if not request.body_exists:
            return
        if request.headers.get("Expect", "").lower() == "100-continue":
            # The low-level server does not answer Expect itself; the caller waits for this line.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        content = request.content
        buffered = bytearray()
        while len(buffered) <= replay:
            chunk = await content.readany()
            if not chunk:
                exchange.body = bytes(buffered)
                return
            buffered += chunk
            if len(buffered) > limit:
                raise RequestBodyTooLarge()

        async def rest() -> AsyncIterator[bytes]:
            sent = len(buffered)
            yield bytes(buffered)
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                sent += len(chunk)
                if sent > limit:
                    exchange.body_too_large = True
                    raise RequestBodyTooLarge()
                yield chunk

        exchange.body_stream = rest()

    async def _write(self, request: Any, responder: Responder, answer: Answer, exchange: Exchange,
                     clock: Clock) -> int:
        """Send the answer; returns its body bytes (those written, for a streamed one)."""
        request_id = exchange.request_id
        if answer.stream is None and request.method != "HEAD" and plain_keep_alive(request):
            raw = _raw_answer(answer, request_id)
            if raw is not None:
                responder.send(raw)
                return len(answer.body)
        headers = CIMultiDict(answer.headers)
        headers["X-Cache"] = answer.cache
        if answer.upstream:
            headers["X-Upstream"] = answer.upstream
        headers["X-Request-ID"] = request_id
        if answer.age is not None:
            headers["Age"] = str(int(answer.age))
        if answer.cache_status:
            headers["Cache-Status"] = answer.cache_status
        if answer.stream is None:
            responder.send_response(web.Response(status=answer.status, reason=answer.reason or None, headers=headers,
                                                 body=answer.body))
            return 0 if request.method == "HEAD" else len(answer.body)
        upstream_response = answer.stream
        # No byte from the upstream for its `timeout` ends the stream, and so does the request's deadline.
        service = exchange.service
        idle = next((u.timeout for u in service.upstreams if u.name == answer.upstream), service.deadline)
        deadline = asyncio.get_running_loop().time() + exchange.deadline_at - clock.monotonic()
        sent = 0
        try:
            stream = await responder.stream(answer.status, answer.reason or None, headers,
                                            upstream_response.content_length)
            async with asyncio.timeout_at(deadline):
                if answer.body:
                    await stream.write(answer.body)
                    sent += len(answer.body)
                while True:
                    async with asyncio.timeout(idle):
                        chunk = await upstream_response.read()
                    if not chunk:
                        break
                    await stream.write(chunk)
                    sent += len(chunk)
            await stream.write_eof()
        except Exception as exc:
            # The status line is out: no second answer can follow. Cut the connection so the caller
            # sees a truncated body instead of trusting it, and keep the keep-alive stream in sync.
            log.warning("streamed answer broken after its headers were sent; connection closed",
                        kind="stream", request_id=request_id, upstream=answer.upstream,
                        error=f"{type(exc).__name__}: {exc}"[:200])
            responder.abort()
        finally:
            upstream_response.release()
        return sent


def _raw_answer(answer: Answer, request_id: str) -> RawAnswer | None:
    """A buffered answer rendered to bytes with the proxy's headers, as `_write` would send it."""
    own = [("X-Cache", answer.cache)]
    if answer.upstream:
        own.append(("X-Upstream", answer.upstream))
    own.append(("X-Request-ID", request_id))
    if answer.age is not None:
        own.append(("Age", str(int(answer.age))))
    if answer.cache_status:
        own.append(("Cache-Status", answer.cache_status))
    rendered = render_head(answer.status, answer.reason, answer.headers, own,
                           {name.lower() for name, _ in own}, len(answer.body))
    if rendered is None:
        return None
    head, dated = rendered
    return RawAnswer(b"".join((head, b"" if dated else date_header(), b"\r\n", answer.body)), answer.status)
