"""Retry policies, the backoff schedule, Retry-After and the retry budget."""

from __future__ import annotations

import dataclasses
import random

import pytest

from proxy.clock import FakeClock
from proxy.resilience.outcome import Outcome
from proxy.resilience.retry_policy import (
    POLICIES,
    RetryBudget,
    RetryPolicy,
    backoff_cap,
    backoff_delay,
    parse_retry_after,
    retry_delay,
    should_retry,
)

NOW = 1_733_040_000.0  # Sun, 01 Dec 2024 08:00:00 GMT, FakeClock's default wall time


class FixedRandom:
    """An rng whose draws are chosen by the test."""

    def __init__(self, *values: float) -> None:
        self._values = list(values)
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return self._values.pop(0)


def policy(**changes) -> RetryPolicy:
    base = RetryPolicy(retries=3, base_delay=0.1, max_delay=2.0, retry_on=frozenset({"5xx", "timeout"}))
    return dataclasses.replace(base, **changes)


# --- should_retry -----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "outcome", "status"), [
    ("5xx", Outcome.HTTP_5XX, 502),
    ("429", Outcome.HTTP_429, 429),
    ("timeout", Outcome.TIMEOUT, None),
    ("connect", Outcome.CONNECT, None),
    ("reset", Outcome.RESET, None),
    ("malformed", Outcome.MALFORMED, None),
])
def test_each_retry_class_is_retried_only_when_listed(name, outcome, status):
    assert should_retry(policy(retry_on=frozenset({name})), outcome, status) is True
    others = frozenset({"5xx", "429", "timeout", "connect", "reset", "malformed"}) - {name}
    assert should_retry(policy(retry_on=others), outcome, status) is False


def test_an_explicit_status_code_is_retried_without_its_class():
    only_503 = policy(retry_on=frozenset({"503"}))
    assert should_retry(only_503, Outcome.HTTP_5XX, 503) is True
    assert should_retry(only_503, Outcome.HTTP_5XX, 500) is False
    assert should_retry(only_503, Outcome.TIMEOUT, None) is False


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_4xx_answers_are_never_retried_even_with_every_class_listed(status):
    everything = policy(retry_on=frozenset({"5xx", "429", "timeout", "connect", "reset", "malformed", "500"}))
    assert should_retry(everything, Outcome.CLIENT_ERROR, status) is False


def test_429_is_retried_only_when_listed():
    assert should_retry(POLICIES["DEFAULT"], Outcome.HTTP_429, 429) is False
    assert should_retry(POLICIES["AGGRESSIVE"], Outcome.HTTP_429, 429) is True


@pytest.mark.parametrize("outcome", [Outcome.SUCCESS, Outcome.CLIENT_ERROR, Outcome.BREAKER_OPEN,
                                     Outcome.DEADLINE, Outcome.BUDGET])
def test_answers_and_skipped_attempts_are_never_retried(outcome):
    everything = policy(retry_on=frozenset({"5xx", "429", "timeout", "connect", "reset", "malformed"}))
    assert should_retry(everything, outcome, 200 if outcome is Outcome.SUCCESS else None) is False


def test_the_none_policy_retries_nothing():
    assert POLICIES["NONE"].retries == 0
    for outcome in (Outcome.HTTP_5XX, Outcome.TIMEOUT, Outcome.CONNECT, Outcome.RESET):
        assert should_retry(POLICIES["NONE"], outcome, 503 if outcome is Outcome.HTTP_5XX else None) is False


# --- policies and validation ------------------------------------------------------------------

def test_named_policies_have_the_documented_numbers():
    numbers = {name: (p.retries, p.base_delay, p.max_delay, p.retry_on) for name, p in POLICIES.items()}
    core = {"5xx", "timeout", "connect", "reset"}
    assert numbers == {
        "NONE": (0, 0.0, 0.0, frozenset()),
        "CONSERVATIVE": (2, 0.2, 2.0, frozenset(core)),
        "DEFAULT": (3, 0.1, 2.0, frozenset(core | {"malformed"})),
        "AGGRESSIVE": (5, 0.05, 5.0, frozenset(core | {"malformed", "429"})),
    }


