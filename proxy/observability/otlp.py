"""Spans over OTLP/HTTP through the OpenTelemetry SDK (`pip install resilience-proxy[otel]`).

Imported only when `tracing.otlp_endpoint` is set. `SpanExport` is an event-bus subscriber
that turns a request's events into spans after the fact: the request (server span, its id
the parent the upstreams were given), each upstream attempt (client spans) and the cache
lookup. The SDK's batch processor sends them from its own thread; nothing here runs on the
request's path beyond the events the proxy emits anyway. A caller that sent a trace it does
not sample (flags 00) gets no spans exported (parent-based sampling).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

import proxy
from proxy import signals
from proxy.observability.tracing import Trace, new_span_id

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NS = 1_000_000_000


class SpanExport:
    """Bus subscriber: request, attempt and cache-lookup spans, batched to an OTLP/HTTP collector."""

    sees_requests = True

    def __init__(self, endpoint: str, service_name: str, *, exporter: SpanExporter | None = None,
                 schedule_delay_millis: float = 1000.0) -> None:
        self.endpoint = endpoint
        self._processor = BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=endpoint, timeout=5),
                                             schedule_delay_millis=schedule_delay_millis)
        self._resource = Resource.create({"service.name": service_name, "service.version": proxy.__version__})
        self._scope = InstrumentationScope("resilience-proxy", proxy.__version__)

    def __call__(self, event: Any) -> None:
        kind = type(event)
        if kind is signals.RequestFinished:
            self._request(event)
        elif kind is signals.AttemptFinished:
            self._attempt(event)
        elif kind is signals.RequestRefused:
            self._refused(event)

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        return self._processor.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Send what is queued and stop the exporting thread (blocking: call it off the loop)."""
        self._processor.shutdown()

    # --- spans ---

    def _span(self, trace: Trace, name: str, span_id: str, parent_id: str | None, kind: SpanKind,
              start_ns: int, end_ns: int, attributes: dict[str, Any], error: bool) -> None:
        context = SpanContext(int(trace.trace_id, 16), int(span_id, 16), is_remote=False, trace_flags=_SAMPLED)
        parent = SpanContext(int(trace.trace_id, 16), int(parent_id, 16), is_remote=parent_id == trace.parent_id,
                             trace_flags=_SAMPLED) if parent_id else None
        span = ReadableSpan(
            name, context=context, parent=parent, resource=self._resource,
            attributes={k: v for k, v in attributes.items() if v is not None}, kind=kind,
            status=Status(StatusCode.ERROR) if error else Status(StatusCode.UNSET),
            start_time=start_ns, end_time=max(end_ns, start_ns), instrumentation_scope=self._scope)
        self._processor.on_end(span)

    @staticmethod
    def _recorded(trace: Any) -> bool:
        return isinstance(trace, Trace) and trace.span_id is not None and trace.wall_ns > 0 and trace.sampled

    def _at(self, trace: Trace, monotonic: float) -> int:
        """A runtime-clock time as wall-clock nanoseconds, from the request's start."""
        return trace.wall_ns + int((monotonic - trace.started) * _NS)

    def _request(self, e: signals.RequestFinished) -> None:
        trace = e.trace
        if not self._recorded(trace):
            return
        start = trace.wall_ns
        self._span(trace, f"{e.method} {e.route}", trace.span_id, trace.parent_id, SpanKind.SERVER, start,
                   start + int(e.duration * _NS),
                   {"http.request.method": e.method, "http.route": e.route, "url.path": e.path,
                    "http.response.status_code": e.status, "client.address": e.client,
                    "proxy.service": e.service, "proxy.cache": e.cache, "proxy.upstream": e.upstream,
                    "proxy.request_id": e.request_id, "proxy.fallback": e.fallback}, e.status >= 500)
        if trace.lookup is not None:
            looked, done = trace.lookup
            self._span(trace, "cache lookup", new_span_id(), trace.span_id, SpanKind.INTERNAL,
                       self._at(trace, looked), self._at(trace, done),
                       {"proxy.service": e.service, "proxy.cache": e.cache}, False)

    def _attempt(self, e: signals.AttemptFinished) -> None:
        trace = e.trace
        if not self._recorded(trace) or e.ended is None:
            return
        end = self._at(trace, e.ended)
        self._span(trace, f"{e.method} {e.provider}", new_span_id(), trace.span_id, SpanKind.CLIENT,
                   end - int(e.duration * _NS), end,
                   {"http.request.method": e.method, "url.full": str(e.url), "http.response.status_code": e.status,
                    "proxy.service": e.service, "proxy.upstream": e.provider, "proxy.outcome": e.outcome,
                    "proxy.attempt": e.attempt, "error.type": e.error[:200] if e.error else None},
                   e.outcome not in ("success", "client_error"))

    def _refused(self, e: signals.RequestRefused) -> None:
        trace = e.trace
        if not self._recorded(trace):
            return
        start = trace.wall_ns
        self._span(trace, f"{e.method} (no route)" if e.status == 404 else f"{e.method} (refused)", trace.span_id,
                   trace.parent_id, SpanKind.SERVER, start, start + int(e.duration * _NS),
                   {"http.request.method": e.method, "http.response.status_code": e.status,
                    "client.address": e.client, "proxy.error": e.error, "proxy.request_id": e.request_id}, False)
