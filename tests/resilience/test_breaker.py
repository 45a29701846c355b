"""The circuit breaker state machine, walked step by step on a fake clock."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.clock import FakeClock
from proxy.resilience.breaker import Breaker, Permit, State
from proxy.resilience.breaker_policy import PROFILES, BreakerPolicy
from proxy.signals import BreakerFailure, BreakerTransition, UpstreamRested

SERVICE, PROVIDER = "fx", "fx_primary"


def make(clock: FakeClock, policy: BreakerPolicy | None = None, **changes) -> tuple[Breaker, list]:
    events: list = []
    policy = policy or BreakerPolicy(fail_threshold=5, open_timeout=60.0)
    if changes:
        policy = dataclasses.replace(policy, **changes)
    return Breaker(SERVICE, PROVIDER, policy, clock, events.append), events


def fail(breaker: Breaker, times: int = 1, duration: float = 0.01) -> None:
    for _ in range(times):
        permit = breaker.allow()
        assert permit is not None
        permit.failure(duration)


def succeed(breaker: Breaker, times: int = 1, duration: float = 0.01) -> None:
    for _ in range(times):
        permit = breaker.allow()
        assert permit is not None
        permit.success(duration)


def transitions(events: list) -> list[tuple[str, str, str]]:
    return [(e.old, e.new, e.reason) for e in events if isinstance(e, BreakerTransition)]


def open_breaker(breaker: Breaker) -> None:
    fail(breaker, breaker.policy.fail_threshold)
    assert breaker.state is State.OPEN


# --- closed ---------------------------------------------------------------------------------

def test_closed_breaker_hands_out_permits_and_emits_nothing_on_success(clock):
    breaker, events = make(clock)
    for _ in range(20):
        permit = breaker.allow()
        assert isinstance(permit, Permit)
        assert permit.probe is False
        permit.success(0.01)
    assert breaker.state is State.CLOSED
    assert breaker.failures == 0
    assert events == []


def test_threshold_consecutive_failures_open_the_breaker_with_exact_events(clock):
    breaker, events = make(clock)
    opened_wall = clock.time()
    fail(breaker, 5)
    assert events == [
        BreakerFailure(SERVICE, PROVIDER, 1, 5),
        BreakerFailure(SERVICE, PROVIDER, 2, 5),
        BreakerFailure(SERVICE, PROVIDER, 3, 5),
        BreakerFailure(SERVICE, PROVIDER, 4, 5),
        BreakerTransition(SERVICE, PROVIDER, "CLOSED", "OPEN", "threshold", failures=5, threshold=5,
                          retry_at=opened_wall + 60.0),
    ]
    assert breaker.state is State.OPEN
    assert breaker.failures == 5
    assert breaker.opened_at == opened_wall
    assert breaker.retry_at == opened_wall + 60.0


def test_one_failure_short_of_the_threshold_stays_closed(clock):
    breaker, events = make(clock)
    fail(breaker, 4)
    assert breaker.state is State.CLOSED
    assert breaker.allow() is not None
    assert transitions(events) == []


def test_success_resets_the_consecutive_failure_count(clock):
    breaker, events = make(clock)
    fail(breaker, 4)
    succeed(breaker)
    assert breaker.failures == 0
    fail(breaker, 4)
    assert breaker.state is State.CLOSED
    assert [e.failures for e in events if isinstance(e, BreakerFailure)] == [1, 2, 3, 4, 1, 2, 3, 4]
    fail(breaker)
    assert breaker.state is State.OPEN


# --- open -----------------------------------------------------------------------------------

def test_open_breaker_skips_calls_until_exactly_open_timeout_has_elapsed(clock):
    breaker, events = make(clock)
    open_breaker(breaker)
    events.clear()
    assert breaker.allow() is None
    clock.advance(60.0 - 0.001)
    assert breaker.allow() is None
    assert breaker.state is State.OPEN
    assert events == []
    clock.advance(0.001)
    permit = breaker.allow()
    assert permit is not None and permit.probe is True
    assert breaker.state is State.HALF_OPEN
    assert events == [BreakerTransition(SERVICE, PROVIDER, "OPEN", "HALF_OPEN", "timeout_elapsed",
                                        failures=5, threshold=5, retry_at=None)]


def test_reading_state_turns_an_expired_open_breaker_half_open_once(clock):
    breaker, events = make(clock)
    open_breaker(breaker)
    clock.advance(60.0)
    assert breaker.state is State.HALF_OPEN
    assert breaker.state is State.HALF_OPEN
    assert transitions(events).count(("OPEN", "HALF_OPEN", "timeout_elapsed")) == 1


# --- half-open ------------------------------------------------------------------------------

def test_half_open_admits_at_most_half_open_max_calls_concurrent_probes(clock):
    breaker, _ = make(clock, half_open_max_calls=2)
    open_breaker(breaker)
    clock.advance(60.0)
    first, second = breaker.allow(), breaker.allow()
    assert first is not None and second is not None
    assert breaker.allow() is None
    first.release()
    third = breaker.allow()
    assert third is not None
    assert breaker.allow() is None
    assert breaker.state is State.HALF_OPEN


def test_releasing_a_probe_twice_frees_only_one_slot(clock):
    breaker, _ = make(clock, half_open_max_calls=2)
    open_breaker(breaker)
    clock.advance(60.0)
    first, _second = breaker.allow(), breaker.allow()
    first.release()
    first.release()
    assert breaker.allow() is not None
    assert breaker.allow() is None


def test_probe_success_closes_the_breaker_and_clears_counts(clock):
    breaker, events = make(clock)
    open_breaker(breaker)
    clock.advance(60.0)
    assert breaker.state is State.HALF_OPEN
    events.clear()
    breaker.allow().success(0.02)
    assert breaker.state is State.CLOSED
    assert breaker.failures == 0
    assert breaker.opened_at is None and breaker.retry_at is None
    assert events == [BreakerTransition(SERVICE, PROVIDER, "HALF_OPEN", "CLOSED", "probe_succeeded",
                                        failures=0, threshold=5, retry_at=None)]
    # counts really start again: four failures are not enough to reopen
    fail(breaker, 4)
    assert breaker.state is State.CLOSED


def test_probe_failure_reopens_with_a_fresh_open_timeout(clock):
    breaker, events = make(clock)
    open_breaker(breaker)
    clock.advance(60.0)
    reopened_wall = clock.time()
    assert breaker.state is State.HALF_OPEN
    events.clear()
    breaker.allow().failure(0.02)
    assert breaker.state is State.OPEN
    assert events == [BreakerTransition(SERVICE, PROVIDER, "HALF_OPEN", "OPEN", "probe_failed",
                                        failures=6, threshold=5, retry_at=reopened_wall + 60.0)]
    assert breaker.opened_at == reopened_wall
    clock.advance(59.0)
    assert breaker.allow() is None
    clock.advance(1.0)
    assert breaker.allow() is not None
    assert breaker.state is State.HALF_OPEN


def test_a_second_probe_finishing_after_the_first_closed_the_breaker_changes_nothing(clock):
    breaker, events = make(clock, half_open_max_calls=2)
    open_breaker(breaker)
    clock.advance(60.0)
    first, second = breaker.allow(), breaker.allow()
    first.success(0.01)
    second.failure(0.01)
    assert breaker.state is State.CLOSED
    assert breaker.failures == 0
    assert transitions(events)[-1] == ("HALF_OPEN", "CLOSED", "probe_succeeded")


# --- operator actions ---------------------------------------------------------------------

def test_force_open_stays_open_past_the_timeout_until_reset(clock):
    breaker, events = make(clock)
    breaker.force_open()
    assert events == [BreakerTransition(SERVICE, PROVIDER, "CLOSED", "OPEN", "forced",
                                        failures=0, threshold=5, retry_at=None)]
    assert breaker.forced is True
    assert breaker.retry_at is None
    clock.advance(10 * 60.0)
    assert breaker.allow() is None
    assert breaker.state is State.OPEN
    breaker.reset()
    assert breaker.state is State.CLOSED
    assert breaker.forced is False
    assert breaker.allow() is not None
    assert transitions(events) == [("CLOSED", "OPEN", "forced"), ("OPEN", "CLOSED", "reset")]


def test_force_open_of_a_half_open_breaker_voids_its_probes(clock):
    breaker, _ = make(clock)
    open_breaker(breaker)
    clock.advance(60.0)
    probe = breaker.allow()
    breaker.force_open()
    probe.success(0.01)
    assert breaker.state is State.OPEN
    assert breaker.forced is True


def test_reset_from_open_closes_and_clears_counts(clock):
    breaker, events = make(clock)
    open_breaker(breaker)
    breaker.reset()
    assert breaker.state is State.CLOSED
    assert breaker.failures == 0
    assert breaker.opened_at is None
    assert transitions(events)[-1] == ("OPEN", "CLOSED", "reset")
    fail(breaker, 4)
    assert breaker.state is State.CLOSED


def test_reset_of_a_clean_closed_breaker_emits_nothing(clock):
    breaker, events = make(clock)
    breaker.reset()
    assert events == []


def test_stale_permits_from_before_a_reset_do_not_count(clock):
    breaker, events = make(clock)
    stale = [breaker.allow() for _ in range(5)]
    fail(breaker, 4)
    breaker.reset()
    for permit in stale:
        permit.failure(0.01)
    assert breaker.state is State.CLOSED
    assert breaker.failures == 0
    assert transitions(events) == [("CLOSED", "CLOSED", "reset")]


def test_a_closed_era_failure_arriving_during_half_open_does_not_touch_the_probe(clock):
    breaker, _ = make(clock)
    late = breaker.allow()
    open_breaker(breaker)
    clock.advance(60.0)
    probe = breaker.allow()
    late.failure(0.01)
    late.release()
    assert breaker.state is State.HALF_OPEN
    assert breaker.allow() is None  # the stale permit freed no probe slot
    probe.success(0.01)
    assert breaker.state is State.CLOSED


def test_a_permit_settles_at_most_once(clock):
    breaker, _ = make(clock)
    permit = breaker.allow()
    for _ in range(10):
        permit.failure(0.01)
    assert breaker.failures == 1
    permit.success(0.01)
    assert breaker.failures == 1


# --- rate-based trips ---------------------------------------------------------------------

def rate_policy(**changes) -> BreakerPolicy:
    """The rate over the whole window alone (the burst rule is tested on its own below)."""
    base = BreakerPolicy(fail_threshold=1000, open_timeout=30.0, failure_rate=0.5, window=60.0, min_calls=10,
                         min_failures=1000)
    return dataclasses.replace(base, **changes)


def test_failure_rate_does_not_trip_below_min_calls(clock):
    breaker, events = make(clock, rate_policy())
    fail(breaker, 9)
    assert breaker.state is State.CLOSED
    fail(breaker)
    assert breaker.state is State.OPEN
    assert transitions(events) == [("CLOSED", "OPEN", "failure_rate")]


def test_failure_rate_trips_at_the_fraction_not_before(clock):
    breaker, events = make(clock, rate_policy())
    # alternate so the consecutive count never matters: 5 failures in 10 calls = 0.5
    for _ in range(4):
        succeed(breaker)
        fail(breaker)
    succeed(breaker)
    assert breaker.state is State.CLOSED  # 4/9
    succeed(breaker)
    assert breaker.state is State.CLOSED  # 4/10
    fail(breaker)
    assert breaker.state is State.CLOSED  # 5/11
    fail(breaker)
    assert breaker.state is State.OPEN    # 6/12
    assert events[-1].reason == "failure_rate"


def test_calls_older_than_the_window_age_out_of_the_failure_rate(clock):
    breaker, _ = make(clock, rate_policy())
    fail(breaker, 5)
    clock.advance(60.0)
    succeed(breaker, 5)
    fail(breaker, 4)
    succeed(breaker)
    # 4/10 in the window; had the first five failures not aged out it would be 9/15 and open
    assert breaker.state is State.CLOSED
    fail(breaker)
    assert breaker.state is State.CLOSED  # 5/11
    fail(breaker)
    assert breaker.state is State.OPEN  # 6/12 inside the window


def test_calls_still_inside_the_window_count_toward_the_failure_rate(clock):
    breaker, _ = make(clock, rate_policy())
    fail(breaker, 5)
    clock.advance(50.0)
    succeed(breaker, 4)
    assert breaker.state is State.CLOSED  # 9 calls: below min_calls
    succeed(breaker)
    assert breaker.state is State.OPEN    # 5/10 within 60 s


def test_slow_successes_trip_the_slow_call_rate(clock):
    policy = BreakerPolicy(fail_threshold=5, open_timeout=30.0, slow_call_duration=2.0, slow_call_rate=0.5,
                           min_calls=4)
    breaker, events = make(clock, policy)
    succeed(breaker, 2, duration=0.1)
    succeed(breaker, 1, duration=2.0)
    assert breaker.state is State.CLOSED  # 3 calls: below min_calls
    succeed(breaker, 1, duration=1.999)
    assert breaker.state is State.CLOSED  # 1 slow of 4
    succeed(breaker, 1, duration=5.0)
    assert breaker.state is State.CLOSED  # 2 of 5
    succeed(breaker, 1, duration=3.0)
    assert breaker.state is State.OPEN    # 3 of 6
    assert transitions(events) == [("CLOSED", "OPEN", "slow_call_rate")]


def test_slow_failures_are_not_slow_calls(clock):
    policy = BreakerPolicy(fail_threshold=100, open_timeout=30.0, slow_call_duration=1.0, slow_call_rate=0.5,
                           min_calls=4)
    breaker, _ = make(clock, policy)
    fail(breaker, 4, duration=10.0)
    succeed(breaker, 4, duration=0.1)
    assert breaker.state is State.CLOSED


def test_slow_calls_age_out_of_the_window(clock):
    policy = BreakerPolicy(fail_threshold=5, open_timeout=30.0, slow_call_duration=1.0, slow_call_rate=0.5,
                           min_calls=4, window=10.0)
    breaker, _ = make(clock, policy)
    succeed(breaker, 3, duration=5.0)
    clock.advance(10.0)
    succeed(breaker, 3, duration=0.1)
    succeed(breaker, 1, duration=5.0)
    assert breaker.state is State.CLOSED  # 1 slow of 4 once the first three aged out


# --- what it looks like -------------------------------------------------------------------

def test_snapshot_of_a_closed_breaker(clock):
    breaker, _ = make(clock)
    fail(breaker, 2)
    assert breaker.snapshot() == {"provider": PROVIDER, "service": SERVICE, "state": "CLOSED", "failures": 2,
                                  "threshold": 5, "openedAt": None, "retryAt": None, "forced": False,
                                  "restingUntil": None, "changedAt": "2024-12-01T08:00:00.000Z"}  # its start


def test_snapshot_of_an_open_breaker_has_iso_utc_times_with_milliseconds():
    clock = FakeClock(start_wall=1_733_047_200.25)  # 2024-12-01T10:00:00.250Z
    breaker, _ = make(clock)
    open_breaker(breaker)
    assert breaker.snapshot() == {"provider": PROVIDER, "service": SERVICE, "state": "OPEN", "failures": 5,
                                  "threshold": 5, "openedAt": "2024-12-01T10:00:00.250Z",
                                  "retryAt": "2024-12-01T10:01:00.250Z", "forced": False, "restingUntil": None,
                                  "changedAt": "2024-12-01T10:00:00.250Z"}


def test_snapshot_of_a_forced_breaker_has_no_retry_time(clock):
    breaker, _ = make(clock)
    breaker.force_open()
    snapshot = breaker.snapshot()
    assert snapshot["state"] == "OPEN"
    assert snapshot["forced"] is True
    assert snapshot["openedAt"] == "2024-12-01T08:00:00.000Z"
    assert snapshot["retryAt"] is None


def test_snapshot_applies_the_lazy_half_open_check(clock):
    breaker, _ = make(clock)
    open_breaker(breaker)
    clock.advance(60.0)
    assert breaker.snapshot()["state"] == "HALF_OPEN"


# --- policies -----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "threshold", "timeout"), [("CRITICAL", 8, 120.0), ("STANDARD", 5, 60.0),
                                                            ("FAST", 3, 30.0)])
def test_profiles_carry_the_seed_design_numbers(name, threshold, timeout):
    policy = PROFILES[name]
    assert (policy.fail_threshold, policy.open_timeout, policy.half_open_max_calls) == (threshold, timeout, 1)
    # On top of the seed's counts: leave an upstream failing one call in five, and one refusing connections.
    assert (policy.failure_rate, policy.window, policy.min_calls) == (0.2, 10.0, 10)
    assert policy.min_failures == (5 if name == "CRITICAL" else 3)
    assert policy.trip_on_refused is True and policy.slow_call_rate is None


def test_there_are_exactly_three_profiles():
    assert set(PROFILES) == {"CRITICAL", "STANDARD", "FAST"}


def test_fast_profile_opens_after_three_failures_and_probes_after_thirty_seconds(clock):
    breaker, _ = make(clock, PROFILES["FAST"])
    fail(breaker, 3)
    assert breaker.state is State.OPEN
    clock.advance(29.0)
    assert breaker.allow() is None
    clock.advance(1.0)
    assert breaker.allow() is not None


@pytest.mark.parametrize("changes", [
    {"fail_threshold": 0}, {"open_timeout": -1.0}, {"half_open_max_calls": 0}, {"failure_rate": 0.0},
    {"failure_rate": 1.5}, {"window": 0.0}, {"min_calls": 0}, {"slow_call_rate": 0.5},
    {"slow_call_duration": 1.0}, {"slow_call_duration": -1.0, "slow_call_rate": 0.5},
])
def test_policy_rejects_bad_values(changes):
    with pytest.raises(ValueError):
        dataclasses.replace(PROFILES["STANDARD"], **changes)


def test_policy_rejects_a_non_integer_threshold_by_name():
    with pytest.raises(TypeError, match="fail_threshold"):
        BreakerPolicy(fail_threshold=2.5, open_timeout=1.0)


# --- defaults that survive an outage: rate trips, refused connections, abandoned tries ----------

@pytest.mark.parametrize(("name", "opens_at"), [("CRITICAL", 10), ("STANDARD", 8), ("FAST", 8)])
def test_every_profile_leaves_an_upstream_failing_three_calls_in_ten_although_they_never_line_up(clock, name,
                                                                                                 opens_at):
    breaker, events = make(clock, PROFILES[name])
    pattern = [False, True, False, False, True, False, False, True, False, False]  # 30 %, never 2 in a row
    for number, failed in enumerate(pattern[:opens_at], 1):
        assert breaker.state is State.CLOSED, f"opened before call {number}"
        (fail if failed else succeed)(breaker)
        clock.advance(0.1)
    # STANDARD and FAST: the third failure (call 8) came 7 calls after the first, a burst of 3/7;
    # CRITICAL waits for its 5 failures in a burst, or for 10 calls in the window (3/10).
    assert breaker.state is State.OPEN
    assert breaker.failures <= 1  # the consecutive count alone would never have opened it
    assert transitions(events) == [("CLOSED", "OPEN", "failure_rate")]


def test_a_burst_after_a_quiet_spell_is_judged_on_its_own_not_on_the_successes_before_it(clock):
    breaker, events = make(clock, PROFILES["STANDARD"])
    succeed(breaker, 40)  # a healthy vendor, 40 calls in the window
    clock.advance(1.0)
    for failed in [True, False, False, True, False, True]:  # then 3 failures in 6 calls
        assert breaker.state is State.CLOSED
        (fail if failed else succeed)(breaker)
    # 3/46 over the window is under 20 % (and under half of it), so not yet: the gate holds.
    assert breaker.state is State.CLOSED
    for failed in [True, False, True, True]:
        (fail if failed else succeed)(breaker)
        if breaker.state is State.OPEN:
            break
    # 6/49 is over half the rate (10 %) and the last 3 failures came within 4 calls: open.
    assert breaker.state is State.OPEN
    assert transitions(events) == [("CLOSED", "OPEN", "failure_rate")]


def test_a_healthy_vendors_rare_cluster_never_trips_it(clock):
    breaker, _ = make(clock, PROFILES["STANDARD"])
    for _ in range(5):
        succeed(breaker, 97)
        fail(breaker, 1)
        succeed(breaker, 1)
        fail(breaker, 1)
        succeed(breaker, 1)
        fail(breaker, 1)  # 3 failures within 5 calls, every 100 calls: 3 % over the window
        clock.advance(2.0)
    assert breaker.state is State.CLOSED


def test_failures_older_than_the_window_are_no_burst(clock):
    breaker, _ = make(clock, PROFILES["STANDARD"])
    fail(breaker, 2)
    succeed(breaker, 1)
    clock.advance(10.0)  # the two failures have left the window
    fail(breaker, 1)
    succeed(breaker, 1)
    assert breaker.state is State.CLOSED


def test_a_healthy_upstream_failing_one_call_in_ten_stays_closed_under_the_profiles(clock):
    breaker, _ = make(clock, PROFILES["STANDARD"])
    for _ in range(20):
        fail(breaker)
        succeed(breaker, 9)
        clock.advance(1.0)
    assert breaker.state is State.CLOSED


def test_a_refused_connection_opens_the_breaker_at_once(clock):
    breaker, events = make(clock, PROFILES["STANDARD"])
    breaker.allow().failure(0.001, refused=True)
    assert breaker.state is State.OPEN
    assert transitions(events) == [("CLOSED", "OPEN", "refused")]
    assert breaker.retry_at == pytest.approx(clock.time() + 60.0)


def test_trip_on_refused_false_counts_a_refused_connection_as_one_failure(clock):
    breaker, _ = make(clock, PROFILES["STANDARD"], trip_on_refused=False, failure_rate=None)
    for _ in range(4):
        breaker.allow().failure(0.001, refused=True)
    assert breaker.state is State.CLOSED and breaker.failures == 4
    breaker.allow().failure(0.001, refused=True)
    assert breaker.state is State.OPEN


def test_abandoned_tries_add_up_to_the_consecutive_threshold(clock):
    breaker, events = make(clock, PROFILES["STANDARD"])
    for _ in range(4):
        breaker.allow().abandoned(0.1)
    assert breaker.state is State.CLOSED
    assert [e.failures for e in events if isinstance(e, BreakerFailure)] == [1, 2, 3, 4]
    breaker.allow().abandoned(0.1)
    assert transitions(events) == [("CLOSED", "OPEN", "threshold")]


def test_abandoned_tries_are_not_failures_in_the_rate_window(clock):
    # A healthy upstream's slowest answers are hedged now and then: those must not add up to a rate trip.
    breaker, _ = make(clock, PROFILES["STANDARD"])
    for _ in range(10):
        breaker.allow().abandoned(0.1)
        succeed(breaker, 2)
    assert breaker.state is State.CLOSED


def test_an_abandoned_probe_reopens_the_breaker(clock):
    breaker, events = make(clock, PROFILES["FAST"])
    open_breaker(breaker)
    clock.advance(30.0)
    breaker.allow().abandoned(0.2)
    assert breaker.state is State.OPEN
    assert transitions(events)[-1] == ("HALF_OPEN", "OPEN", "probe_failed")


# --- rests: Retry-After holds for every request -------------------------------------------------

def test_a_rest_skips_the_upstream_until_it_ends_whatever_the_state(clock):
    breaker, events = make(clock)
    breaker.rest(clock.time() + 5.0)
    assert breaker.state is State.CLOSED
    assert breaker.allow() is None and breaker.resting
    assert breaker.resting_until == pytest.approx(clock.time() + 5.0)
    assert breaker.snapshot()["restingUntil"] == "2024-12-01T08:00:05.000Z"
    assert [e.until for e in events if isinstance(e, UpstreamRested)] == [pytest.approx(clock.time() + 5.0)]
    clock.advance(4.999)
    assert breaker.allow() is None
    assert breaker.wait_hint() == pytest.approx(0.001)


def test_after_a_rest_one_attempt_goes_first_and_the_rest_waits_for_how_it_ends(clock):
    breaker, _ = make(clock)
    breaker.rest(clock.time() + 5.0)
    clock.advance(5.0)
    first = breaker.allow()
    assert first is not None
    assert breaker.allow() is None  # the others still skip while the first try is out
    assert breaker.wait_hint() is None
    first.success(0.01)
    assert not breaker.resting and breaker.resting_until is None
    assert breaker.allow() is not None


def test_a_cancelled_first_try_after_a_rest_leaves_the_first_try_to_the_next_request(clock):
    breaker, _ = make(clock)
    breaker.rest(clock.time() + 1.0)
    clock.advance(1.0)
    breaker.allow().release()
    assert breaker.allow() is not None


def test_a_new_retry_after_on_the_first_try_starts_a_new_rest(clock):
    breaker, _ = make(clock)
    breaker.rest(clock.time() + 1.0)
    clock.advance(1.0)
    probe = breaker.allow()
    breaker.rest(clock.time() + 5.0)  # the vendor said "not yet" again, before the try is settled
    probe.failure(0.01)
    assert breaker.resting and breaker.resting_until == pytest.approx(clock.time() + 5.0)
    assert breaker.allow() is None


def test_a_shorter_rest_never_cuts_a_longer_one(clock):
    breaker, events = make(clock)
    breaker.rest(clock.time() + 10.0)
    breaker.rest(clock.time() + 2.0)
    assert breaker.resting_until == pytest.approx(clock.time() + 10.0)
    assert len([e for e in events if isinstance(e, UpstreamRested)]) == 1


def test_a_rest_is_capped_at_max_rest_and_max_rest_0_never_rests(clock):
    breaker, _ = make(clock, max_rest=60.0)
    breaker.rest(clock.time() + 86400 * 365)
    assert breaker.resting_until == pytest.approx(clock.time() + 60.0)
    never, events = make(clock, max_rest=0.0)
    never.rest(clock.time() + 30.0)
    assert not never.resting and never.allow() is not None and events == []


def test_a_rest_in_the_past_is_ignored(clock):
    breaker, events = make(clock)
    breaker.rest(clock.time() - 1.0)
    assert not breaker.resting and events == []


def test_reset_ends_a_rest(clock):
    breaker, events = make(clock)
    breaker.rest(clock.time() + 30.0)
    breaker.reset()
    assert not breaker.resting and breaker.allow() is not None
    assert transitions(events) == [("CLOSED", "CLOSED", "reset")]


def test_wait_hint_says_when_an_open_breaker_probes_and_nothing_for_a_forced_one(clock):
    breaker, _ = make(clock)
    assert breaker.wait_hint() == 0.0
    open_breaker(breaker)
    clock.advance(20.0)
    assert breaker.wait_hint() == pytest.approx(40.0)
    breaker.rest(clock.time() + 90.0)
    assert breaker.wait_hint() == pytest.approx(90.0)  # the later of the two
    breaker.force_open()
    assert breaker.wait_hint() is None


def test_would_allow_takes_no_permit(clock):
    breaker, _ = make(clock, half_open_max_calls=1)
    open_breaker(breaker)
    clock.advance(60.0)
    assert breaker.would_allow() and breaker.would_allow()
    assert breaker.allow() is not None
    assert not breaker.would_allow()


@pytest.mark.parametrize("changes", [{"max_rest": -1.0}, {"max_rest": float("nan")}, {"trip_on_refused": 1}])
def test_bad_rest_and_refused_settings_are_refused(changes):
    with pytest.raises((ValueError, TypeError)):
        dataclasses.replace(PROFILES["STANDARD"], **changes)


# --- telling a waiting retry that the gate shut --------------------------------------------------

def test_on_shut_listeners_hear_once_when_the_breaker_opens_or_a_rest_begins(clock):
    breaker, _ = make(clock, PROFILES["STANDARD"])
    heard: list[str] = []
    breaker.on_shut(lambda: heard.append("first"))
    forget = breaker.on_shut(lambda: heard.append("forgotten"))
    forget()
    breaker.allow().failure(0.01, refused=True)  # opens it
    assert heard == ["first"]
    breaker.reset()
    breaker.on_shut(lambda: heard.append("rest"))
    breaker.rest(clock.time() + 5)
    breaker.rest(clock.time() + 50)  # a listener is told once, not at every later shutting
    assert heard == ["first", "rest"]


def test_closing_or_half_opening_tells_nobody(clock):
    breaker, _ = make(clock, PROFILES["FAST"])
    heard: list[str] = []
    open_breaker(breaker)
    breaker.on_shut(lambda: heard.append("x"))
    clock.advance(30.0)
    assert breaker.state is State.HALF_OPEN
    breaker.allow().success(0.01)
    assert breaker.state is State.CLOSED and heard == []


def test_the_window_s_running_totals_match_a_recount_of_its_buckets():
    """The sums are kept as calls come and buckets expire, not recounted: after any run of calls,
    time steps (within a bucket, across some, past the whole window) and clears, they agree."""
    import math
    import random

    from proxy.resilience.breaker import _Window

    rng = random.Random(17)
    window = _Window(10.0, 3)
    now = 1000.0
    seen: list[tuple[float, bool, bool]] = []  # every call, to recount what is still inside the window
    for step in range(3000):
        roll = rng.random()
        if roll < 0.01:
            window.clear()
            seen.clear()
            continue
        now += rng.choice((0.0, 0.05, 0.2, 1.0, 3.0, 12.0)) if roll < 0.3 else 0.0
        failed, slow = rng.random() < 0.3, rng.random() < 0.2
        window.record(now, failed, slow)
        seen.append((now, failed, slow))
        oldest = math.floor(now * 6) - 59  # the earliest bucket still kept (60 buckets of 10/60 s)
        inside = [(f, s) for t, f, s in seen if math.floor(t * 6) >= oldest]
        assert window.totals(now) == (len(inside), sum(f for f, _ in inside), sum(s for _, s in inside)), step
    assert window.totals(now + 10.0) == (0, 0, 0)  # a whole window later, nothing is left
