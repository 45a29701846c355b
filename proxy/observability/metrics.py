"""Prometheus metrics, fed by the proxy's events.

`Metrics` is an event-bus subscriber; it and `exposition` (build and process facts, the name
prefix) are the only modules that import prometheus_client. Label values come from event fields
that the route table names (service, route, upstream, outcome, ...), never from a request path,
so the number of series stays bounded by the config.
"""

from __future__ import annotations

import enum
import math
import threading
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

from proxy import signals
from proxy.clock import Clock
from proxy.observability.exposition import Exposition, add_runtime_collectors
from proxy.observability.pending import HitWindow, Labelled, Pending, add_observations
from proxy.resilience.outcome import NOT_ERRORS, Outcome

# From 5 ms (a cache-warm upstream on the same network) up to 30 s (the longest sensible deadline).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0)
# A whole proxied request starts far lower: a HIT is answered in well under a millisecond.
PROXY_DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025) + DURATION_BUCKETS
# Ages of stale copies served: 1 minute up to the 7 days `max_stale` allows.
STALE_AGE_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0,
                     86400.0, 2 * 86400.0, 3 * 86400.0, 7 * 86400.0)
BREAKER_STATES = ("CLOSED", "OPEN", "HALF_OPEN")

# Attempt outcomes that are not errors of the provider: an answer passed on, or the caller's own mistake.
_ANSWERED = frozenset(o.value for o in NOT_ERRORS)


def _text(value: Any) -> str:
    """A label value; an enum member gives its value, not `Outcome.SUCCESS`."""
    if type(value) is str:
        return value
    return value.value if isinstance(value, enum.Enum) else str(value)


