"""The circuit breaker: a pure state machine per upstream, fed attempt outcomes, driving a gate.

The breaker never sees HTTP. Callers ask `allow()` for a `Permit` before an attempt and settle
it with `success(duration)`, `failure(duration)`, `abandoned(duration)` or `release()`; deciding
*what* counts as a failure is `proxy.outcome.is_breaker_failure`'s job. Every change is announced
as a frozen event on the injected `emit`, which is how logs and metrics learn about it.

    CLOSED --(fail_threshold consecutive failures, a failure/slow-call rate, or a refused connection)--> OPEN
    OPEN --(open_timeout elapsed, checked lazily)--> HALF_OPEN
    HALF_OPEN --(a probe succeeds)--> CLOSED
    HALF_OPEN --(a probe fails)--> OPEN (a fresh open_timeout)
    any --(force_open)--> OPEN until reset;  any --(reset)--> CLOSED
    any --(follow_open / follow_close: what the fleet agreed, for a shared breaker)--> OPEN / CLOSED

The breaker is the upstream's one gate, so it also keeps the *rest* an upstream asked for
(`Retry-After` on a 429 or 503): while resting, `allow()` refuses whatever the state; when the
rest is over, one attempt goes first and the others wait for how it ends. What a breaker is set to
(`BreakerPolicy`, the named profiles) is in `proxy.resilience.breaker_policy`.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable

from proxy.clock import Clock
from proxy.resilience.breaker_policy import BreakerPolicy
from proxy.signals import BreakerFailure, BreakerTransition, UpstreamRested, discard


class State(str, enum.Enum):
    """Where a breaker stands. Values appear in events, logs, metrics and the admin API."""

    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


# A burst of failures trips only while failures also make up this share of `failure_rate` over the window.
_BURST_GATE = 0.5


class Permit:
    """Leave to make one attempt. Settle it exactly once; later calls are ignored.

    A permit remembers the breaker generation it was issued in, so an attempt that finishes
    after the breaker moved on (opened, closed, was reset or forced) changes nothing.
    """

    __slots__ = ("_breaker", "_generation", "_probe", "_rest", "_settled")

    def __init__(self, breaker: Breaker, generation: int, probe: bool, rest: int = -1) -> None:
        self._breaker = breaker
        self._generation = generation
        self._probe = probe
        self._rest = rest  # the rest this attempt is the first after (its serial), or -1
        self._settled = False

    @property
    def probe(self) -> bool:
        """Whether this is a half-open probe."""
        return self._probe

    def success(self, duration: float) -> None:
        """The attempt worked (took `duration` seconds)."""
        self._settle(failed=False, duration=duration)

    def failure(self, duration: float, *, refused: bool = False) -> None:
        """The attempt failed in a way that counts against the upstream (`refused`: no connection
        could be made because nothing listens, which trips at once under `trip_on_refused`)."""
        self._settle(failed=True, duration=duration, how="refused" if refused else "failed")

    def abandoned(self, duration: float) -> None:
        """The attempt was given up as too slow (another upstream answered first): one more
        consecutive failure, but not a failure in the rate window, where hedges against a
        healthy upstream's slowest few percent would add up."""
        self._settle(failed=True, duration=duration, how="abandoned")

    def release(self) -> None:
        """The attempt was cancelled or had no outcome: free the probe slot, record nothing."""
        self._settle(failed=None, duration=0.0)

    def _settle(self, failed: bool | None, duration: float, how: str = "failed") -> None:
        if self._settled:
            return
        self._settled = True
        self._breaker._settle(self._generation, self._probe, self._rest, failed, duration, how)


