"""How one upstream attempt ended, classified in one place.

Every stage (retry, breaker, fallback, metrics, logs) asks this module what an attempt's
result means instead of looking at status codes or exception types itself.
"""

from __future__ import annotations

import enum


class Outcome(str, enum.Enum):
    """The result class of one upstream attempt. Values appear in logs, metrics and `attempts`."""

    SUCCESS = "success"            # 2xx / 3xx
    CLIENT_ERROR = "client_error"  # 4xx other than 429: passed through, never retried
    HTTP_429 = "http_429"
    HTTP_5XX = "http_5xx"
    TIMEOUT = "timeout"
    CONNECT = "connect_error"      # refused, DNS, connect timeout: the upstream never saw the request
    RESET = "reset"                # connection dropped after the request was sent
    MALFORMED = "malformed"        # not valid HTTP, or a body that breaks the upstream's promise
    BREAKER_OPEN = "breaker_open"  # skipped without a network call
    DEADLINE = "deadline"          # no time left in the request's deadline to try
    BUDGET = "retry_budget"        # (retries only) the retry budget is spent
    RATE_LIMITED = "rate_limited"  # skipped: the upstream's rate limit has no token left
    KEYS_SPENT = "keys_spent"      # skipped: every API key of the upstream is resting
    KEY_REFUSED = "key_refused"    # the upstream refused the key it was sent (quota or auth), not the request
    TRANSFORM = "transform_failed"  # the answer could not be normalised (not JSON, failed expression)
    NO_PATH = "no_path"            # the route gives this upstream's templates no values: not tried
    RESTING = "resting"            # skipped: a rest (Retry-After, or its only key refused) is not over
    HEDGE_LOST = "hedge_lost"      # given up as too slow: a hedge to another upstream answered first
    CALLER_ERROR = "caller_error"  # a result code in the answer says the caller's request was bad: not retried
    VENDOR_ERROR = "vendor_error"  # a result code in the answer says the vendor failed (often inside a 200)

    @property
    def answered(self) -> bool:
        """The upstream produced an HTTP answer that may be passed to the caller as it is."""
        return self in (Outcome.SUCCESS, Outcome.CLIENT_ERROR)


# Classes an operator may name in `retry_on`; explicit status codes are allowed too.
RETRY_CLASSES = {
    "5xx": Outcome.HTTP_5XX,
    "429": Outcome.HTTP_429,
    "timeout": Outcome.TIMEOUT,
    "connect": Outcome.CONNECT,
    "reset": Outcome.RESET,
    "malformed": Outcome.MALFORMED,
}


def from_status(status: int) -> Outcome:
    """Classify an upstream's HTTP status."""
    if status == 429:
        return Outcome.HTTP_429
    if status >= 500:
        return Outcome.HTTP_5XX
    if status >= 400:
        return Outcome.CLIENT_ERROR
    if status < 100:
        return Outcome.MALFORMED
    return Outcome.SUCCESS


def is_breaker_failure(outcome: Outcome, *, trip_on_429: bool = False) -> bool:
    """Whether an outcome counts against the upstream's circuit breaker.

    5xx, timeouts, connect errors, resets, malformed answers and vendor errors do; 2xx/3xx/4xx and
    caller errors do not (a 404 is the upstream working correctly); 429 only when the breaker is told so.
    """
    if outcome is Outcome.HTTP_429:
        return trip_on_429
    return outcome in (Outcome.HTTP_5XX, Outcome.TIMEOUT, Outcome.CONNECT, Outcome.RESET, Outcome.MALFORMED,
                       Outcome.TRANSFORM, Outcome.VENDOR_ERROR)


# Outcomes that say nothing against the upstream: counted as answers, not errors, in stats and metrics
# (a request a vendor's result code called wrong is the caller's problem, as a 4xx is).
NOT_ERRORS = frozenset({o for o in Outcome if o.answered} | {Outcome.CALLER_ERROR})

# Outcomes where no request reached the upstream: it was skipped before any network call.
SKIPPED = frozenset({Outcome.BREAKER_OPEN, Outcome.RATE_LIMITED, Outcome.KEYS_SPENT, Outcome.NO_PATH,
                     Outcome.RESTING})
