"""The downstream side: one aiohttp server that turns requests into exchanges for the chain.

Everything that is refused before forwarding is refused here, once: absolute-form and
CONNECT targets, paths that would escape the upstream's base path, oversized headers
and bodies, unknown prefixes. What passes becomes an `Exchange`; the chain's `Answer`
(or failure) is written back with the proxy's headers added.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
import weakref
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, AsyncIterator

import orjson
import structlog
from aiohttp import web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict

from proxy import signals
from proxy.cache import KEYED_HEADERS, cache_key, vary_covered
from proxy.chain.exchange import Answer, Exchange
from proxy.chain.fallback import RequestBodyTooLarge, UpstreamsFailed
from proxy.config.routing import UnsafePath, check_target
from proxy.downstream.server_name import SERVER_NAME
from proxy.observability.logs import EventLog
from proxy.observability.tracing import Trace, start_trace, stamp, trace_of

log = structlog.get_logger("resilience-proxy")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def error_response(status: int, error: str, request_id: str, detail: str | None = None,
                   cache: str = "MISS", extra: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": error}
    if detail:
        body["detail"] = detail
    if extra:
        body.update(extra)
    body["request_id"] = request_id
    return json_response(status, body, {"X-Cache": cache, "X-Request-ID": request_id})


# Request ids: 16 random hex digits per process and a 16-digit counter: unique, 32 hex characters,
# and far cheaper than uuid4 (a urandom call per request).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


def _reseed_ids() -> None:
    """A forked child must not repeat its parent's ids."""
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(8).hex()
    _ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


os.register_at_fork(after_in_child=_reseed_ids)


def client_of(request: web.BaseRequest) -> str | None:
    """The caller's address for the request log line."""
    try:
        return request.remote
    except Exception:  # a transport already gone
        return None


def request_id_of(request: web.BaseRequest) -> str:
    given = request.headers.get("X-Request-ID")
    if given and _REQUEST_ID.match(given):
        return given
    return new_request_id()


# Request headers that change what the cache may answer (credentials, no-store, conditional and range
# requests) or mean a body: a request carrying one goes the full way through the chain.
_NOT_FAST = frozenset({b"authorization", b"cookie", b"cache-control", b"if-none-match", b"if-modified-since",
                       b"if-match", b"if-unmodified-since", b"if-range", b"range", b"expect", b"content-length",
                       b"transfer-encoding"})
_PROXY_HEADERS = ("X-Cache", "X-Upstream", "X-Request-ID", "Age", "Cache-Status")
_PROXY_LOWER = frozenset(name.lower() for name in _PROXY_HEADERS)
# A stored copy carrying one of these is answered by the full path, which knows what to do with it.
_NOT_RENDERED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_MEMO_MAX = 4096
_MEMO_KEY_MAX = 1024
# The memo's bytes (targets and rendered heads) before it is cleared: part of the overhead the README
# documents above `cache.max_bytes`, whatever the heads' size.
_MEMO_BYTES = 8 * 1024 * 1024
_MEMO_ENTRY_BYTES = 640  # a memo item with its `_Resolved`, key string and weak reference, on CPython 3.11
_DRAIN_ABOVE = 256 * 1024  # bytes waiting in the socket's buffer before a fast answer waits for the caller
CACHE_NAME = "resilience-proxy"


class _Resolved:
    """What the full chain would decide for one (request target, Accept-Encoding) before the cache."""

    __slots__ = ("service", "route", "path", "key", "entry", "head", "dated")

    def __init__(self, service: str, route: str, path: str, key: str) -> None:
        self.service = service
        self.route = route
        self.path = path
        self.key = key
        self.entry: Any = None          # weak reference to the entry `head` was rendered for
        self.head: bytes | None = None  # its status line and fixed headers, or None: not renderable
        self.dated = False              # the copy carries its own Date header


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


def plain_keep_alive(request: web.BaseRequest) -> bool:
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