class _Window:
    """Calls, failures and slow calls over the last `window` seconds, in a fixed number of buckets.

    A call ages out between `window - window/_BUCKETS` and `window` seconds after it was recorded;
    memory never exceeds `_BUCKETS` buckets (and `burst` failures) whatever the traffic.
    """

    _BUCKETS = 60

    __slots__ = ("_window", "_buckets", "_count", "_recent", "_totals")

    def __init__(self, window: float, burst: int) -> None:
        self._window = window
        self._buckets: deque[list[int]] = deque()  # [bucket index, calls, failures, slow]
        self._count = 0                            # calls ever recorded: numbers each call
        self._recent: deque[tuple[float, int]] = deque(maxlen=burst)  # (time, number) of the last failures
        # The buckets' sums, kept as calls come and buckets expire: every call a breaker records
        # reads them, and summing up to 60 buckets each time was 2 % of a pass-through request's CPU.
        self._totals = [0, 0, 0]

    def record(self, now: float, failed: bool, slow: bool) -> None:
        index = math.floor(now * self._BUCKETS / self._window)
        self._expire(index)
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        totals = self._totals
        totals[0] += 1
        totals[1] += failed
        totals[2] += slow
        self._count += 1
        if failed:
            self._recent.append((now, self._count))

    def burst_rate(self, now: float) -> float | None:
        """Failures per call since the earliest of the last `burst` failures, or None while there
        have not been that many inside the window."""
        recent = self._recent
        if len(recent) < (recent.maxlen or 0) or recent[0][0] <= now - self._window:
            return None
        return len(recent) / (self._count - recent[0][1] + 1)

    def totals(self, now: float) -> tuple[int, int, int]:
        """(calls, failures, slow calls) still inside the window."""
        self._expire(math.floor(now * self._BUCKETS / self._window))
        calls, failures, slow = self._totals
        return calls, failures, slow

    def clear(self) -> None:
        self._buckets.clear()
        self._recent.clear()
        self._totals = [0, 0, 0]

    def _expire(self, index: int) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] <= index - self._BUCKETS:
            _, calls, failures, slow = buckets.popleft()
            totals = self._totals
            totals[0] -= calls
            totals[1] -= failures
            totals[2] -= slow


