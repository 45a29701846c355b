"""Structured logs: structlog, JSON by default, secrets masked in every line.

`EventLog` subscribes to the chain's events and writes the lines operators know
(`Circuit breaker: OPENED for fx_primary, will retry after ...`, `Using stale cache for ...`),
one line per proxied request and one per upstream attempt. `route_library_logs` sends what
aiohttp and asyncio log through the same JSON lines and masking.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError

from proxy import signals
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.masking import Masker

_SENSITIVE_KEY = re.compile(r"(authorization|cookie|api[-_]?key|token|secret|password|passwd|access[-_]?key)", re.I)
_MASK = "***"


class Redactor:
    """A structlog processor hiding secret values, in every form they take (see `proxy.masking`),
    wherever they appear in a log event."""

    def __init__(self) -> None:
        self._secrets: frozenset[str] = frozenset()
        self._masker = Masker()

    def set_secrets(self, secrets: frozenset[str] | set[str]) -> None:
        self._secrets = frozenset(s for s in secrets if s)
        self._masker = Masker(self._secrets)

    def add_secrets(self, secrets: frozenset[str] | set[str]) -> None:
        self.set_secrets(self._secrets | set(secrets))

    def mask_text(self, text: str) -> str:
        return self._masker(text)

    def _mask(self, key: str | None, value: Any) -> Any:
        if isinstance(value, str):
            if key is not None and _SENSITIVE_KEY.search(key):
                return _MASK
            return self.mask_text(value)
        if isinstance(value, dict):
            return {k: self._mask(str(k), v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._mask(None, v) for v in value]
        return value

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        return {k: (v if k in ("timestamp", "level") else self._mask(k if k != "event" else None, v))
                for k, v in event_dict.items()}


REDACTOR = Redactor()


def _orjson_dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Set up structlog for the process (LOG_LEVEL / LOG_FORMAT)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: Any = structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else \
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            REDACTOR,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


_LIBRARY_LOGGERS = ("aiohttp", "asyncio")  # aiohttp.server, .access, .web, .internal, ... propagate to "aiohttp"
_QUOTED = re.compile(r"""b?'[^']*'?|b?"[^"]*"?""")  # where aiohttp's messages quote what the caller sent


class LibraryLogHandler(logging.Handler):
    """Writes aiohttp's and asyncio's stdlib log records as structlog lines, one line per record.

    A caller's malformed request (an `HttpProcessingError`) is logged by what was wrong, never by
    the bytes: aiohttp's message quotes the offending line, an Authorization value included, and
    its traceback says nothing about the proxy. Other exceptions keep their traceback, as one field.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            level = record.levelno
            error = record.exc_info[1] if record.exc_info else None
            if isinstance(error, HttpProcessingError):
                level = min(level, logging.WARNING)  # the caller's mistake, not the proxy's
                fields.update(kind="bad_request", error=type(error).__name__, status=error.code,
                              detail=_what_was_wrong(error))
            elif record.exc_info:
                fields["exc_info"] = record.exc_info
            structlog.get_logger("resilience-proxy").log(level, record.getMessage(), **fields)
        except Exception:
            self.handleError(record)


def _what_was_wrong(error: HttpProcessingError) -> str:
    """The first line of aiohttp's message with whatever it quotes of the request left out."""
    first = str(error.message).split("\n", 1)[0].rstrip(": ")
    return _QUOTED.sub("…", first)[:200]


def route_library_logs(level: str = "info") -> None:
    """Send aiohttp's and asyncio's loggers through structlog (LOG_LEVEL applies); idempotent."""
    numeric = logging.getLevelName(level.upper())
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, LibraryLogHandler)]:
            logger.removeHandler(handler)
        logger.addHandler(LibraryLogHandler())
        logger.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
        logger.propagate = False  # else the root logger's last-resort handler prints it again


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_STRUCTLOG_CONFIG = getattr(getattr(structlog, "_config", None), "_CONFIG", None)  # configure() mutates it in place


def _wrapper_class() -> Any:
    if _STRUCTLOG_CONFIG is not None:
        return _STRUCTLOG_CONFIG.default_wrapper_class  # read per event: get_config() builds a dict
    return structlog.get_config()["wrapper_class"]


_INFO_ENABLED: dict[Any, bool] = {}


def info_enabled() -> bool:
    """Whether the configured structlog wrapper writes info lines (a filtering logger below warning)."""
    wrapper = _wrapper_class()
    enabled = _INFO_ENABLED.get(wrapper)
    if enabled is None:
        method = getattr(wrapper, "info", None)
        enabled = _INFO_ENABLED[wrapper] = getattr(method, "__name__", "info") != "_nop"
    return enabled


