"""W3C trace context for each proxied request: parsed from the caller, passed to the upstreams.

A caller's valid `traceparent` is kept (its trace id goes to our log lines and to the upstream);
a malformed one is never forwarded: the request starts a new trace, and its `tracestate` is
dropped with it (the W3C rule). Without one, each request starts a trace of its own, so the
upstream's logs and ours share an id. When spans are exported (`tracing.otlp_endpoint`), the
upstream's parent is our request span; otherwise a caller's header goes through unchanged.

Only this module parses the headers; nothing here imports OpenTelemetry (see `otlp`).
"""

from __future__ import annotations

import re
import time
from random import getrandbits
from typing import Any

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACESTATE_MAX = 512      # characters a vendor must pass on (W3C trace-context, "tracestate limits")
_TRACESTATE_MEMBERS = 32
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def new_trace_id() -> str:
    """32 lowercase hex digits, never all zero (W3C); random, like a caller's."""
    return f"{getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{getrandbits(64) or 1:016x}"


def _new_ids() -> tuple[str, str]:
    """A trace id and a span id from one draw (a request starting a trace needs both)."""
    ids = f"{getrandbits(192):048x}"
    trace_id, span_id = ids[:32], ids[32:]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return new_trace_id(), new_span_id()
    return trace_id, span_id


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags) of a valid `traceparent`, or None.

    Version 00 must be exactly 55 characters; a later version may carry more after a `-`
    (W3C: parse what version 00 defines, keep the rest out); version ff is invalid.
    """
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    return trace_id, parent_id, int(flags, 16)


def valid_tracestate(value: str) -> bool:
    """A `tracestate` we may pass on: printable ASCII, at most 512 characters and 32 members."""
    if len(value) > _TRACESTATE_MAX or not value.isascii() or not value.isprintable():
        return False
    return value.count(",") < _TRACESTATE_MEMBERS


class Trace:
    """One request's trace context: ids for the log lines, headers for the upstream, span timing."""

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "state", "header", "wall_ns", "started", "lookup")

    def __init__(self, trace_id: str, span_id: str | None, parent_id: str | None, sampled: bool,
                 state: str | None, header: str) -> None:
        self.trace_id = trace_id
        self.span_id = span_id      # our request span, when we are a hop of the trace
        self.parent_id = parent_id  # the caller's span, if it sent one
        self.sampled = sampled
        self.state = state          # tracestate passed on (None: none, or dropped as invalid)
        self.header = header        # the traceparent the upstreams get
        self.wall_ns = 0            # wall-clock start, set only when spans are exported
        self.started = 0.0          # the request's start on the runtime clock (monotonic)
        self.lookup: tuple[float, float] | None = None  # the cache lookup's start and end, same clock

    def apply(self, headers: Any) -> None:
        """Put this trace's headers on an upstream request (replacing whatever the caller sent)."""
        headers["traceparent"] = self.header
        if self.state:
            headers["tracestate"] = self.state
        else:
            headers.popall("tracestate", None)


def start_trace(traceparent: str | None, tracestate: str | None, *, recording: bool) -> Trace:
    """The trace of a request whose caller sent these header values (None: absent).

    `recording`: spans are exported, so we are a hop: the upstream's parent is our span.
    """
    parsed = parse_traceparent(traceparent) if traceparent else None
    if parsed is None:
        trace_id, span_id = _new_ids()
        return Trace(trace_id, span_id, None, recording, None, f"00-{trace_id}-{span_id}-{'01' if recording else '00'}")
    trace_id, parent_id, flags = parsed
    state = tracestate if tracestate and valid_tracestate(tracestate) else None
    sampled = bool(flags & 1)
    if recording:
        span_id = new_span_id()
        return Trace(trace_id, span_id, parent_id, sampled, state, f"00-{trace_id}-{span_id}-{flags:02x}")
    # Not a hop of the trace: the caller's context goes on as it came (as version 00).
    header = traceparent if len(traceparent) == 55 and traceparent.startswith("00-") else \
        f"00-{trace_id}-{parent_id}-{flags:02x}"
    return Trace(trace_id, None, parent_id, sampled, state, header)


def trace_of(headers: Any, *, recording: bool) -> Trace:
    """`start_trace` from a request's headers; two `traceparent` headers count as a malformed one."""
    parents = headers.getall("traceparent", ())
    states = headers.getall("tracestate", ())
    traceparent = parents[0] if len(parents) == 1 else ("" if parents else None)
    return start_trace(traceparent, ",".join(states) if states else None, recording=recording)


def stamp(trace: Trace, started: float) -> None:
    """Record when the request started (wall clock for the spans, runtime clock for offsets)."""
    trace.wall_ns = time.time_ns()
    trace.started = started
