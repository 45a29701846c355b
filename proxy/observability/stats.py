"""In-memory per-minute statistics behind `/health/integrations/stats` and the health status.

`Stats` is an event-bus subscriber. It keeps one bucket per wall-clock minute for the last
1440 minutes (24 h); each bucket holds counts and a fixed log-scale latency histogram per
upstream (provider) and per service, so memory stays bounded however heavy the traffic.

Latency resolution: 63 bins — [0, 1 ms], then bins whose upper bound grows by a factor of 1.2
from 1 ms to ~67.6 s, then one overflow bin. A percentile is the nearest-rank sample's bin,
interpolated linearly by rank inside it and clamped to the smallest and largest duration seen,
so for latencies from 1 ms to 60 s it is within a factor of 1.2 (20 %) of the true value
(below 1 ms: within 1 ms).
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from proxy import signals
from proxy.clock import Clock
from proxy.resilience.outcome import NOT_ERRORS, Outcome

MAX_MINUTES = 1440
GROWTH = 1.2
_LOG_GROWTH = math.log(GROWTH)
_FINITE_BINS = 61  # upper bounds 1 ms * 1.2**k, k = 0..61 (the last is ~67.6 s)
_EDGES_MS = tuple(GROWTH ** k for k in range(_FINITE_BINS + 1))
_BINS = _FINITE_BINS + 2  # bin 0 is [0, 1 ms], bins 1..61 are finite, bin 62 is the overflow
_ANSWERED = frozenset(o.value for o in NOT_ERRORS)


def _bin_of(ms: float) -> int:
    """Bin 0 holds [0, 1 ms]; bin k holds (1.2**(k-1), 1.2**k] ms; the last bin everything beyond."""
    if ms <= 1.0:
        return 0
    k = math.ceil(math.log(ms) / _LOG_GROWTH)
    # Correct a rounding step at an exact bin edge.
    if k <= _FINITE_BINS and ms > _EDGES_MS[k]:
        k += 1
    elif 2 <= k <= _FINITE_BINS + 1 and ms <= _EDGES_MS[k - 1]:
        k -= 1
    return min(k, _FINITE_BINS + 1)


def _bin_bounds(k: int, largest: float) -> tuple[float, float]:
    if k == 0:
        return 0.0, 1.0
    if k > _FINITE_BINS:
        return _EDGES_MS[_FINITE_BINS], max(largest, _EDGES_MS[_FINITE_BINS])
    return _EDGES_MS[k - 1], _EDGES_MS[k]


class _Latency:
    """A fixed log-scale histogram of durations in milliseconds."""

    __slots__ = ("bins", "count", "smallest", "largest")

    def __init__(self) -> None:
        self.bins = array("I", bytes(4 * _BINS))
        self.count = 0
        self.smallest = math.inf
        self.largest = 0.0

    def add(self, ms: float) -> None:
        ms = max(ms, 0.0)
        self.bins[_bin_of(ms)] += 1
        self.count += 1
        if ms < self.smallest:
            self.smallest = ms
        if ms > self.largest:
            self.largest = ms

    def merge(self, other: _Latency) -> None:
        if not other.count:
            return
        bins, theirs = self.bins, other.bins
        for k in range(_BINS):
            if theirs[k]:
                bins[k] += theirs[k]
        self.count += other.count
        self.smallest = min(self.smallest, other.smallest)
        self.largest = max(self.largest, other.largest)

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0 < q <= 1) in ms by nearest rank, or None without samples."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for k in range(_BINS):
            in_bin = self.bins[k]
            if in_bin and seen + in_bin >= rank:
                low, high = _bin_bounds(k, self.largest)
                value = low + (high - low) * (rank - seen) / in_bin
                return min(max(value, self.smallest), self.largest)
            seen += in_bin
        return self.largest  # unreachable while bins and count agree


RESPONSE_CLASSES = ("2xx", "3xx", "4xx", "5xx", "none")  # "none": no HTTP answer (timeout, reset, ...)


class _Tally:
    __slots__ = ("requests", "errors", "latency", "classes")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = _Latency()
        self.classes: list[int] | None = None  # an upstream's answers by RESPONSE_CLASSES, once it has any

    def merge(self, other: "_Tally") -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.latency.merge(other.latency)
        if other.classes is not None:
            if self.classes is None:
                self.classes = [0] * len(RESPONSE_CLASSES)
            for index, count in enumerate(other.classes):
                self.classes[index] += count

    def add_status(self, status: int | None) -> None:
        if self.classes is None:
            self.classes = [0] * len(RESPONSE_CLASSES)
        index = min(max(status // 100 - 2, 0), 3) if status is not None else 4  # a 1xx final answer counts as 2xx
        self.classes[index] += 1


class _ServiceTally(_Tally):
    __slots__ = ("hit", "miss", "stale", "bypass")

    def __init__(self) -> None:
        super().__init__()
        self.hit = self.miss = self.stale = self.bypass = 0

    def merge(self, other: "_ServiceTally") -> None:  # type: ignore[override]
        super().merge(other)
        self.hit += other.hit
        self.miss += other.miss
        self.stale += other.stale
        self.bypass += other.bypass


class _Minute:
    __slots__ = ("minute", "providers", "services")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.providers: dict[str, _Tally] = {}
        self.services: dict[str, _ServiceTally] = {}

    def provider(self, name: str) -> _Tally:
        tally = self.providers.get(name)
        if tally is None:
            tally = self.providers[name] = _Tally()
        return tally

    def service(self, name: str) -> _ServiceTally:
        tally = self.services.get(name)
        if tally is None:
            tally = self.services[name] = _ServiceTally()
        return tally


def _iso(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _error_rate(requests: int, errors: int) -> float:
    return round(errors / requests, 4) if requests else 0.0


def _hit_rate(hit: int, miss: int, stale: int) -> float | None:
    lookups = hit + miss + stale
    return round(100.0 * hit / lookups, 2) if lookups else None


class Stats:
    """Per-minute counts and latencies for the last 24 h; call it with any event.

    Buckets are keyed by `int(clock.time() // 60)`. `window(n)` covers the current minute and
    the n - 1 before it. Upstream errors are attempts whose outcome is neither success nor
    client_error; service errors are answers with status >= 500. `cacheHitRate` is the percent
    of hits among hit + miss + stale lookups (bypass excluded; None without lookups), the same
    definition as the `cache_hit_rate` metric. A service's `stale` counts answers served from a
    stale copy (`X-Cache: STALE`). If the wall clock steps back, events go into the newest bucket.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._minutes: deque[_Minute] = deque(maxlen=MAX_MINUTES)
        self._service_of: dict[str, str] = {}  # provider -> service, from register() and events
        self._registered: set[str] = set()
        self._forgotten: set[str] = set()  # removed by a reload: late attempts on the old table are not counted
        self._forgotten_services: set[str] = set()  # likewise, services
        self._handlers = {
            signals.AttemptFinished: self._attempt_finished,
            signals.CacheLookup: self._cache_lookup,
            signals.RequestFinished: self._request_finished,
        }

    def __call__(self, event: Any) -> None:
        handler = self._handlers.get(type(event))
        if handler is None:
            return
        if self._forgotten and getattr(event, "provider", None) in self._forgotten:
            return
        if self._forgotten_services and event.service in self._forgotten_services:
            return
        handler(event)

    def register(self, service: str, provider: str) -> None:
        """Make the upstream (and its service) appear in every window, with zeros until it has traffic."""
        self._service_of[provider] = service
        self._registered.add(provider)
        self._forgotten.discard(provider)
        self._forgotten_services.discard(service)

    def forget(self, provider: str) -> None:
        """Drop an upstream that a reload removed, with its history."""
        self._registered.discard(provider)
        self._forgotten.add(provider)
        self._service_of.pop(provider, None)
        for bucket in self._minutes:
            bucket.providers.pop(provider, None)

    def forget_service(self, service: str) -> None:
        """Drop a service that a reload removed, with its history (its upstreams are forgotten one by one)."""
        self._forgotten_services.add(service)
        for bucket in self._minutes:
            bucket.services.pop(service, None)

    @property
    def buckets_kept(self) -> int:
        """How many minute buckets are held in memory (never more than 1440)."""
        return len(self._minutes)

    # --- queries ------------------------------------------------------------------------

    def window(self, minutes: int) -> dict[str, Any]:
        """Per-provider and per-service figures over the last `minutes` (1-1440) minutes."""
        if type(minutes) is not int or not 1 <= minutes <= MAX_MINUTES:
            raise ValueError(f"minutes must be a whole number from 1 to {MAX_MINUTES}, not {minutes!r}")
        now = self._clock.time()
        first = int(now // 60) - minutes + 1
        buckets = self._since(first)

        providers: dict[str, _Tally] = {name: _Tally() for name in self._registered}
        services: dict[str, _ServiceTally] = {self._service_of[name]: _ServiceTally() for name in self._registered}
        for bucket in buckets:
            for name, tally in bucket.providers.items():
                providers.setdefault(name, _Tally()).merge(tally)
            for name, service_tally in bucket.services.items():
                services.setdefault(name, _ServiceTally()).merge(service_tally)
        for name in providers:
            services.setdefault(self._service_of[name], _ServiceTally())

        service_out: dict[str, dict[str, Any]] = {}
        for name in sorted(services):
            tally = services[name]
            service_out[name] = {**self._figures(tally), "cacheHitRate": _hit_rate(tally.hit, tally.miss, tally.stale),
                                 "stale": tally.stale}
        provider_out: dict[str, dict[str, Any]] = {}
        for name in sorted(providers):
            service = self._service_of[name]
            classes = providers[name].classes or [0] * len(RESPONSE_CLASSES)
            provider_out[name] = {"service": service, **self._figures(providers[name]),
                                  "cacheHitRate": service_out[service]["cacheHitRate"],
                                  "responses": dict(zip(RESPONSE_CLASSES, classes))}
        return {"minutes": minutes, "from": _iso(first * 60), "to": _iso(now),
                "providers": provider_out, "services": service_out}

    def recent_error_rate(self, provider: str, minutes: int = 5) -> float | None:
        """The upstream's error ratio (0..1) over the last `minutes`, or None without requests."""
        first = int(self._clock.time() // 60) - minutes + 1
        requests = errors = 0
        for bucket in self._since(first):
            tally = bucket.providers.get(provider)
            if tally is not None:
                requests += tally.requests
                errors += tally.errors
        return errors / requests if requests else None

    @staticmethod
    def _figures(tally: _Tally) -> dict[str, Any]:
        latency = tally.latency
        return {"requests": tally.requests, "errors": tally.errors,
                "errorRate": _error_rate(tally.requests, tally.errors),
                "p50": _ms(latency.percentile(0.50)), "p95": _ms(latency.percentile(0.95)),
                "p99": _ms(latency.percentile(0.99))}

    def _since(self, first_minute: int) -> Iterable[_Minute]:
        for bucket in reversed(self._minutes):
            if bucket.minute < first_minute:
                break
            yield bucket

    # --- recording ----------------------------------------------------------------------

    def _bucket(self) -> _Minute:
        minute = int(self._clock.time() // 60)
        if self._minutes:
            newest = self._minutes[-1]
            if minute <= newest.minute:
                return newest
        bucket = _Minute(minute)
        self._minutes.append(bucket)  # maxlen drops the oldest past 1440 buckets
        oldest_kept = minute - MAX_MINUTES + 1
        while self._minutes[0].minute < oldest_kept:
            self._minutes.popleft()
        return bucket

    def _attempt_finished(self, e: signals.AttemptFinished) -> None:
        self._service_of.setdefault(e.provider, e.service)
        tally = self._bucket().provider(e.provider)
        tally.requests += 1
        outcome = e.outcome.value if isinstance(e.outcome, Outcome) else e.outcome
        if outcome not in _ANSWERED:
            tally.errors += 1
        tally.add_status(e.status)
        tally.latency.add(e.duration * 1000.0)

    def _cache_lookup(self, e: signals.CacheLookup) -> None:
        tally = self._bucket().service(e.service)
        result = getattr(e.result, "value", e.result)
        if result == "hit":
            tally.hit += 1
        elif result == "miss":
            tally.miss += 1
        elif result == "stale":
            tally.stale += 1
        elif result == "bypass":
            tally.bypass += 1

    def record_hit(self, service: str, status: int, duration: float) -> None:
        """What `CacheLookup(service, "hit")` + `RequestFinished(...)` of a HIT would record."""
        minutes = self._minutes
        if minutes and minutes[-1].minute == int(self._clock.time() // 60):
            bucket = minutes[-1]
        else:
            bucket = self._bucket()
        tally = bucket.services.get(service)
        if tally is None:
            tally = bucket.service(service)
        tally.hit += 1
        tally.requests += 1
        if status >= 500:
            tally.errors += 1
        ms = duration * 1000.0
        if 0.0 <= ms <= 1.0 and tally.latency.count:
            latency = tally.latency
            latency.bins[0] += 1
            latency.count += 1
            if ms < latency.smallest:
                latency.smallest = ms
            if ms > latency.largest:
                latency.largest = ms
        else:
            tally.latency.add(ms)

    def _request_finished(self, e: signals.RequestFinished) -> None:
        tally = self._bucket().service(e.service)
        tally.requests += 1
        if e.status >= 500:
            tally.errors += 1
        tally.latency.add(e.duration * 1000.0)
