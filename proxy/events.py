"""Small frozen records that the proxy's stages emit, and the bus that carries them.

The breaker, retry, cache and pipeline code only emit these; metrics, stats and logs
subscribe to them. That is why no resilience module imports prometheus_client or structlog.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

Subscriber = Callable[[Any], None]


class EventBus:
    """Fan-out of events to subscribers; a failing subscriber never breaks a request.

    Events are delivered at once, except the types given as `later`: those wait for the
    callbacks the loop already has due, so that counting and logging a request runs after
    the answers ready in the same burst have been written, not before them. Order is kept:
    any other event delivers the waiting ones first. Without a running loop, all is at once.
    """

    __slots__ = ("_subscribers", "_errors", "version", "_later", "_waiting", "_scheduled_on")

    def __init__(self, later: frozenset[type] = frozenset()) -> None:
        self._subscribers: list[Subscriber] = []
        self._errors = 0
        self.version = 0  # changes whenever the subscriber list does (fast paths cache decisions on it)
        self._later = later
        self._waiting: list[Any] = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None  # the loop a delivery turn is due on

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)
        self.version += 1

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)
            self.version += 1

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        return tuple(self._subscribers)

    def emit(self, event: Any) -> None:
        if type(event) in self._later:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: nothing to wait for
                loop = None
            if loop is not None:
                if self._scheduled_on is not loop:
                    loop.call_soon(self._turn)
                    self._scheduled_on = loop
                self._waiting.append(event)
                return
        if self._waiting:
            self.deliver_waiting()
        self._deliver(event)

    def _turn(self) -> None:
        self._scheduled_on = None
        self.deliver_waiting()

    def deliver_waiting(self) -> None:
        """Deliver the events held back by `later`, in the order they were emitted."""
        while self._waiting:
            waiting, self._waiting = self._waiting, []
            for index, event in enumerate(waiting):
                try:
                    self._deliver(event)
                except BaseException:  # interrupted (not a subscriber's error): keep the rest for later
                    self._waiting[:0] = waiting[index + 1:]
                    raise

    def _deliver(self, event: Any) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:  # observability must never take a request down
                self._errors += 1

    @property
    def subscriber_errors(self) -> int:
        return self._errors


def discard(event: Any) -> None:
    """An `emit` for code built without a bus (unit tests of pure cores)."""


# --- circuit breaker -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BreakerFailure:
    """A failure was recorded while CLOSED: `error count: failures/threshold`."""
    service: str
    provider: str
    failures: int
    threshold: int


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """The breaker changed state. `retry_at` is wall-clock epoch seconds when it opened."""
    service: str
    provider: str
    old: str
    new: str
    reason: str           # threshold | failure_rate | slow_call_rate | probe_failed | probe_succeeded | timeout_elapsed | forced | reset
    failures: int = 0
    threshold: int = 0
    retry_at: float | None = None


# --- upstream attempts, retries, fallback ---------------------------------------------

@dataclass(frozen=True, slots=True)
class AttemptFinished:
    """One upstream attempt ended (the original design's external call log)."""
    service: str
    provider: str
    outcome: str          # an Outcome value
    status: int | None
    duration: float       # seconds
    attempt: int          # 1 for the first try on this upstream
    method: str
    url: Any              # the upstream URL with secret query values masked, as `str(url)` gives it
    request_id: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    service: str
    provider: str
    attempt: int          # the attempt about to be made (2 = first retry)
    delay: float
    request_id: str


@dataclass(frozen=True, slots=True)
class RetryBudgetExhausted:
    service: str
    provider: str
    request_id: str


@dataclass(frozen=True, slots=True)
class UpstreamSkipped:
    """An upstream was not called: breaker open, half-open probes busy, rate limited, no time left."""
    service: str
    provider: str
    reason: str
    request_id: str


@dataclass(frozen=True, slots=True)
class KeySpent:
    """An upstream refused an API key (quota or auth); the next key is used until `until`."""
    service: str
    provider: str
    fingerprint: str      # never the key itself
    status: int
    until: float          # wall-clock epoch seconds
    keys_left: int


# --- cache ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CacheLookup:
    service: str
    result: str           # hit | miss | stale | bypass
    age: float | None = None


@dataclass(frozen=True, slots=True)
class StaleServed:
    """A stale copy answered because upstreams could not (`Using stale cache for ...`)."""
    service: str
    path: str
    age: float
    upstream: str
    reason: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Coalesced:
    """A request waited for an identical in-flight one instead of calling upstream."""
    service: str


@dataclass(frozen=True, slots=True)
class CacheBackendState:
    """The cache backend went up or down (logged once per change, not per request)."""
    backend: str
    connected: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CacheError:
    backend: str
    operation: str
    error: str


# --- requests and config ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RequestFinished:
    """One proxied request was answered."""
    service: str
    route: str
    method: str
    path: str             # without the query string
    status: int
    cache: str            # HIT | MISS | STALE | BYPASS
    upstream: str | None
    attempts: tuple[tuple[str, str], ...]
    duration: float
    request_id: str
    fallback: bool = False  # served by a non-primary upstream or by a stale copy


@dataclass(frozen=True, slots=True)
class ConfigReloaded:
    ok: bool
    source: str           # sighup | file_change | admin
    errors: tuple[str, ...] = field(default_factory=tuple)


# --- watch events and their delivery ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WatchEventEmitted:
    """A watched topic changed; the event is in the outbox."""
    service: str
    route: str
    evt_id: str


@dataclass(frozen=True, slots=True)
class TopicSubscribers:
    route: str
    topic: str
    count: int


@dataclass(frozen=True, slots=True)
class EventDelivered:
    channel: str          # ws | webhook
    route: str
    redelivery: bool = False


@dataclass(frozen=True, slots=True)
class EventAcked:
    channel: str
    route: str


@dataclass(frozen=True, slots=True)
class EventDeadLettered:
    route: str
    evt_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ClientDropped:
    """A WebSocket client fell too far behind and was disconnected (it may resume with last_evt_id)."""
    reason: str


@dataclass(frozen=True, slots=True)
class OutboxState:
    """Reported every few seconds: the outbox's length and the oldest unacknowledged event's age."""
    length: int | None
    oldest_unacked_age: float | None


# Counted and logged once the answers due in the same loop turn are out (`EventBus(later=...)`).
PER_REQUEST = frozenset({AttemptFinished, CacheLookup, RequestFinished})