class HitPath:
    """Answers a plain GET from a fresh in-process copy without building the chain's objects.

    Only what the full path would answer with `X-Cache: HIT` from the same copy, with the same
    headers, events (or their direct counterparts in metrics and stats) and log line; anything
    else (credentials, no-store, conditional, vary, a copy to re-read from Redis, a stale or
    missing copy, percent-encoded paths, HTTP/1.0 or `Connection: close`, ...) returns None and
    goes the full way.
    """

    def __init__(self, state: Any) -> None:
        self._state = state  # a ProxyProcess: .runtime, .bus, .metrics, .stats
        self._direct_for: tuple[int, tuple[EventLog, ...] | None] = (-1, None)

    def _direct(self) -> bool:
        """Whether metrics and stats can be fed directly: nobody else would see the events."""
        bus = self._state.bus
        version, logs = self._direct_for
        if version != bus.version:
            # Subscribers that never look at a request's events (`sees_requests = False`) do not count.
            subscribers = [s for s in bus.subscribers if getattr(s, "sees_requests", True)]
            plain = (self._state.metrics, self._state.stats)
            others = tuple(s for s in subscribers if not any(s is p for p in plain))
            usable = len(subscribers) - len(others) == 2 and all(isinstance(s, EventLog) for s in others)
            logs = others if usable else None  # type: ignore[assignment]
            self._direct_for = (bus.version, logs)
        if logs is None:
            return False
        for log_ in logs:
            if not log_.quiet_for_requests():
                return False
        return True

    def __call__(self, request: web.BaseRequest) -> RawAnswer | None:
        if request.method != "GET" or not plain_keep_alive(request):
            return None
        runtime = self._state.runtime
        peek = getattr(runtime.store, "peek", None)
        if peek is None:
            return None
        raw_path = request.raw_path
        memo = runtime.hit_memo
        if memo.get(raw_path) is False:
            return None  # a target the cache never answers (an uncached service, a proxy endpoint)
        clock = runtime.clock
        started = clock.monotonic()
        encoding = given_id = traceparent = tracestate = None
        size = 0
        for name, value in request.raw_headers:
            size += len(name) + len(value) + 4
            lower = name.lower()
            if lower in _NOT_FAST:
                return None
            if lower == b"accept-encoding":
                if encoding is not None:
                    return None
                encoding = value
            elif lower == b"x-request-id":
                given_id = value
            elif lower == b"traceparent" or lower == b"tracestate":
                if (traceparent if lower == b"traceparent" else tracestate) is not None:
                    return None  # repeated: the full path reads them as a whole
                if lower == b"traceparent":
                    traceparent = value
                else:
                    tracestate = value
        if size > runtime.config.server.max_header_bytes:
            return None
        resolved = memo.get((raw_path, encoding))
        if resolved is None:
            resolved = _resolve(runtime, request, raw_path)
            if len(memo) >= _MEMO_MAX or runtime.hit_memo_bytes >= _MEMO_BYTES:
                memo.clear()
                runtime.hit_memo_bytes = 0
            if len(raw_path) + len(encoding or "") <= _MEMO_KEY_MAX:  # long targets are not worth their memory
                # A refusal depends on the target alone: remembered under the bare target, checked first.
                memo[raw_path if resolved is False else (raw_path, encoding)] = resolved
                runtime.hit_memo_bytes += _MEMO_ENTRY_BYTES + 2 * len(raw_path) + len(encoding or "")
        if resolved is False:
            return None
        now = clock.time()
        entry = peek(resolved.key, now)
        if entry is None or entry.is_index or not now < entry.fresh_until:
            return None  # a vary index: the full path picks the variant
        if resolved.entry is None or resolved.entry() is not entry:
            own = [("X-Cache", "HIT"), ("X-Upstream", entry.upstream)] if entry.upstream else [("X-Cache", "HIT")]
            # A copy that varies on more than its key covers (stored before Vary was honoured) is the full path's.
            rendered = render_head(entry.status, None, entry.headers, own, _PROXY_LOWER, len(entry.body)) \
                if vary_covered(entry.headers, KEYED_HEADERS) else None
            # A weak reference: the memo must never keep a body alive after the store has let it go.
            resolved.entry = weakref.ref(entry)
            resolved.head, resolved.dated = rendered if rendered is not None else (None, False)
            runtime.hit_memo_bytes += len(resolved.head or b"")
        head = resolved.head
        if head is None:
            return None
        if given_id is not None:
            request_id = request_id_of(request)
        else:
            request_id = new_request_id()
        age = now - entry.stored_at
        answer = RawAnswer(b"".join((
            head,
            b"" if resolved.dated else date_header(),
            f"X-Request-ID: {request_id}\r\nAge: {int(age) if age > 0 else 0}\r\n"
            f"Cache-Status: {CACHE_NAME}; hit; ttl={int(entry.fresh_until - now)}\r\n\r\n".encode(),
            entry.body)), entry.status)
        duration = clock.monotonic() - started
        if self._direct():
            state = self._state
            state.metrics.record_hit(resolved.service, entry.status, duration, started + duration, resolved.route)
            state.stats.record_hit(resolved.service, entry.status, duration)
        else:
            emit = self._state.bus.emit
            trace = start_trace(_text(traceparent), _text(tracestate), recording=self._state.spans is not None)
            if self._state.spans is not None:
                stamp(trace, started)
                trace.lookup = (started, started + duration)  # on this path the lookup is all there is
            emit(signals.CacheLookup(resolved.service, "hit", max(0.0, age)))
            emit(signals.RequestFinished(
                service=resolved.service, route=resolved.route, method="GET", path=resolved.path,
                status=entry.status, cache="HIT", upstream=entry.upstream, attempts=(), duration=duration,
                request_id=request_id, fallback=False, client=client_of(request), bytes_in=0,
                bytes_out=len(entry.body), trace=trace))
        return answer