# Events whose only line is at info level: skipped whole (no formatting) when info is filtered out.
_INFO_ONLY = frozenset({"RequestFinished", "RequestRefused", "RetryScheduled"})


def _trace_id(trace: Any) -> str | None:
    """The trace id a request's line carries (given explicitly: held lines are written outside the
    request's context, where structlog's contextvars hold another request's id or none)."""
    return trace.trace_id if trace is not None else None


# A stale copy answering over and over for one key (an outage, a slow vendor) is logged once a minute.
STALE_LOG_INTERVAL = 60.0
_STALE_KEYS_MAX = 4096


class EventLog:
    """Turns chain events into log lines."""

    def __init__(self, logger: Any | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._log = logger or structlog.get_logger("resilience-proxy")
        self._own_logger = logger is None  # a given logger may filter differently: always call it
        self._handlers: dict[type, Any] = {}
        self._clock = clock
        self._stale_logged: dict[str, float] = {}  # cache key -> when its stale line was last written

    def quiet_for_requests(self) -> bool:
        """True when a proxied request's line would be filtered out (the level is above info)."""
        return self._own_logger and not info_enabled()

    def __call__(self, event: Any) -> None:
        kind = type(event)
        handler = self._handlers.get(kind)
        if handler is None:
            handler = self._handlers[kind] = getattr(self, "_" + kind.__name__, False)
        if handler is False:
            return
        if self._own_logger and kind.__name__ in _INFO_ONLY and not info_enabled():
            return
        if kind is signals.AttemptFinished and self._own_logger and event.outcome in ("success", "client_error") \
                and not info_enabled():
            return
        handler(event)

    def _BreakerFailure(self, e: signals.BreakerFailure) -> None:
        self._log.warning(f"Circuit breaker: FAILURE for {e.provider}, error count: {e.failures}/{e.threshold}",
                          kind="breaker", service=e.service, provider=e.provider, failures=e.failures, threshold=e.threshold)

    def _BreakerTransition(self, e: signals.BreakerTransition) -> None:
        fields = dict(kind="breaker", service=e.service, provider=e.provider, old=e.old, new=e.new, reason=e.reason)
        if e.reason == "fleet":
            self._log.warning(f"Circuit breaker: {e.new} for {e.provider}, as another replica decided "
                              f"(shared breaker)", retry_at=iso(e.retry_at), **fields)
        elif e.reason == "probe_elsewhere":
            self._log.info(f"Circuit breaker: another replica probes {e.provider}; skipped until it tells the "
                           f"outcome, at most until {iso(e.retry_at)}", retry_at=iso(e.retry_at), **fields)
        elif e.new == "OPEN" and e.reason == "forced":
            self._log.warning(f"Circuit breaker: FORCED OPEN for {e.provider}, until reset", **fields)
        elif e.new == "OPEN":
            self._log.error(f"Circuit breaker: OPENED for {e.provider}, will retry after {iso(e.retry_at)}",
                            retry_at=iso(e.retry_at), failures=e.failures, threshold=e.threshold, **fields)
        elif e.new == "HALF_OPEN":
            self._log.info(f"Circuit breaker: HALF_OPEN for {e.provider}, sending probes", **fields)
        elif e.reason == "reset":
            self._log.warning(f"Circuit breaker: RESET for {e.provider}, circuit reset to CLOSED by an operator", **fields)
        else:
            self._log.info(f"Circuit breaker: SUCCESS for {e.provider}, circuit reset to CLOSED", **fields)

    def _AttemptFinished(self, e: signals.AttemptFinished) -> None:
        level = self._log.info if e.outcome in ("success", "client_error") else self._log.warning
        level("upstream attempt", kind="attempt", service=e.service, provider=e.provider, outcome=e.outcome,
              status=e.status, duration_ms=round(e.duration * 1000, 2), attempt=e.attempt, method=e.method,
              url=str(e.url), request_id=e.request_id, error=e.error, trace_id=_trace_id(e.trace))

    def _RetryScheduled(self, e: signals.RetryScheduled) -> None:
        self._log.info(f"Retrying {e.provider} in {e.delay * 1000:.0f}ms (attempt {e.attempt})", kind="retry",
                       service=e.service, provider=e.provider, attempt=e.attempt, delay_ms=round(e.delay * 1000, 1),
                       request_id=e.request_id)

    def _RetryBudgetExhausted(self, e: signals.RetryBudgetExhausted) -> None:
        self._log.warning(f"Retry budget exhausted for {e.provider}, not retrying", kind="retry_budget",
                          service=e.service, provider=e.provider, request_id=e.request_id)

    def _KeySpent(self, e: signals.KeySpent) -> None:
        then = "rotating to the next key" if e.keys_left else "no key left: the upstream is skipped until one rests enough"
        origin = " (learnt from another replica)" if e.shared else ""
        why = f"{e.status}: {e.reason}" if e.reason else e.status
        self._log.warning(f"API key {e.fingerprint} for {e.provider} refused ({why}), resting until "
                          f"{iso(e.until)}{origin}; {then}", kind="api_key", service=e.service, provider=e.provider,
                          key=e.fingerprint, status=e.status, reason=e.reason, until=iso(e.until),
                          keys_left=e.keys_left, shared=e.shared)

    def _StaleServed(self, e: signals.StaleServed) -> None:
        now = e.at if e.at is not None else self._clock.monotonic()  # held: it may be delivered a little later
        key = e.key or f"{e.service} {e.path}"
        last = self._stale_logged.get(key)
        if last is not None and now - last < STALE_LOG_INTERVAL:
            return  # counted in stale_served_total; the line was written less than a minute ago
        if len(self._stale_logged) >= _STALE_KEYS_MAX:
            self._stale_logged = {k: t for k, t in self._stale_logged.items() if now - t < STALE_LOG_INTERVAL}
            if len(self._stale_logged) >= _STALE_KEYS_MAX:
                self._stale_logged.clear()
        self._stale_logged[key] = now
        self._log.warning(f"Using stale cache for {e.service} {e.path}, age: {int(e.age)}s", kind="stale",
                          service=e.service, path=e.path, age=int(e.age), upstream=e.upstream, reason=e.reason,
                          detail=e.detail, request_id=e.request_id, trace_id=_trace_id(e.trace))

    def _UpstreamRested(self, e: signals.UpstreamRested) -> None:
        origin = " (learnt from another replica)" if e.shared else ""
        self._log.warning(f"Provider {e.provider} rests (Retry-After, or its only API key refused): skipped "
                          f"until {iso(e.until)}{origin}", kind="rest", service=e.service, provider=e.provider,
                          until=iso(e.until), shared=e.shared)

    def _CacheBackendState(self, e: signals.CacheBackendState) -> None:
        if e.connected:
            self._log.info(f"Cache backend {e.backend} is available", kind="cache_backend", backend=e.backend)
        else:
            self._log.error(f"Cache backend {e.backend} is unavailable, serving without it", kind="cache_backend",
                            backend=e.backend, error=e.error)

    def _FleetLinkChanged(self, e: signals.FleetLinkChanged) -> None:
        if e.connected:
            self._log.info("Fleet link to Redis is up: shared breakers and rests follow the fleet", kind="fleet",
                           shared_breakers=e.shared_breakers)
        else:
            what = f"its local breakers ({e.shared_breakers} set shared) and rests" if e.shared_breakers else "its own rests"
            self._log.error(f"Fleet link to Redis is down: each replica uses {what} until it is back", kind="fleet",
                            shared_breakers=e.shared_breakers, error=e.error)

    def _RequestFinished(self, e: signals.RequestFinished) -> None:
        self._log.info("request", kind="request", service=e.service, route=e.route, method=e.method, path=e.path,
                       status=e.status, x_cache=e.cache, upstream=e.upstream,
                       attempts=[{"upstream": u, "outcome": o} for u, o in e.attempts],
                       duration_ms=round(e.duration * 1000, 2), request_id=e.request_id, client=e.client,
                       bytes_in=e.bytes_in, bytes_out=e.bytes_out, trace_id=_trace_id(e.trace))

    def _RequestRefused(self, e: signals.RequestRefused) -> None:
        self._log.info("request refused", kind="request", service=e.service, method=e.method, path=e.path,
                       status=e.status, error=e.error, x_cache="BYPASS", duration_ms=round(e.duration * 1000, 2),
                       request_id=e.request_id, client=e.client, bytes_in=0, trace_id=_trace_id(e.trace))

    def _ConfigReloaded(self, e: signals.ConfigReloaded) -> None:
        if e.ok:
            self._log.info("Route table reloaded", kind="reload", source=e.source)
        else:
            self._log.error("Route table rejected, the previous one keeps serving", kind="reload", source=e.source,
                            problems=list(e.errors))