class Breaker:
    """The circuit breaker of one upstream (`provider`) of one `service`."""

    __slots__ = ("service", "provider", "policy", "_clock", "_emit", "_state", "_generation", "_failures",
                 "_probes", "_opened_mono", "_opened_at", "_retry_at", "_forced", "_window", "_rest_until",
                 "_rest_until_wall", "_rest_serial", "_rest_probing", "_closing_listeners", "_changed_at")

    def __init__(self, service: str, provider: str, policy: BreakerPolicy, clock: Clock,
                 emit: Callable[[Any], None] = discard) -> None:
        self.service = service
        self.provider = provider
        self.policy = policy
        self._clock = clock
        self._emit = emit
        self._state = State.CLOSED
        self._changed_at = clock.time()  # wall clock of the last transition (or of the breaker's start)
        self._generation = 0          # bumped on every transition; stale permits are ignored
        self._failures = 0            # consecutive failures
        self._probes = 0              # half-open probes in flight
        self._opened_mono: float | None = None
        self._opened_at: float | None = None
        self._retry_at: float | None = None
        self._forced = False
        self._window = _Window(policy.window, policy.min_failures) if policy.rate_based else None
        self._rest_until: float | None = None       # monotonic end of a Retry-After rest
        self._rest_until_wall: float | None = None  # the same moment on the wall clock
        self._rest_serial = 0                       # bumped by every rest: an older rest's first attempt cannot end a newer one
        self._rest_probing = False                  # the first attempt after the rest is out
        self._closing_listeners: list[Callable[[], None]] = []  # told once when the gate next shuts

    # --- the gate -------------------------------------------------------------------------

    def allow(self) -> Permit | None:
        """A permit to call the upstream, or None to skip it without a call."""
        rest = -1
        if self._rest_until is not None:
            if self._rest_probing or self._clock.monotonic() < self._rest_until:
                return None
            rest = self._rest_serial
        state = self.state
        if state is State.CLOSED:
            permit = Permit(self, self._generation, probe=False, rest=rest)
        elif state is State.HALF_OPEN and self._probes < self.policy.half_open_max_calls:
            self._probes += 1
            permit = Permit(self, self._generation, probe=True, rest=rest)
        else:
            return None
        if rest >= 0:
            self._rest_probing = True
        return permit

    def on_shut(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` (once) the next time the gate shuts: the breaker opens or a rest begins.
        Returns a function that forgets it. (A retry waiting for its backoff stops waiting then.)"""
        self._closing_listeners.append(listener)

        def forget() -> None:
            if listener in self._closing_listeners:
                self._closing_listeners.remove(listener)

        return forget

    def _shut(self) -> None:
        listeners, self._closing_listeners = self._closing_listeners, []
        for listener in listeners:
            listener()

    def would_allow(self) -> bool:
        """Whether `allow()` would give a permit now (without taking one)."""
        if self._rest_until is not None and (self._rest_probing or self._clock.monotonic() < self._rest_until):
            return False
        state = self.state
        return state is State.CLOSED or (state is State.HALF_OPEN and self._probes < self.policy.half_open_max_calls)

    def rest(self, until_wall: float, *, shared: bool = False) -> None:
        """Skip the upstream until `until_wall` (epoch seconds; capped at `max_rest` from now), as
        its `Retry-After` asked. `shared`: learnt from another replica (announced as such)."""
        now_wall = self._clock.time()
        until_wall = min(until_wall, now_wall + self.policy.max_rest)
        if until_wall <= now_wall or (self._rest_until_wall is not None and until_wall <= self._rest_until_wall
                                      and self.resting):
            return
        self._rest_until = self._clock.monotonic() + (until_wall - now_wall)
        self._rest_until_wall = until_wall
        self._rest_serial += 1
        self._rest_probing = False
        self._emit(UpstreamRested(self.service, self.provider, until_wall, shared))
        self._shut()

    # --- operator actions -----------------------------------------------------------------

    def reset(self) -> None:
        """Close the breaker, end any rest and forget every count (admin `.../reset`)."""
        changed = self._state is not State.CLOSED or self._failures > 0 or self._rest_until is not None
        self._end_rest()
        self._to(State.CLOSED, "reset", announce=changed)

    def force_open(self) -> None:
        """Open the breaker until `reset()`, whatever happens (admin `.../open`, maintenance)."""
        if self._forced:
            return
        self._to(State.OPEN, "forced", forced=True)

    # --- the fleet (a shared breaker follows what another replica saw) ---------------------

    def follow_open(self, retry_at: float | None, *, reason: str = "fleet") -> None:
        """Open because the fleet says so: until `retry_at` (wall-clock epoch seconds; past: probe
        at once), or until reset when None (forced open on another replica). Nothing happens when
        the breaker already stands so (no event, no new generation)."""
        forced = retry_at is None
        if self._state is State.OPEN and self._forced == forced and (forced or (
                self._retry_at is not None and abs(self._retry_at - retry_at) < 0.001)):
            return
        hold = None if retry_at is None else retry_at - self._clock.time()
        self._to(State.OPEN, reason, forced=forced, open_for=hold)

    def follow_close(self) -> None:
        """Close because the fleet says so (a probe elsewhere succeeded, or a reset)."""
        if self._state is not State.CLOSED:
            self._to(State.CLOSED, "fleet")

    # --- what it looks like ---------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state; an OPEN breaker whose timeout has elapsed turns HALF_OPEN here."""
        self._check_timeout()
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures since the last success (kept while OPEN, cleared on close)."""
        return self._failures

    @property
    def opened_at(self) -> float | None:
        """Wall-clock epoch seconds when it last opened; None while CLOSED."""
        self._check_timeout()
        return self._opened_at

    @property
    def retry_at(self) -> float | None:
        """Wall-clock epoch seconds when an OPEN breaker will let a probe through; None otherwise."""
        self._check_timeout()
        return self._retry_at

    @property
    def forced(self) -> bool:
        """Whether an operator forced it open."""
        return self._forced

    @property
    def resting(self) -> bool:
        """Whether a `Retry-After` rest keeps the upstream skipped right now."""
        return self._rest_until is not None and (self._rest_probing or self._clock.monotonic() < self._rest_until)

    @property
    def resting_until(self) -> float | None:
        """Wall-clock epoch seconds when the current rest ends; None when not resting."""
        return self._rest_until_wall if self.resting else None

    def wait_hint(self) -> float | None:
        """Seconds until the upstream may be tried again (0: now), or None when nobody can tell
        (forced open, or half-open with every probe slot taken)."""
        now = self._clock.monotonic()
        wait = 0.0
        if self._rest_until is not None:
            if self._rest_probing and now >= self._rest_until:
                return None
            wait = max(wait, self._rest_until - now)
        state = self.state
        if state is State.OPEN:
            if self._forced or self._opened_mono is None:
                return None
            wait = max(wait, self._opened_mono + self.policy.open_timeout - now)
        elif state is State.HALF_OPEN and self._probes >= self.policy.half_open_max_calls:
            return None
        return max(0.0, wait)

    @property
    def changed_at(self) -> float:
        """Wall-clock time of the last state change (or of the breaker's start)."""
        return self._changed_at

    def snapshot(self) -> dict[str, Any]:
        """The breaker as the admin API shows it (`/health/integrations/circuits`)."""
        state = self.state
        return {
            "provider": self.provider,
            "service": self.service,
            "state": state.value,
            "failures": self._failures,
            "threshold": self.policy.fail_threshold,
            "openedAt": _iso(self._opened_at),
            "retryAt": _iso(self._retry_at),
            "forced": self._forced,
            "restingUntil": _iso(self.resting_until),
            "changedAt": _iso(self._changed_at),
        }

    def __repr__(self) -> str:
        return f"<Breaker {self.service}/{self.provider} {self._state.value} {self._failures}/{self.policy.fail_threshold}>"

    # --- internals ------------------------------------------------------------------------

    def _check_timeout(self) -> None:
        # OPEN -> HALF_OPEN happens lazily, when someone looks: no timers to own or cancel.
        if (self._state is State.OPEN and not self._forced and self._opened_mono is not None
                and self._clock.monotonic() >= self._opened_mono + self.policy.open_timeout):
            self._to(State.HALF_OPEN, "timeout_elapsed")

    def _settle(self, generation: int, probe: bool, rest: int, failed: bool | None, duration: float,
                how: str) -> None:
        if rest >= 0 and rest == self._rest_serial:
            # The first attempt after a rest: whatever it met, the rest is over (a new Retry-After
            # starts a new one); cancelled, it leaves the first try to the next request.
            self._rest_probing = False
            if failed is not None:
                self._end_rest()
        if generation != self._generation:
            return  # issued before the breaker moved on: its outcome says nothing about now
        if probe:
            self._probes -= 1
            if failed is None:
                return
            if failed:
                self._failures += 1
                self._to(State.OPEN, "probe_failed")
            else:
                self._to(State.CLOSED, "probe_succeeded")
            return
        if failed is None:
            return
        self._record_closed(failed, duration, how)

    def _end_rest(self) -> None:
        self._rest_until = self._rest_until_wall = None
        self._rest_probing = False

    def _record_closed(self, failed: bool, duration: float, how: str = "failed") -> None:
        policy = self.policy
        self._failures = self._failures + 1 if failed else 0
        if self._window is not None:
            now = self._clock.monotonic()
            abandoned = how == "abandoned"
            slow = abandoned or (not failed and policy.slow_call_duration is not None
                                 and duration >= policy.slow_call_duration)
            self._window.record(now, failed and not abandoned, slow)
        if failed and how == "refused" and policy.trip_on_refused:
            self._to(State.OPEN, "refused")
            return
        if failed and self._failures >= policy.fail_threshold:
            self._to(State.OPEN, "threshold")
            return
        if self._window is not None:
            now = self._clock.monotonic()
            calls, failures, slow_calls = self._window.totals(now)
            rate = policy.failure_rate
            if rate is not None and calls and failures / calls >= rate * _BURST_GATE:
                burst = self._window.burst_rate(now)
                if (calls >= policy.min_calls and failures / calls >= rate) or (burst is not None and burst >= rate):
                    self._to(State.OPEN, "failure_rate")
                    return
            if calls >= policy.min_calls and policy.slow_call_rate is not None \
                    and slow_calls / calls >= policy.slow_call_rate:
                self._to(State.OPEN, "slow_call_rate")
                return
        if failed:
            self._emit(BreakerFailure(self.service, self.provider, self._failures, policy.fail_threshold))

    def _to(self, new: State, reason: str, *, forced: bool = False, announce: bool = True,
            open_for: float | None = None) -> None:
        old = self._state
        self._state = new
        self._changed_at = self._clock.time()
        self._generation += 1
        self._probes = 0
        self._forced = forced
        if new is State.OPEN:
            # `open_for`: how long the fleet keeps it open (the timeout is counted from that).
            hold = self.policy.open_timeout if open_for is None else open_for
            self._opened_mono = self._clock.monotonic() + hold - self.policy.open_timeout
            self._opened_at = self._clock.time()
            self._retry_at = None if forced else self._opened_at + hold
        elif new is State.HALF_OPEN:
            self._retry_at = None
        else:
            self._failures = 0
            self._opened_mono = self._opened_at = self._retry_at = None
        if new is not State.HALF_OPEN and self._window is not None:
            self._window.clear()  # a fresh start: old calls must not re-trip a closed breaker
        if announce:
            self._emit(BreakerTransition(self.service, self.provider, old.value, new.value, reason,
                                         self._failures, self.policy.fail_threshold, self._retry_at))
        if new is State.OPEN:
            self._shut()


def _iso(epoch: float | None) -> str | None:
    """`2024-12-01T10:00:00.000Z`, as the admin API shows times."""
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