def _text(value: bytes | str | None) -> str | None:
    """A header value as text (a lean request's are bytes)."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def own_endpoint(path: str) -> bool:
    """A decoded path the proxy answers itself (`ProxyProcess.handle_rest`), never a route's."""
    return path == "/events" or path == "/health" or path.startswith("/health/")


def _resolve(runtime: Any, request: web.BaseRequest, raw_path: str) -> _Resolved | bool:
    """The service, route and cache key the full path would use, or False when it must take the full path."""
    path = raw_path.split("?", 1)[0]
    if "%" in path:
        return False  # the proxy's own endpoints are matched on the decoded path: leave encodings to it
    try:
        decoded = check_target(raw_path)
    except (UnsafePath, UnicodeDecodeError):
        return False
    if own_endpoint(decoded):
        return False
    service = runtime.config.service_for(decoded)
    if service is None:
        return False
    route, _ = service.route_for(decoded)
    if route is not None and route.derive is not None:
        return False
    rule = route.cache if route is not None else service.cache
    if not rule.enabled or rule.vary or rule.key_by_credential:
        return False
    key = cache_key(service.name, "GET", path, tuple(request.rel_url.query.items()), request.headers)
    return _Resolved(service.name, route.name if route is not None else service.prefix, path, key)


class ProxyHandler:
    """Handles proxied requests for whatever Runtime `state.runtime` holds at the moment."""

    def __init__(self, state: Any) -> None:
        self._state = state  # has .runtime (swapped whole on reload) and .bus

    async def __call__(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        recording = self._state.spans is not None
        trace = trace_of(request.headers, recording=recording)
        # Every line logged while this request runs carries its trace id (structlog's contextvars).
        tokens = structlog.contextvars.bind_contextvars(trace_id=trace.trace_id)
        try:
            return await self._handle(request, request_id, trace, recording)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    def refuse(self, request: web.BaseRequest, request_id: str, status: int, error: str, detail: str | None = None,
               *, service: str | None = None, trace: Trace | None = None, started: float | None = None) -> web.Response:
        """An error answer to a request no route took, counted and logged (`RequestRefused`)."""
        clock = self._state.runtime.clock
        if trace is None:  # refused before the handler read it (CONNECT, absolute-form targets)
            trace = trace_of(request.headers, recording=self._state.spans is not None)
        self._state.bus.emit(signals.RequestRefused(
            status=status, error=error, service=service, method=request.method,
            path=request.raw_path.split("?", 1)[0][:200], request_id=request_id,
            duration=0.0 if started is None else clock.monotonic() - started, client=client_of(request),
            trace=trace))
        return error_response(status, error, request_id, detail, cache="BYPASS")

    async def _handle(self, request: web.BaseRequest, request_id: str, trace: Trace,
                      recording: bool) -> web.StreamResponse:
        runtime = self._state.runtime  # read once: a reload mid-request does not affect this one
        config = runtime.config
        clock = runtime.clock
        started = clock.monotonic()
        if recording:
            stamp(trace, started)
        settings = config.server

        raw_path = request.raw_path
        try:
            decoded = check_target(raw_path)
        except (UnsafePath, UnicodeDecodeError) as exc:
            return self.refuse(request, request_id, 400, "bad_request", str(exc), trace=trace, started=started)
        header_bytes = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if header_bytes > settings.max_header_bytes:
            return self.refuse(request, request_id, 431, "request_headers_too_large",
                               f"{header_bytes} bytes of headers; the limit is {settings.max_header_bytes}",
                               trace=trace, started=started)
        service = config.service_for(decoded)
        if service is None:
            return self.refuse(request, request_id, 404, "no_route", trace=trace, started=started)
        length = request.content_length
        if length is not None and length > settings.max_request_body:
            return self.refuse(request, request_id, 413, "request_body_too_large",
                               f"{length} bytes; the limit is {settings.max_request_body}", service=service.name,
                               trace=trace, started=started)

        route, params = service.route_for(decoded)
        path = raw_path.split("?", 1)[0]
        exchange = Exchange(
            request_id=request_id, method=request.method, service=service, route=route, params=params,
            path=path, rest=_rest_of(path, service.prefix), query=tuple(request.rel_url.query.items()),
            headers=request.headers, deadline_at=started + service.deadline, trace=trace)
        runtime.active += 1  # from here on this request holds the table it started on
        try:
            await self._read_body(request, exchange, settings.replay_buffer, settings.max_request_body)
            answer = await runtime.chain(exchange)
        except UpstreamsFailed as failure:
            headers = {"X-Cache": "MISS", "X-Request-ID": request_id,
                       "Cache-Status": f"resilience-proxy; fwd=uri-miss; detail={failure.error}"}
            if failure.retry_after is not None:
                headers["Retry-After"] = str(int(failure.retry_after))  # when an upstream may be tried again
            response = json_response(failure.status, failure.body(request_id), headers)
            self._finished(request, exchange, failure.status, "MISS", None, started, clock,
                           bytes_out=len(response.body))
            return response
        except RequestBodyTooLarge:
            return self.refuse(request, request_id, 413, "request_body_too_large",
                               f"the limit is {settings.max_request_body} bytes", service=service.name,
                               trace=trace, started=started)
        else:
            response, sent = await self._write(request, answer, exchange, clock)
            self._finished(request, exchange, answer.status, answer.cache, answer.upstream, started, clock,
                           answer.fallback, bytes_out=sent)
            return response
        finally:
            runtime.active -= 1

    def _finished(self, request: web.BaseRequest, exchange: Exchange, status: int, cache: str, upstream: str | None,
                  started: float, clock: Any, fallback: bool = False, *, bytes_out: int | None) -> None:
        self._state.bus.emit(signals.RequestFinished(
            service=exchange.service.name, route=exchange.route_name, method=exchange.method, path=exchange.path,
            status=status, cache=cache, upstream=upstream,
            attempts=tuple((a.upstream, a.outcome) for a in exchange.attempts),
            duration=clock.monotonic() - started, request_id=exchange.request_id, fallback=fallback,
            client=client_of(request), bytes_in=len(exchange.body) if exchange.replayable else None,
            bytes_out=bytes_out, trace=exchange.trace))

    async def _read_body(self, request: web.BaseRequest, exchange: Exchange, replay: int, limit: int) -> None:
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

    async def _write(self, request: web.BaseRequest, answer: Answer, exchange: Exchange,
                     clock: Any) -> tuple[web.StreamResponse | RawAnswer, int]:
        """The answer to send and its body bytes (those written, for a streamed one)."""
        request_id = exchange.request_id
        if answer.stream is None and request.method != "HEAD" and plain_keep_alive(request):
            raw = _raw_answer(answer, request_id)
            if raw is not None:
                return raw, len(answer.body)
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
            sent = 0 if request.method == "HEAD" else len(answer.body)
            return web.Response(status=answer.status, reason=answer.reason or None, headers=headers,
                                body=answer.body), sent
        upstream_response = answer.stream
        length = upstream_response.content_length
        # A lean connection's request (proxy/downstream/front.py) streams through its own writer, framed the same way.
        opener = getattr(request, "stream_response", None)
        response = opener(answer.status, answer.reason or None, headers) if opener is not None else \
            web.StreamResponse(status=answer.status, reason=answer.reason or None, headers=headers)
        if length is not None:
            response.content_length = length
        # No byte from the upstream for its `timeout` ends the stream, and so does the request's deadline.
        service = exchange.service
        idle = next((u.timeout for u in service.upstreams if u.name == answer.upstream), service.deadline)
        deadline = asyncio.get_running_loop().time() + exchange.deadline_at - clock.monotonic()
        sent = 0
        try:
            await response.prepare(request)
            async with asyncio.timeout_at(deadline):
                if answer.body:
                    await response.write(answer.body)
                    sent += len(answer.body)
                while True:
                    async with asyncio.timeout(idle):
                        chunk = await upstream_response.read()
                    if not chunk:
                        break
                    await response.write(chunk)
                    sent += len(chunk)
            await response.write_eof()
        except Exception as exc:
            # The status line is out: no second answer can follow. Cut the connection so the caller
            # sees a truncated body instead of trusting it, and keep the keep-alive stream in sync.
            log.warning("streamed answer broken after its headers were sent; connection closed",
                        kind="stream", request_id=request_id, upstream=answer.upstream,
                        error=f"{type(exc).__name__}: {exc}"[:200])
            response.force_close()
            if request.transport is not None:
                request.transport.abort()
        finally:
            upstream_response.release()
        return response, sent


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


def _rest_of(path: str, prefix: str) -> str:
    """The encoded path after the service prefix, cut on segments (the prefix may arrive encoded)."""
    if prefix == "/":
        return path
    depth = prefix.count("/")
    parts = path.split("/")
    rest = "/".join(parts[depth + 1:])
    if len(parts) > depth + 1:
        return "/" + rest
    return ""