class _Flusher(Collector):
    """Registered first in the registry: any collection folds pending fast-path counts in first."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def collect(self) -> Any:
        self._flush()
        return iter(())


class Metrics:
    """Prometheus metrics for the proxy; call it with any event (`bus.subscribe(metrics)`).

    Each instance owns a registry (never the process-global one), so tests and several
    instances in one process do not collide. Unknown event types are ignored.

    `cache_hit_rate{service}` is the percentage of *hits* among the service's cache lookups in
    the last 5 minutes (monotonic clock, one-second slots). Stale answers count as lookups but
    not as hits (an operator reading "hit rate" means fresh answers); `bypass` lookups are not
    counted at all (they could never have hit). With no counted lookups in the window the series
    is removed rather than kept at an old value or set to 0, 100 or NaN: an idle service has no
    hit rate, `cache_hit_rate < 50` then neither fires nor stays firing on stale data, and a
    dashboard shows "no data". The value is recomputed on every lookup and on every `render()`,
    so it ages out when traffic stops.
    """

    def __init__(self, clock: Clock, registry: CollectorRegistry | None = None, *, prefix: str = "",
                 runtime_collectors: bool = True) -> None:
        self._clock = clock
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._pending: Pending | None = None
        self._hit_lock = threading.RLock()  # render() may run on a scrape thread
        r.register(_Flusher(self.flush))
        if runtime_collectors:
            add_runtime_collectors(r)
        self.exposition = Exposition(r, prefix)
        sp = ("service", "provider")

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Labelled:
            return Labelled(Counter(name, doc, labels, registry=r))

        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Labelled:
            return Labelled(Gauge(name, doc, labels, registry=r))

        self._requests = counter("external_requests_total", "Upstream attempts by outcome.", sp + ("outcome",))
        self._errors = counter("external_request_errors_total",
                               "Upstream attempts that failed (not 2xx/3xx/4xx), by reason.", sp + ("reason",))
        self._duration = Labelled(Histogram("external_request_duration_seconds", "Duration of one upstream attempt.",
                                            sp, buckets=DURATION_BUCKETS, registry=r), DURATION_BUCKETS)
        self._skipped = counter("upstream_skipped_total",
                                "Upstreams not called (breaker open, no time left, ...), by reason.", sp + ("reason",))
        self._breaker_open = gauge("circuit_breaker_open", "1 while the upstream's breaker is OPEN, else 0.", sp)
        self._breaker_state = gauge("circuit_breaker_state", "The breaker's state, one-hot.", sp + ("state",))
        self._transitions = counter("circuit_breaker_transitions_total", "Breaker state changes, by new state.",
                                    sp + ("to",))
        self._retries = counter("retries_total", "Retries scheduled on an upstream.", sp)
        self._budget_exhausted = counter("retry_budget_exhausted_total",
                                         "Retries refused because the upstream's retry budget was spent.", sp)
        self._keys_spent = counter("api_key_rotations_total",
                                   "API keys an upstream refused (quota or auth), each rotated to the next key.", sp)
        self._fallbacks = counter("fallbacks_total",
                                  "Requests served by a non-primary upstream or by a stale copy.", sp)
        self._cache_requests = counter("cache_requests_total", "Cache lookups by result.", ("service", "result"))
        self._hit_rate = gauge("cache_hit_rate", "Percent of cache lookups that hit, last 5 minutes.", ("service",))
        self._stale_served = counter("stale_served_total",
                                     "Stale copies served, by reason: error, timeout, breaker_open (upstreams failed "
                                     "or were all skipped), slow (the refresh took longer than stale_if_slow), "
                                     "revalidating (a refresh was under way).", ("service", "reason"))
        self._stale_age = Labelled(Histogram("stale_served_age_seconds", "Age of the stale copies served.",
                                             ("service",), buckets=STALE_AGE_BUCKETS, registry=r))
        self._hedges = counter("hedges_total", "Late attempts hedged to the next upstream, by which answered first "
                                               "(hedge, original or none).", sp + ("winner",))
        self._rests = counter("upstream_rests_total", "Rests an upstream asked for with Retry-After (429/503).", sp)
        self._rest_until = gauge("upstream_rest_until_seconds",
                                 "Wall-clock time until which the upstream rests, as its Retry-After asked "
                                 "(in the past, or 0: not resting).", sp)
        self._coalesced = counter("coalesced_requests_total",
                                  "Requests that waited for an identical in-flight request.", ("service",))
        self._proxy_requests = counter("proxy_requests_total",
                                       "Requests answered on the proxy port (refusals included), by status code, "
                                       "route (none: no route took it) and cache result.",
                                       ("service", "route", "code", "cache"))
        self._proxy_duration = Labelled(Histogram("proxy_request_duration_seconds",
                                                  "Duration of one proxied request, retries and fallback included.",
                                                  ("service",), buckets=PROXY_DURATION_BUCKETS, registry=r),
                                        PROXY_DURATION_BUCKETS)
        self._backend_up = gauge("cache_backend_up", "1 while the cache backend is reachable.", ("backend",))
        self._cache_errors = counter("cache_errors_total", "Cache backend errors by operation.",
                                     ("backend", "operation"))
        self._events_emitted = counter("events_emitted_total", "Watch events written to the outbox.", ("service", "route"))
        self._event_deliveries = counter("event_deliveries_total", "Watch events sent (first sends), by channel.",
                                         ("channel", "route"))
        self._event_redeliveries = counter("event_redeliveries_total", "Watch events sent again for want of an ack.",
                                           ("channel", "route"))
        self._event_acks = counter("event_acks_total", "Watch events acknowledged (WebSocket ack or webhook 2xx).",
                                   ("channel", "route"))
        self._event_dead = counter("event_dead_letters_total", "Webhook events moved to the dead-letter stream.",
                                   ("route",))
        self._clients_dropped = counter("event_clients_dropped_total",
                                        "WebSocket clients disconnected for falling behind.", ("reason",))
        self._subscribers = gauge("event_subscribers", "WebSocket subscriptions per watched route.", ("route",))
        self._outbox_length = Gauge("outbox_length", "Events in the outbox stream.", registry=r)
        self._oldest_unacked = Gauge("outbox_oldest_unacked_age_seconds",
                                     "Age of the oldest event a WebSocket client has not acknowledged.", registry=r)
        self._topic_counts: dict[tuple[str, str], int] = {}
        self._reloads = counter("config_reloads_total", "Route table reloads by result.", ("result",))
        self._last_reload = Gauge("config_last_reload_success_timestamp_seconds",
                                  "Wall-clock time of the last successful reload.", registry=r)
        self._reloads("ok")
        self._reloads("error")

        self._by_provider = (self._requests, self._errors, self._duration, self._skipped, self._breaker_open,
                             self._breaker_state, self._transitions, self._retries, self._budget_exhausted,
                             self._fallbacks, self._keys_spent, self._hedges, self._rests, self._rest_until)
        self._by_service = self._by_provider + (self._cache_requests, self._hit_rate, self._stale_served,
                                                self._stale_age, self._coalesced, self._proxy_requests,
                                                self._proxy_duration)
        self._hit_windows: dict[str, HitWindow] = {}
        # Taken out by a reload: requests still finishing on the old table must not bring their series back.
        self._forgotten_providers: set[tuple[str, str]] = set()
        self._forgotten_services: set[str] = set()
        self._handlers: dict[type, Callable[[Any], None]] = {
            signals.AttemptFinished: self._attempt_finished,
            signals.UpstreamSkipped: self._upstream_skipped,
            signals.BreakerTransition: self._breaker_transition,
            signals.RetryScheduled: self._retry_scheduled,
            signals.RetryBudgetExhausted: self._retry_budget_exhausted,
            signals.KeySpent: self._key_spent,
            signals.CacheLookup: self._cache_lookup,
            signals.StaleServed: self._stale_served_event,
            signals.HedgeRaced: lambda e: self._hedges(e.service, e.provider, e.winner).inc(),
            signals.UpstreamRested: self._upstream_rested,
            signals.Coalesced: self._coalesced_event,
            signals.RequestFinished: self._request_finished,
            signals.RequestRefused: self._request_refused,
            signals.CacheBackendState: self._backend_state,
            signals.CacheError: self._cache_error,
            signals.ConfigReloaded: self._config_reloaded,
            signals.WatchEventEmitted: lambda e: self._events_emitted(e.service, e.route).inc(),
            signals.EventDelivered: self._event_delivered,
            signals.EventAcked: lambda e: self._event_acks(e.channel, e.route).inc(),
            signals.EventDeadLettered: lambda e: self._event_dead(e.route).inc(),
            signals.ClientDropped: lambda e: self._clients_dropped(e.reason).inc(),
            signals.TopicSubscribers: self._topic_subscribers,
            signals.OutboxState: self._outbox_state,
        }

    def __call__(self, event: Any) -> None:
        handler = self._handlers.get(type(event))
        if handler is None:
            return
        if (self._forgotten_providers or self._forgotten_services) and self._forgotten(event):
            return
        handler(event)

    def _forgotten(self, event: Any) -> bool:
        service = getattr(event, "service", None)
        if service in self._forgotten_services:
            return True
        provider = getattr(event, "provider", None)
        return provider is not None and (service, provider) in self._forgotten_providers

    # --- lifecycle of label sets ------------------------------------------------------------

    def register_provider(self, service: str, provider: str, state: str | None = None) -> None:
        """Create the upstream's series at 0 with its breaker CLOSED (at start and after a reload).

        Series that already exist keep their values, so re-registering is harmless. Pass `state`
        (the breaker's current state) after a reload that replaced or kept a breaker, so the
        breaker gauges match it without waiting for the next transition.
        """
        self._forgotten_providers.discard((service, provider))
        self._forgotten_services.discard(service)
        if state is not None:
            self._set_breaker(service, provider, _text(state))
        elif (service, provider) not in self._breaker_open.children:
            self._set_breaker(service, provider, "CLOSED")
        for family in (self._retries, self._budget_exhausted, self._fallbacks, self._duration, self._rests,
                       self._rest_until):
            family(service, provider)
        self._requests(service, provider, Outcome.SUCCESS.value)

    def forget_provider(self, service: str, provider: str) -> None:
        """Remove every series of an upstream that a reload took out of the route table."""
        self.flush()  # pending counts would otherwise bring its series back
        key = (service, provider)
        self._forgotten_providers.add(key)
        for family in self._by_provider:
            family.drop(lambda labels: labels[:2] == key)

    def forget_service(self, service: str) -> None:
        """Remove every series of a service (and of its upstreams) that a reload took out."""
        self.flush()
        self._forgotten_services.add(service)
        for family in self._by_service:
            family.drop(lambda labels: labels[0] == service)
        with self._hit_lock:
            self._hit_windows.pop(service, None)

    # --- exposition ---------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type (hit rates refreshed first)."""
        self.flush()
        second = int(self._clock.monotonic())
        with self._hit_lock:
            for service in list(self._hit_windows):
                self._refresh_hit_rate(service, second)
        return generate_latest(self.exposition), CONTENT_TYPE_LATEST

    def hit_rate(self, service: str) -> float | None:
        """The service's `cache_hit_rate` right now, or None with no lookups in the last 5 minutes."""
        self.flush()
        with self._hit_lock:
            window = self._hit_windows.get(service)
            if window is None:
                return None
            window.expire(int(self._clock.monotonic()))
            return window.percent()

    # --- batched per-request counts ---------------------------------------------------------

    def _batch(self, monotonic_now: float) -> Pending:
        second = int(monotonic_now)
        pending = self._pending
        if pending is None or pending.second != second:
            if pending is not None:
                self.flush()
            pending = self._pending = Pending(second)
        return pending

    def record_hit(self, service: str, status: int, duration: float, monotonic_now: float, route: str) -> None:
        """What `CacheLookup(service, "hit")` + `RequestFinished(...)` of a HIT would count (the fast path)."""
        pending = self._batch(monotonic_now)
        pending.count(self._cache_requests, (service, "hit"))
        pending.lookup(service, True)
        pending.count(self._proxy_requests, (service, route, str(status), "hit"))
        pending.observe(self._proxy_duration, (service,), duration)

    def flush(self) -> None:
        """Fold the pending per-request counts into the Prometheus series."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        with self._hit_lock:
            for (family, labels), count in pending.counts.items():
                family(*labels).inc(count)
            for (family, labels), (buckets, total) in pending.histograms.items():
                add_observations(family(*labels), buckets, total, family.buckets)
            second = pending.second
            for service, (hits, lookups) in pending.lookups.items():
                window = self._hit_windows.get(service)
                if window is None:
                    window = self._hit_windows[service] = HitWindow()
                window.add(second, True, hits)
                if lookups > hits:
                    window.add(second, False, lookups - hits)
                self._refresh_hit_rate(service, second)

    # --- event handlers -------------------------------------------------------------------

    def _attempt_finished(self, e: signals.AttemptFinished) -> None:
        outcome = _text(e.outcome)
        pending = self._batch(self._clock.monotonic())
        pending.count(self._requests, (e.service, e.provider, outcome))
        if outcome not in _ANSWERED:
            pending.count(self._errors, (e.service, e.provider, outcome))
        pending.observe(self._duration, (e.service, e.provider), e.duration)

    def _upstream_skipped(self, e: signals.UpstreamSkipped) -> None:
        self._skipped(e.service, e.provider, _text(e.reason)).inc()

    def _breaker_transition(self, e: signals.BreakerTransition) -> None:
        new = _text(e.new)
        self._set_breaker(e.service, e.provider, new)
        self._transitions(e.service, e.provider, new).inc()

    def _set_breaker(self, service: str, provider: str, state: str) -> None:
        self._breaker_open(service, provider).set(1 if state == "OPEN" else 0)
        for known in BREAKER_STATES:
            self._breaker_state(service, provider, known).set(1 if known == state else 0)

    def _retry_scheduled(self, e: signals.RetryScheduled) -> None:
        self._retries(e.service, e.provider).inc()

    def _retry_budget_exhausted(self, e: signals.RetryBudgetExhausted) -> None:
        self._budget_exhausted(e.service, e.provider).inc()

    def _event_delivered(self, e: signals.EventDelivered) -> None:
        (self._event_redeliveries if e.redelivery else self._event_deliveries)(e.channel, e.route).inc()

    def _topic_subscribers(self, e: signals.TopicSubscribers) -> None:
        # Topics name flights and dates: kept here only to sum per route, never used as a label.
        self._topic_counts[(e.route, e.topic)] = e.count
        if e.count == 0:
            del self._topic_counts[(e.route, e.topic)]
        total = sum(n for (route, _), n in self._topic_counts.items() if route == e.route)
        self._subscribers(e.route).set(total)

    def _outbox_state(self, e: signals.OutboxState) -> None:
        if e.length is not None:
            self._outbox_length.set(e.length)
        self._oldest_unacked.set(e.oldest_unacked_age or 0.0)

    def _key_spent(self, e: signals.KeySpent) -> None:
        self._keys_spent(e.service, e.provider).inc()

    def _cache_lookup(self, e: signals.CacheLookup) -> None:
        result = _text(e.result)
        pending = self._batch(self._clock.monotonic())
        pending.count(self._cache_requests, (e.service, result))
        if result != "bypass":
            pending.lookup(e.service, result == "hit")

    def _refresh_hit_rate(self, service: str, second: int) -> None:
        window = self._hit_windows[service]
        window.expire(second)
        percent = window.percent()
        if percent is None:
            self._hit_rate.drop(lambda labels: labels == (service,))
        else:
            self._hit_rate(service).set(percent)

    def _upstream_rested(self, e: signals.UpstreamRested) -> None:
        self._rests(e.service, e.provider).inc()
        self._rest_until(e.service, e.provider).set(e.until)

    def _stale_served_event(self, e: signals.StaleServed) -> None:
        self._stale_served(e.service, _text(e.reason)).inc()
        if math.isfinite(e.age):
            self._stale_age(e.service).observe(max(e.age, 0.0))

    def _coalesced_event(self, e: signals.Coalesced) -> None:
        self._coalesced(e.service).inc()

    def _request_finished(self, e: signals.RequestFinished) -> None:
        pending = self._batch(self._clock.monotonic())
        pending.count(self._proxy_requests, (e.service, e.route, str(e.status), e.cache.lower()))
        pending.observe(self._proxy_duration, (e.service,), e.duration)
        if e.fallback and (e.service, e.upstream) not in self._forgotten_providers:
            # For a stale answer `upstream` is the one that produced the copy.
            pending.count(self._fallbacks, (e.service, e.upstream or "none"))

    def _request_refused(self, e: signals.RequestRefused) -> None:
        # The caller's path never becomes a label: a refusal no route took is counted under "none".
        pending = self._batch(self._clock.monotonic())
        pending.count(self._proxy_requests, (e.service or "none", "none", str(e.status), "bypass"))

    def _backend_state(self, e: signals.CacheBackendState) -> None:
        self._backend_up(e.backend).set(1 if e.connected else 0)

    def _cache_error(self, e: signals.CacheError) -> None:
        self._cache_errors(e.backend, _text(e.operation)).inc()

    def _config_reloaded(self, e: signals.ConfigReloaded) -> None:
        if e.ok:
            self._reloads("ok").inc()
            self._last_reload.set(self._clock.time())
        else:
            self._reloads("error").inc()
