"""Retry policy, backoff schedule, `Retry-After` and the retry budget: the pure half of retrying.

The async retry loop (elsewhere) asks this module whether an attempt's outcome is worth a
retry, how long to wait first, and whether the upstream's retry budget allows one more.

Named policies (`retry:` in routes.yaml). Backoff is exponential with full jitter: before
retry n the wait is uniform in [0, min(max_delay, base_delay * 2**(n-1))).

- NONE: no retries. For callers that retry themselves, or upstreams where a repeat costs money.
- CONSERVATIVE: 2 retries, 200 ms base, 2 s max, on 5xx/timeout/connect/reset. For important
  work on upstreams that must not be piled on: at most 3 attempts, and the waits (caps 0.2 s,
  0.4 s) give a struggling upstream room. `malformed` is left out: a garbage answer usually
  repeats, and 429 is left out: "slow down" is not answered by knocking again.
- DEFAULT: 3 retries, 100 ms base, 2 s max, on 5xx/timeout/connect/reset/malformed. Caps of
  0.1, 0.2, 0.4 s cost at most 0.7 s of waiting, which fits the default 15 s deadline next to
  5 s attempt timeouts; most transient blips (a restarting pod, a dropped keep-alive) are gone
  within that time.
- AGGRESSIVE: 5 retries, 50 ms base, 5 s max, on all of the above and 429. For cheap, idempotent
  reads where an answer matters more than load; caps 0.05..0.8 s (1.55 s in all). The 5 s
  max mostly bounds how long a 429's `Retry-After` is honoured. Close to the seed design's
  custom example (5 retries, 100 ms, 5 s, 5xx or timeout).

`Retry-After` replaces the jittered wait but is capped at `max_delay`; no wait may run past
the request's deadline. The retry budget (Linkerd-style) keeps retries to a fraction of
traffic so an outage is not multiplied by the retry count.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any, Iterable, Protocol

from proxy.clock import Clock
from proxy.resilience.outcome import RETRY_CLASSES, Outcome

# Outcome -> the `retry_on` class that names it.
_CLASS_OF: dict[Outcome, str] = {outcome: name for name, outcome in RETRY_CLASSES.items()}

# Outcomes that are never retried on the same upstream, whatever `retry_on` says: an answer to pass
# through, or no attempt was made at all.
_NEVER = frozenset({Outcome.SUCCESS, Outcome.CLIENT_ERROR, Outcome.BREAKER_OPEN, Outcome.DEADLINE,
                    Outcome.BUDGET})


class RandomSource(Protocol):
    """What backoff needs of a random number generator (`random.Random` fits)."""

    def random(self) -> float:
        """A float in [0, 1)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one upstream's failed attempts are retried. Delays in seconds.

    `retries` counts extra attempts after the first. `retry_on` holds class names from
    `proxy.outcome.RETRY_CLASSES` and/or explicit status codes ("503"); any iterable of
    names or ints is accepted and normalised to a frozenset of lower-case strings.
    """

    retries: int
    base_delay: float
    max_delay: float
    retry_on: frozenset[str]

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool):
            raise TypeError(f"retries must be a whole number, got {self.retries!r}")
        if self.retries < 0:
            raise ValueError(f"retries must not be negative, got {self.retries}")
        for name in ("base_delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
        if self.max_delay < self.base_delay:
            raise ValueError(f"max_delay ({self.max_delay:g}s) must not be less than base_delay ({self.base_delay:g}s)")
        object.__setattr__(self, "retry_on", _normalise_retry_on(self.retry_on))


def _normalise_retry_on(names: Iterable[Any]) -> frozenset[str]:
    if isinstance(names, (str, bytes)):
        raise TypeError(f"retry_on must be a collection of names, got the single string {names!r}")
    result = set()
    for item in names:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ValueError(f"retry_on: unknown entry {item!r}")
        text = str(item).strip().lower()
        if text in RETRY_CLASSES:
            result.add(text)
        elif text.isdigit() and len(text) == 3 and 500 <= int(text) <= 599:
            result.add(text)
        elif text.isdigit() and len(text) == 3 and 400 <= int(text) <= 499:
            raise ValueError(f"retry_on: {text} is a 4xx status; 4xx answers other than 429 are passed "
                             "through and never retried")
        else:
            raise ValueError(f"retry_on: unknown entry {item!r} (use {', '.join(RETRY_CLASSES)} or a 5xx status)")
    return frozenset(result)


_UPSTREAM_FAULTS = frozenset({"5xx", "timeout", "connect", "reset"})

POLICIES: dict[str, RetryPolicy] = {
    "NONE": RetryPolicy(retries=0, base_delay=0.0, max_delay=0.0, retry_on=frozenset()),
    "CONSERVATIVE": RetryPolicy(retries=2, base_delay=0.2, max_delay=2.0, retry_on=_UPSTREAM_FAULTS),
    "DEFAULT": RetryPolicy(retries=3, base_delay=0.1, max_delay=2.0, retry_on=_UPSTREAM_FAULTS | {"malformed"}),
    "AGGRESSIVE": RetryPolicy(retries=5, base_delay=0.05, max_delay=5.0,
                              retry_on=_UPSTREAM_FAULTS | {"malformed", "429"}),
}


def should_retry(policy: RetryPolicy, outcome: Outcome, status: int | None) -> bool:
    """Whether an attempt that ended with `outcome` (and HTTP `status`, if any) may be retried."""
    if outcome in _NEVER:
        return False
    if status is not None and 400 <= status <= 499 and status != 429:
        return False  # an upstream's 4xx is passed through, whatever the outcome was labelled
    if _CLASS_OF.get(outcome) in policy.retry_on:
        return True
    return status is not None and str(status) in policy.retry_on


def backoff_cap(policy: RetryPolicy, retry_number: int) -> float:
    """The ceiling of the jittered wait before retry `retry_number` (1 for the first retry)."""
    if retry_number < 1:
        raise ValueError(f"retry_number starts at 1, got {retry_number}")
    if policy.base_delay == 0:
        return 0.0
    # Past 2**64 the cap has long been max_delay; stopping there avoids float overflow.
    exponent = min(retry_number - 1, 64)
    return min(policy.max_delay, policy.base_delay * 2.0 ** exponent)


def backoff_delay(policy: RetryPolicy, retry_number: int, rng: RandomSource) -> float:
    """The wait before retry `retry_number`: full jitter, uniform in [0, backoff_cap)."""
    return backoff_cap(policy, retry_number) * rng.random()


_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP-date), or None.

    A date in the past means 0. Negative, empty or unreadable values give None: the caller
    then falls back to its own backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000" means UTC with no claim about the sender's zone
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - now_wall)


def retry_delay(policy: RetryPolicy, retry_number: int, rng: RandomSource,
                retry_after: float | None, remaining: float) -> float | None:
    """The wait before retry `retry_number`, or None when it would not leave time before the deadline.

    `retry_after` (from `parse_retry_after`) replaces the jittered backoff, capped at `max_delay`.
    `remaining` is the time left in the request's deadline.
    """
    if retry_after is not None:
        delay = min(max(retry_after, 0.0), policy.max_delay)
    else:
        delay = backoff_delay(policy, retry_number, rng)
    if delay >= remaining:
        return None
    return delay


class RetryBudget:
    """Linkerd-style retry budget of one upstream: retries stay a fraction of its traffic.

    A retry is allowed while the retries of the last `window` seconds, this one included, stay
    within `ratio * requests + min_per_second * window` (`min_per_second` keeps low-traffic
    upstreams retryable). Counts live in `_BUCKETS` buckets, so memory is fixed. Retries are
    counted over every bucket the window touches and requests only over buckets wholly inside
    it, so retries granted in any `window`-long span never exceed `ratio` times the requests of
    the `window` seconds before the last of them, plus `min_per_second * window`.
    """

    _BUCKETS = 10

    __slots__ = ("ratio", "min_per_second", "window", "_clock", "_buckets", "_exhausted")

    def __init__(self, clock: Clock, ratio: float = 0.2, min_per_second: float = 10.0,
                 window: float = 10.0) -> None:
        for name, value in (("ratio", ratio), ("min_per_second", min_per_second)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not math.isfinite(window) or window <= 0:
            raise ValueError(f"window must be a positive number of seconds, got {window!r}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [bucket index, requests, retries]
        self._exhausted = 0

    def record_request(self) -> None:
        """Count one original request (not its retries)."""
        self._bucket()[1] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and counted in `exhausted_count`) when it is spent."""
        if not self.allows():
            self._exhausted += 1
            return False
        self.spend()
        return True

    def allows(self) -> bool:
        """Whether one more retry fits the budget right now (nothing is taken)."""
        current = self._bucket()
        requests = retries = 0
        for index, bucket_requests, bucket_retries in self._buckets:
            retries += bucket_retries
            if index > current[0] - self._BUCKETS:
                requests += bucket_requests
        return retries + 1 <= self.ratio * requests + self.min_per_second * self.window

    def spend(self) -> None:
        """Count one retry made (a hedge that turned out to be load on top of an answer)."""
        self._bucket()[2] += 1

    @property
    def exhausted_count(self) -> int:
        """How many retries the budget has refused."""
        return self._exhausted

    def _bucket(self) -> list[int]:
        index = math.floor(self._clock.monotonic() * self._BUCKETS / self.window)
        # Keep one bucket more than the window: the oldest is partly inside it, so its retries count.
        while self._buckets and self._buckets[0][0] < index - self._BUCKETS:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0])
        return self._buckets[-1]
