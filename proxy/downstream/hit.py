"""Stage 0 of the chain: a plain GET answered from a fresh in-process copy, before any other stage.

The chain's objects (an `Exchange`, an `Answer`, aiohttp's request and response) cost more
than a HIT is worth; this stage answers without them, with exactly what the full chain would
answer with `X-Cache: HIT` from the same copy: the same headers, the same events (or their
direct counterparts in metrics and stats) and log line. Anything else returns None and goes
the full way: credentials, no-store, conditional requests (the screen of `proxy.cache.rules`),
a copy that varies, one to re-read from Redis, a stale or missing copy, percent-encoded
paths, HTTP/1.0 or `Connection: close`, the proxy's own endpoints.

`chain.build.Runtime` builds one per route table (`HitStage.factory`), so its memo of
targets and rendered heads starts again at a reload.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable

from proxy import signals
from proxy.cache import KEYED_HEADERS, cache_key, vary_covered
from proxy.cache.rules import HIT_SCREENED
from proxy.downstream.handler import own_endpoint
from proxy.downstream.ids import client_of, new_request_id, request_id_of
from proxy.downstream.wire import RawAnswer, date_header, plain_keep_alive, render_head
from proxy.observability.logs import EventLog
from proxy.observability.metrics import Metrics
from proxy.observability.stats import Stats
from proxy.observability.tracing import start_trace, stamp

if TYPE_CHECKING:
    from proxy.chain.build import Runtime

_PROXY_LOWER = frozenset(("x-cache", "x-upstream", "x-request-id", "age", "cache-status"))
_MEMO_MAX = 4096
_MEMO_KEY_MAX = 1024
# The memo's bytes (targets and rendered heads) before it is cleared: part of the overhead the README
# documents above `cache.max_bytes`, whatever the heads' size.
_MEMO_BYTES = 8 * 1024 * 1024
_MEMO_ENTRY_BYTES = 640  # a memo item with its `_Resolved`, key string and weak reference, on CPython 3.11
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


class HitStage:
    """See the module's docstring. Call it with a request; it returns a `RawAnswer` or None.

    `metrics` and `stats` are fed directly when nobody else would see the request's events
    (only quiet event logs besides them on the bus); otherwise the events are emitted, with the
    request's trace (`recording`: spans are exported, so its start and lookup are timed).
    """

    def __init__(self, runtime: "Runtime", *, metrics: Metrics | None = None, stats: Stats | None = None,
                 recording: bool = False) -> None:
        self._peek = getattr(runtime.store, "peek", None)  # only an in-process tier can answer here
        self._resolve = runtime.resolve
        self._clock = runtime.clock
        self._bus = runtime.bus
        self._max_header_bytes = runtime.config.server.max_header_bytes
        self._metrics = metrics
        self._stats = stats
        self._recording = recording
        self.memo: dict[Any, _Resolved | bool] = {}  # (target, Accept-Encoding) -> _Resolved; target -> False
        self.memo_bytes = 0
        self._direct_for: tuple[int, tuple[EventLog, ...] | None] = (-1, None)

    @classmethod
    def factory(cls, *, metrics: Metrics | None = None, stats: Stats | None = None,
                recording: bool = False) -> Callable[["Runtime"], "HitStage"]:
        """What `Runtime(hit=...)` calls to build its stage 0."""
        return lambda runtime: cls(runtime, metrics=metrics, stats=stats, recording=recording)

    def _direct(self) -> bool:
        """Whether metrics and stats can be fed directly: nobody else would see the events."""
        bus = self._bus
        version, logs = self._direct_for
        if version != bus.version:
            # Subscribers that never look at a request's events (`sees_requests = False`) do not count.
            subscribers = [s for s in bus.subscribers if getattr(s, "sees_requests", True)]
            plain = (self._metrics, self._stats)
            others = tuple(s for s in subscribers if not any(s is p for p in plain))
            usable = None not in plain and len(subscribers) - len(others) == 2 \
                and all(isinstance(s, EventLog) for s in others)
            logs = others if usable else None  # type: ignore[assignment]
            self._direct_for = (bus.version, logs)
        if logs is None:
            return False
        for log_ in logs:
            if not log_.quiet_for_requests():
                return False
        return True

    def __call__(self, request: Any) -> RawAnswer | None:
        if request.method != "GET" or not plain_keep_alive(request):
            return None
        peek = self._peek
        if peek is None:
            return None
        raw_path = request.raw_path
        memo = self.memo
        if memo.get(raw_path) is False:
            return None  # a target the cache never answers (an uncached service, a proxy endpoint)
        clock = self._clock
        started = clock.monotonic()
        encoding = given_id = traceparent = tracestate = None
        size = 0
        for name, value in request.raw_headers:
            size += len(name) + len(value) + 4
            lower = name.lower()
            if lower in HIT_SCREENED:
                return None
            if lower == b"accept-encoding":
                if encoding is not None:
                    return None
                encoding = value
            elif lower == b"x-request-id":
                given_id = value
            elif lower == b"traceparent":
                if traceparent is not None:
                    return None  # repeated: the full path reads them as a whole
                traceparent = value
            elif lower == b"tracestate":
                if tracestate is not None:
                    return None
                tracestate = value
        if size > self._max_header_bytes:
            return None
        resolved = memo.get((raw_path, encoding))
        if resolved is None:
            resolved = self._resolved(request, raw_path)
            if len(memo) >= _MEMO_MAX or self.memo_bytes >= _MEMO_BYTES:
                memo.clear()
                self.memo_bytes = 0
            if len(raw_path) + len(encoding or "") <= _MEMO_KEY_MAX:  # long targets are not worth their memory
                # A refusal depends on the target alone: remembered under the bare target, checked first.
                memo[raw_path if resolved is False else (raw_path, encoding)] = resolved
                self.memo_bytes += _MEMO_ENTRY_BYTES + 2 * len(raw_path) + len(encoding or "")
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
            self.memo_bytes += len(resolved.head or b"")
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
        metrics, stats = self._metrics, self._stats
        if metrics is not None and stats is not None and self._direct():
            metrics.record_hit(resolved.service, entry.status, duration, started + duration, resolved.route)
            stats.record_hit(resolved.service, entry.status, duration)
        else:
            emit = self._bus.emit
            trace = start_trace(_text(traceparent), _text(tracestate), recording=self._recording)
            if self._recording:
                stamp(trace, started)
                trace.lookup = (started, started + duration)  # on this path the lookup is all there is
            emit(signals.CacheLookup(resolved.service, "hit", max(0.0, age)))
            emit(signals.RequestFinished(
                service=resolved.service, route=resolved.route, method="GET", path=resolved.path,
                status=entry.status, cache="HIT", upstream=entry.upstream, attempts=(), duration=duration,
                request_id=request_id, fallback=False, client=client_of(request), bytes_in=0,
                bytes_out=len(entry.body), trace=trace))
        return answer

    def _resolved(self, request: Any, raw_path: str) -> _Resolved | bool:
        """The service, route and cache key the full path would use, or False when it must take the full path."""
        if "%" in raw_path.split("?", 1)[0]:
            return False  # the proxy's own endpoints are matched on the decoded path: leave encodings to it
        resolution = self._resolve(raw_path)
        service, route = resolution.service, resolution.route
        if service is None or own_endpoint(resolution.decoded):
            return False
        if route is not None and route.derive is not None:
            return False
        rule = route.cache if route is not None else service.cache
        if not rule.enabled or rule.vary or rule.key_by_credential:
            return False
        key = cache_key(service.name, "GET", resolution.path, tuple(request.rel_url.query.items()), request.headers)
        return _Resolved(service.name, resolution.route_name, resolution.path, key)


def _text(value: bytes | str | None) -> str | None:
    """A header value as text (a lean request's raw headers are bytes, as aiohttp's are)."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value