@pytest.mark.parametrize(("changes", "message"), [
    ({"retries": -1}, "retries"),
    ({"base_delay": -0.1}, "base_delay"),
    ({"max_delay": -1.0, "base_delay": 0.0}, "max_delay"),
    ({"base_delay": 3.0, "max_delay": 2.0}, "max_delay"),
    ({"retry_on": frozenset({"5xx", "flaky"})}, "flaky"),
    ({"retry_on": frozenset({"404"})}, "4xx"),
    ({"retry_on": frozenset({"600"})}, "600"),
])
def test_policy_rejects_bad_values_naming_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        policy(**changes)


def test_retry_on_is_normalised_to_lower_case_strings():
    assert policy(retry_on=["5XX", 503, "429"]).retry_on == frozenset({"5xx", "503", "429"})


# --- backoff ----------------------------------------------------------------------------------

def test_backoff_caps_double_each_retry_and_stop_at_max_delay():
    p = policy(base_delay=0.1, max_delay=2.0)
    assert [backoff_cap(p, n) for n in range(1, 8)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert backoff_cap(p, 10_000) == 2.0


def test_backoff_cap_rejects_retry_number_zero():
    with pytest.raises(ValueError):
        backoff_cap(policy(), 0)


def test_backoff_delay_is_the_cap_scaled_by_the_rng_draw():
    p = policy(base_delay=0.1, max_delay=2.0)
    rng = FixedRandom(0.0, 0.5, 0.999999)
    assert backoff_delay(p, 3, rng) == 0.0
    assert backoff_delay(p, 3, rng) == pytest.approx(0.2)
    assert backoff_delay(p, 3, rng) == pytest.approx(0.4, rel=1e-5)
    assert rng.draws == 3


def test_full_jitter_stays_within_the_cap_and_spreads_over_it():
    p = POLICIES["DEFAULT"]
    rng = random.Random(1234)
    for retry_number in range(1, 8):
        cap = backoff_cap(p, retry_number)
        draws = [backoff_delay(p, retry_number, rng) for _ in range(2000)]
        assert all(0.0 <= d < cap for d in draws)
        assert min(draws) < 0.05 * cap  # full jitter: reaches near zero...
        assert max(draws) > 0.95 * cap  # ...and near the cap


def test_a_zero_base_delay_never_waits():
    assert backoff_delay(POLICIES["NONE"], 1, FixedRandom(0.9)) == 0.0


# --- Retry-After ------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("120", 120.0),
    ("0", 0.0),
    (" 7 ", 7.0),
    ("1.5", 1.5),
    ("-1", None),
    ("abc", None),
    ("", None),
    ("   ", None),
    (None, None),
    ("12abc", None),
    ("inf", None),
    ("nan", None),
])
def test_retry_after_seconds(value, expected):
    assert parse_retry_after(value, NOW) == expected


@pytest.mark.parametrize("value", [
    "Sun, 01 Dec 2024 08:00:30 GMT",     # IMF-fixdate
    "Sunday, 01-Dec-24 08:00:30 GMT",    # obsolete RFC 850
    "Sun Dec  1 08:00:30 2024",          # obsolete asctime
])
def test_retry_after_http_date_is_seconds_from_now(value):
    assert parse_retry_after(value, NOW) == pytest.approx(30.0)


def test_retry_after_date_in_the_past_means_now():
    assert parse_retry_after("Sun, 01 Dec 2024 07:59:00 GMT", NOW) == 0.0


# --- retry_delay ------------------------------------------------------------------------------

def test_retry_delay_uses_jittered_backoff_without_retry_after():
    p = policy(base_delay=0.1, max_delay=2.0)
    assert retry_delay(p, 2, FixedRandom(0.5), None, remaining=10.0) == pytest.approx(0.1)


