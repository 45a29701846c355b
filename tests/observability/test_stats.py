"""Per-minute statistics: windows on a fake clock, percentiles within the documented resolution."""

from __future__ import annotations

import math
import random

import pytest

from proxy import signals
from proxy.clock import FakeClock
from proxy.observability.stats import GROWTH, MAX_MINUTES, Stats
from proxy.resilience.outcome import Outcome

SERVICE, PRIMARY, SECONDARY = "fx", "fx_primary", "fx_secondary"


def attempt(outcome: str | Outcome = "success", duration: float = 0.1,
            provider: str = PRIMARY, service: str = SERVICE) -> signals.AttemptFinished:
    return signals.AttemptFinished(service=service, provider=provider, outcome=outcome, status=200, duration=duration,
                                  attempt=1, method="GET", url="https://primary.example/v6", request_id="r1")


def finished(status: int = 200, duration: float = 0.05, service: str = SERVICE) -> signals.RequestFinished:
    return signals.RequestFinished(service=service, route="latest", method="GET", path="/fx/latest/USD", status=status,
                                  cache="MISS", upstream=PRIMARY, attempts=(), duration=duration, request_id="r1")


def nearest_rank(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@pytest.fixture
def stats(clock: FakeClock) -> Stats:
    return Stats(clock)


def test_window_counts_requests_errors_and_error_rate_per_provider(stats: Stats) -> None:
    for outcome in ["success"] * 7 + ["client_error", "http_5xx", Outcome.TIMEOUT]:
        stats(attempt(outcome))
    figures = stats.window(5)["providers"][PRIMARY]
    assert figures["service"] == SERVICE
    assert (figures["requests"], figures["errors"], figures["errorRate"]) == (10, 2, 0.2)


def test_error_rate_is_rounded_to_4_decimals(stats: Stats) -> None:
    for outcome in ["http_5xx"] + ["success"] * 2:
        stats(attempt(outcome))
    assert stats.window(1)["providers"][PRIMARY]["errorRate"] == 0.3333


def test_registered_providers_without_traffic_appear_with_zeros(stats: Stats) -> None:
    stats.register(SERVICE, SECONDARY)
    window = stats.window(60)
    assert window["providers"][SECONDARY] == {"service": SERVICE, "requests": 0, "errors": 0, "errorRate": 0.0,
                                              "p50": None, "p95": None, "p99": None, "cacheHitRate": None,
                                              "responses": {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "none": 0}}
    assert window["services"][SERVICE] == {"requests": 0, "errors": 0, "errorRate": 0.0, "p50": None, "p95": None,
                                           "p99": None, "cacheHitRate": None, "stale": 0}


def test_one_minute_window_sees_only_the_current_minute_and_60_minutes_see_both(
        stats: Stats, clock: FakeClock) -> None:
    stats(attempt())
    clock.advance(30 * 60)
    stats(attempt())
    assert stats.window(1)["providers"][PRIMARY]["requests"] == 1
    assert stats.window(30)["providers"][PRIMARY]["requests"] == 1
    assert stats.window(31)["providers"][PRIMARY]["requests"] == 2
    assert stats.window(60)["providers"][PRIMARY]["requests"] == 2
    clock.advance(30 * 60)  # the first request is now 60 minutes old: out of a 60-minute window
    assert stats.window(60)["providers"][PRIMARY]["requests"] == 1
    assert stats.window(61)["providers"][PRIMARY]["requests"] == 2


def test_window_reports_its_bounds_in_iso_utc_with_milliseconds(stats: Stats, clock: FakeClock) -> None:
    clock.advance(12.345)  # the fake wall clock starts at 2024-12-01T08:00:00Z
    window = stats.window(60)
    assert window["minutes"] == 60
    assert window["to"] == "2024-12-01T08:00:12.345Z"
    assert window["from"] == "2024-12-01T07:01:00.000Z"


def test_percentiles_are_within_the_documented_factor_of_the_true_values(stats: Stats) -> None:
    rng = random.Random(7)
    samples_ms = [math.exp(rng.uniform(math.log(2), math.log(20_000))) for _ in range(2000)]
    for ms in samples_ms:
        stats(attempt(duration=ms / 1000))
    figures = stats.window(1)["providers"][PRIMARY]
    for key, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        true = nearest_rank(samples_ms, q)
        assert true / GROWTH <= figures[key] <= true * GROWTH, (key, figures[key], true)


def test_percentiles_of_1_to_100_ms(stats: Stats) -> None:
    order = list(range(1, 101))
    random.Random(3).shuffle(order)
    for ms in order:
        stats(attempt(duration=ms / 1000))
    figures = stats.window(1)["providers"][PRIMARY]
    assert 50 / GROWTH <= figures["p50"] <= 50 * GROWTH
    assert 95 / GROWTH <= figures["p95"] <= 95 * GROWTH
    assert 99 / GROWTH <= figures["p99"] <= 100  # never above the largest sample
    assert figures["p50"] < figures["p95"] <= figures["p99"]


def test_a_single_sample_is_reported_exactly(stats: Stats) -> None:
    stats(attempt(duration=0.25))
    figures = stats.window(1)["providers"][PRIMARY]
    assert (figures["p50"], figures["p95"], figures["p99"]) == (250.0, 250.0, 250.0)


def test_latencies_beyond_60_seconds_stay_within_what_was_seen(stats: Stats) -> None:
    for seconds in (70.0, 90.0, 120.0):
        stats(attempt(duration=seconds))
    figures = stats.window(1)["providers"][PRIMARY]
    assert 70_000 <= figures["p50"] <= 120_000
    assert figures["p99"] == 120_000.0


def test_sub_millisecond_latencies_are_reported_below_1ms(stats: Stats) -> None:
    for seconds in (0.0002, 0.0004, 0.0009):
        stats(attempt(duration=seconds))
    assert 0.2 <= stats.window(1)["providers"][PRIMARY]["p99"] <= 0.9


def test_service_figures_come_from_answers_and_cache_lookups(stats: Stats) -> None:
    for status in (200, 404, 502, 504):
        stats(finished(status, duration=0.04))
    for result in ["hit"] * 3 + ["miss", "stale"] + ["bypass"] * 2:
        stats(signals.CacheLookup(SERVICE, result))
    stats(attempt())
    window = stats.window(5)
    service = window["services"][SERVICE]
    assert (service["requests"], service["errors"], service["errorRate"]) == (4, 2, 0.5)
    assert service["cacheHitRate"] == 60.0  # 3 hits of 5 lookups; bypass is not a lookup that could hit
    assert service["stale"] == 1
    assert service["p50"] == 40.0
    assert window["providers"][PRIMARY]["cacheHitRate"] == 60.0


def test_services_are_kept_apart(stats: Stats) -> None:
    stats(signals.CacheLookup(SERVICE, "hit"))
    stats(signals.CacheLookup("flights", "miss"))
    stats(attempt(provider="kac", service="flights", outcome="http_5xx"))
    window = stats.window(5)
    assert window["services"][SERVICE]["cacheHitRate"] == 100.0
    assert window["services"]["flights"]["cacheHitRate"] == 0.0
    assert window["providers"]["kac"]["service"] == "flights"
    assert window["providers"]["kac"]["cacheHitRate"] == 0.0
    assert PRIMARY not in window["providers"]


@pytest.mark.parametrize("minutes", [0, -1, 1441, "abc", "60", True, False, 60.0, None])
def test_window_rejects_anything_but_a_whole_number_from_1_to_1440(stats: Stats, minutes: object) -> None:
    with pytest.raises(ValueError, match="1 to 1440"):
        stats.window(minutes)  # type: ignore[arg-type]


@pytest.mark.parametrize("minutes", [1, 1440])
def test_window_accepts_its_bounds(stats: Stats, minutes: int) -> None:
    assert stats.window(minutes)["minutes"] == minutes


def test_memory_stays_bounded_to_1440_minute_buckets(stats: Stats, clock: FakeClock) -> None:
    for _ in range(3000):
        stats(attempt())
        clock.advance(60)
    assert stats.buckets_kept <= MAX_MINUTES
    requests = stats.window(1440)["providers"][PRIMARY]["requests"]
    assert requests == 1439  # the current (empty) minute plus the 1439 before it
    stats(attempt())
    assert stats.buckets_kept == MAX_MINUTES
    assert stats.window(1440)["providers"][PRIMARY]["requests"] == 1440


def test_recent_error_rate_covers_the_last_5_minutes(stats: Stats, clock: FakeClock) -> None:
    assert stats.recent_error_rate(PRIMARY) is None
    for _ in range(4):
        stats(attempt("timeout"))
    clock.advance(5 * 60)  # those failures are now outside the 5-minute window
    stats(attempt("http_5xx"))
    stats(attempt("success"))
    assert stats.recent_error_rate(PRIMARY) == 0.5
    assert stats.recent_error_rate(PRIMARY, minutes=6) == 5 / 6
    assert stats.recent_error_rate(SECONDARY) is None


def test_forget_drops_a_provider_and_its_history(stats: Stats) -> None:
    stats.register(SERVICE, PRIMARY)
    stats.register(SERVICE, SECONDARY)
    stats(attempt(provider=PRIMARY))
    stats.forget(PRIMARY)
    window = stats.window(60)
    assert PRIMARY not in window["providers"]
    assert SECONDARY in window["providers"]
    assert stats.recent_error_rate(PRIMARY) is None
    stats(attempt(provider=PRIMARY))  # a request still finishing on the old route table
    assert PRIMARY not in stats.window(60)["providers"] and stats.recent_error_rate(PRIMARY) is None
    stats.register(SERVICE, PRIMARY)  # put back by a later reload: counted again
    stats(attempt(provider=PRIMARY))
    assert stats.window(60)["providers"][PRIMARY]["requests"] == 1


def test_forget_service_drops_its_history_and_late_requests(stats: Stats) -> None:
    stats.register(SERVICE, PRIMARY)
    stats.register("flights", "flights_primary")
    stats(finished())
    stats(finished(service="flights"))
    stats.forget(PRIMARY)
    stats.forget_service(SERVICE)
    window = stats.window(60)
    assert SERVICE not in window["services"] and window["services"]["flights"]["requests"] == 1
    stats(finished())  # a request still finishing on the old route table
    stats(signals.CacheLookup(SERVICE, "hit", 1.0))
    assert SERVICE not in stats.window(60)["services"]
    stats.register(SERVICE, PRIMARY)  # put back by a later reload: counted again, from zero
    stats(finished())
    assert stats.window(60)["services"][SERVICE]["requests"] == 1


def test_unknown_events_are_ignored(stats: Stats) -> None:
    stats(object())
    stats(signals.Coalesced(SERVICE))
    window = stats.window(60)
    assert window["providers"] == {} and window["services"] == {}


def test_an_upstream_s_answers_are_counted_by_status_class(stats: Stats) -> None:
    for status, outcome in ((200, "success"), (204, "success"), (301, "success"), (404, "client_error"),
                            (503, "http_5xx"), (None, "timeout")):
        stats(signals.AttemptFinished(service=SERVICE, provider=PRIMARY, outcome=outcome, status=status,
                                      duration=0.01, attempt=1, method="GET", url="u", request_id="r"))
    assert stats.window(60)["providers"][PRIMARY]["responses"] == {"2xx": 2, "3xx": 1, "4xx": 1, "5xx": 1, "none": 1}
