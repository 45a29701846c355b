"""How a circuit breaker trips and recovers: `BreakerPolicy` and the named profiles routes.yaml may use.

The policy is plain data that checks its own values; `proxy.resilience.breaker.Breaker` runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def _require_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")


def _require_number(name: str, value: Any, *, minimum: float, exclusive: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
        bound = f"greater than {minimum:g}" if exclusive else f"at least {minimum:g}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """How one upstream's breaker trips and recovers (durations in seconds).

    The rate-based trips are optional: `failure_rate` (failed / calls) and `slow_call_rate`
    (slow successes / calls) over the last `window` seconds, never below `min_calls` calls. The
    failure rate is also judged on the latest burst: the calls since the earliest of the last
    `min_failures` failures (all inside the window), provided failures also make up at least half
    of `failure_rate` over the whole window. A vendor that starts failing after a quiet spell is
    left within a few calls, not once its failures outweigh the successes before they began, and a
    healthy vendor's rare clusters of failures never add up to half the rate over the window.
    `trip_on_refused`: a refused connection (nothing listens: the upstream is certainly down, and
    certainly never saw the request) opens the breaker at once instead of counting as one failure.
    `max_rest` caps how long a `Retry-After` may rest the upstream (0: never rest).
    `trip_on_429` is read by the caller when it classifies outcomes; the breaker itself only
    receives success or failure. `shared` is read by the fleet (`proxy.fleet.breakers`): the
    breaker's OPEN state and half-open probe are then agreed on through Redis.
    """

    fail_threshold: int
    open_timeout: float
    half_open_max_calls: int = 1
    failure_rate: float | None = None
    window: float = 10.0
    min_calls: int = 10
    min_failures: int = 3
    slow_call_duration: float | None = None
    slow_call_rate: float | None = None
    trip_on_429: bool = False
    trip_on_refused: bool = True
    max_rest: float = 3600.0
    shared: bool = False

    def __post_init__(self) -> None:
        _require_int("fail_threshold", self.fail_threshold, minimum=1)
        _require_number("open_timeout", self.open_timeout, minimum=0.0)
        _require_int("half_open_max_calls", self.half_open_max_calls, minimum=1)
        _require_number("window", self.window, minimum=0.0, exclusive=True)
        _require_int("min_calls", self.min_calls, minimum=1)
        _require_int("min_failures", self.min_failures, minimum=1)
        for name in ("failure_rate", "slow_call_rate"):
            value = getattr(self, name)
            if value is not None:
                _require_number(name, value, minimum=0.0, exclusive=True)
                if value > 1:
                    raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
        if self.slow_call_duration is not None:
            _require_number("slow_call_duration", self.slow_call_duration, minimum=0.0, exclusive=True)
        if (self.slow_call_rate is None) != (self.slow_call_duration is None):
            raise ValueError("slow_call_rate and slow_call_duration must be set together")
        for name in ("trip_on_429", "trip_on_refused", "shared"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _require_number("max_rest", self.max_rest, minimum=0.0)

    @property
    def rate_based(self) -> bool:
        """Whether the breaker needs its sliding window of calls."""
        return self.failure_rate is not None or self.slow_call_rate is not None


# What every profile adds to the seed's consecutive-failure counts: leave an upstream that fails
# one call in five (over at least 10 calls in 10 s, or over the burst since its last 3 failures
# began: 5 for CRITICAL) even when its failures never line up; a 30 %-failing vendor otherwise
# stays in use for good.
_RATE_TRIP = {"failure_rate": 0.2, "window": 10.0, "min_calls": 10}

# The seed design's profiles: consecutive failures to open / seconds open before a probe.
PROFILES: dict[str, BreakerPolicy] = {
    "CRITICAL": BreakerPolicy(fail_threshold=8, open_timeout=120.0, half_open_max_calls=1, min_failures=5,
                              **_RATE_TRIP),
    "STANDARD": BreakerPolicy(fail_threshold=5, open_timeout=60.0, half_open_max_calls=1, min_failures=3,
                              **_RATE_TRIP),
    "FAST": BreakerPolicy(fail_threshold=3, open_timeout=30.0, half_open_max_calls=1, min_failures=3, **_RATE_TRIP),
}