def test_retry_delay_honours_retry_after_instead_of_backoff():
    p = policy(base_delay=0.1, max_delay=2.0)
    rng = FixedRandom()  # would fail if drawn from
    assert retry_delay(p, 1, rng, 1.5, remaining=10.0) == 1.5
    assert rng.draws == 0


def test_retry_delay_caps_retry_after_at_max_delay():
    p = policy(base_delay=0.1, max_delay=2.0)
    assert retry_delay(p, 1, FixedRandom(), 120.0, remaining=10.0) == 2.0


def test_retry_delay_is_none_when_it_would_overrun_the_deadline():
    p = policy(base_delay=0.1, max_delay=2.0)
    assert retry_delay(p, 1, FixedRandom(), 1.5, remaining=1.5) is None
    assert retry_delay(p, 1, FixedRandom(), 1.5, remaining=1.6) == 1.5
    assert retry_delay(p, 5, FixedRandom(0.5), None, remaining=0.8) is None   # 0.8 s jittered wait
    assert retry_delay(p, 5, FixedRandom(0.5), None, remaining=0.81) == pytest.approx(0.8)


def test_retry_delay_is_none_when_the_deadline_has_passed():
    assert retry_delay(policy(), 1, FixedRandom(0.0), None, remaining=0.0) is None


# --- retry budget -----------------------------------------------------------------------------

def test_retry_budget_holds_retries_to_a_fraction_of_traffic_in_a_sustained_outage():
    clock = FakeClock(start_mono=0.0)
    budget = RetryBudget(clock, ratio=0.2, min_per_second=10.0, window=10.0)
    requests: list[float] = []
    granted: list[float] = []
    for k in range(1000):  # 10 requests a second for 100 s, every one failing and retrying 3 times
        clock.advance(k / 10 - clock.monotonic())
        budget.record_request()
        requests.append(clock.monotonic())
        for _ in range(3):
            if not budget.try_spend():
                break
            granted.append(clock.monotonic())

    def within(times: list[float], start: int) -> int:
        return sum(1 for t in times if start <= t < start + 10)

    for start in range(0, 91):
        assert within(granted, start) <= 0.2 * within(requests, start) + 10.0 * 10.0, start
    assert budget.exhausted_count > 0
    assert len(granted) >= 0.2 * 1000 + 100  # the budget does let retries through
    assert len(granted) < 3 * 1000 / 2


def test_retry_budget_recovers_once_time_passes(clock):
    budget = RetryBudget(clock, ratio=0.2, min_per_second=1.0, window=10.0)
    while budget.try_spend():
        pass
    refused = budget.exhausted_count
    assert refused == 1
    assert budget.try_spend() is False
    clock.advance(5.0)
    assert budget.try_spend() is False  # still inside the window
    clock.advance(6.0)
    assert budget.try_spend() is True
    assert budget.exhausted_count == refused + 2  # the two refusals above, not this grant


def test_retry_budget_floor_is_min_per_second_times_window(clock):
    budget = RetryBudget(clock, ratio=0.2, min_per_second=10.0, window=10.0)
    grants = 0
    while budget.try_spend():
        grants += 1
    assert grants == 100


def test_retry_budget_grows_with_requests_by_the_ratio(clock):
    budget = RetryBudget(clock, ratio=0.2, min_per_second=0.0, window=10.0)
    assert budget.try_spend() is False
    for _ in range(10):
        budget.record_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]


def test_retry_budget_forgets_requests_older_than_the_window(clock):
    budget = RetryBudget(clock, ratio=0.5, min_per_second=0.0, window=10.0)
    for _ in range(10):
        budget.record_request()
    clock.advance(10.0)
    assert budget.try_spend() is False


@pytest.mark.parametrize("changes", [{"ratio": -0.1}, {"min_per_second": -1.0}, {"window": 0.0}])
def test_retry_budget_rejects_bad_settings(clock, changes):
    with pytest.raises(ValueError):
        RetryBudget(clock, **changes)
