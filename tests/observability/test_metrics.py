"""Prometheus metrics fed by events: rendered, parsed back and checked sample by sample."""

from __future__ import annotations

import math

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import signals
from proxy.clock import FakeClock
from proxy.observability.metrics import DURATION_BUCKETS, Metrics
from proxy.resilience.outcome import Outcome

SERVICE, PRIMARY, SECONDARY = "fx", "fx_primary", "fx_secondary"


def parse(metrics: Metrics) -> list:
    body, _ = metrics.render()
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The one sample with exactly these labels, or None when it is not exported."""
    found = [s.value for s in parse(metrics) if s.name == name and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else None


def attempt(outcome: str | Outcome = "success", duration: float = 0.1, provider: str = PRIMARY,
            url: str = "https://primary.example/v6/latest/USD") -> signals.AttemptFinished:
    return signals.AttemptFinished(service=SERVICE, provider=provider, outcome=outcome, status=200, duration=duration,
                                  attempt=1, method="GET", url=url, request_id="r1")


def finished(status: int = 200, *, duration: float = 0.05, upstream: str | None = PRIMARY, fallback: bool = False,
             path: str = "/fx/latest/USD") -> signals.RequestFinished:
    return signals.RequestFinished(service=SERVICE, route="rates", method="GET", path=path, status=status,
                                  cache="MISS", upstream=upstream, attempts=((PRIMARY, "success"),),
                                  duration=duration, request_id="r1", fallback=fallback)


def transition(old: str, new: str) -> signals.BreakerTransition:
    return signals.BreakerTransition(SERVICE, PRIMARY, old, new, "threshold")


def lookup(result: str) -> signals.CacheLookup:
    return signals.CacheLookup(SERVICE, result)


@pytest.fixture
def metrics(clock: FakeClock) -> Metrics:
    return Metrics(clock)


def test_attempts_are_counted_by_outcome_and_only_failures_count_as_errors(metrics: Metrics) -> None:
    for outcome in ["success", "success", "client_error", "http_5xx", "http_5xx", "http_5xx", "timeout", "http_429"]:
        metrics(attempt(outcome))

    def requests(outcome: str) -> float | None:
        return value(metrics, "external_requests_total", service=SERVICE, provider=PRIMARY, outcome=outcome)

    def errors(reason: str) -> float | None:
        return value(metrics, "external_request_errors_total", service=SERVICE, provider=PRIMARY, reason=reason)

    assert (requests("success"), requests("client_error"), requests("http_5xx"), requests("timeout")) == (2, 1, 3, 1)
    assert (errors("http_5xx"), errors("timeout"), errors("http_429")) == (3, 1, 1)
    assert errors("success") is None and errors("client_error") is None


def test_an_outcome_given_as_enum_member_is_labelled_with_its_value(metrics: Metrics) -> None:
    metrics(attempt(Outcome.HTTP_5XX))
    assert value(metrics, "external_requests_total", service=SERVICE, provider=PRIMARY, outcome="http_5xx") == 1
    assert value(metrics, "external_request_errors_total", service=SERVICE, provider=PRIMARY, reason="http_5xx") == 1


def test_attempt_duration_histogram_has_buckets_from_5ms_to_30s(metrics: Metrics) -> None:
    for duration in (0.003, 0.2, 0.2, 45.0):
        metrics(attempt(duration=duration))
    buckets = {s.labels["le"]: s.value for s in parse(metrics)
               if s.name == "external_request_duration_seconds_bucket" and s.labels["provider"] == PRIMARY}
    assert [float(le) for le in buckets if le != "+Inf"] == list(DURATION_BUCKETS)
    assert min(DURATION_BUCKETS) == 0.005 and max(DURATION_BUCKETS) == 30.0
    assert (buckets["0.005"], buckets["0.1"], buckets["0.25"], buckets["30.0"], buckets["+Inf"]) == (1, 1, 3, 3, 4)
    assert value(metrics, "external_request_duration_seconds_sum", service=SERVICE,
                 provider=PRIMARY) == pytest.approx(45.403)


def test_skipped_upstreams_are_counted_apart_from_requests(metrics: Metrics) -> None:
    metrics(signals.UpstreamSkipped(SERVICE, PRIMARY, "breaker_open", "r1"))
    assert value(metrics, "upstream_skipped_total", service=SERVICE, provider=PRIMARY, reason="breaker_open") == 1
    assert not [s for s in parse(metrics) if s.name == "external_requests_total"]


def test_breaker_open_gauge_goes_0_1_0_and_state_is_one_hot(metrics: Metrics) -> None:
    metrics.register_provider(SERVICE, PRIMARY)

    def snapshot() -> tuple[float | None, dict[str, float | None]]:
        states = {state: value(metrics, "circuit_breaker_state", service=SERVICE, provider=PRIMARY, state=state)
                  for state in ("CLOSED", "OPEN", "HALF_OPEN")}
        return value(metrics, "circuit_breaker_open", service=SERVICE, provider=PRIMARY), states

    assert snapshot() == (0, {"CLOSED": 1, "OPEN": 0, "HALF_OPEN": 0})
    metrics(transition("CLOSED", "OPEN"))
    assert snapshot() == (1, {"CLOSED": 0, "OPEN": 1, "HALF_OPEN": 0})
    metrics(transition("OPEN", "HALF_OPEN"))
    assert snapshot() == (0, {"CLOSED": 0, "OPEN": 0, "HALF_OPEN": 1})
    metrics(transition("HALF_OPEN", "OPEN"))
    metrics(transition("OPEN", "HALF_OPEN"))
    metrics(transition("HALF_OPEN", "CLOSED"))
    assert snapshot() == (0, {"CLOSED": 1, "OPEN": 0, "HALF_OPEN": 0})
    to = {state: value(metrics, "circuit_breaker_transitions_total", service=SERVICE, provider=PRIMARY, to=state)
          for state in ("CLOSED", "OPEN", "HALF_OPEN")}
    assert to == {"CLOSED": 1, "OPEN": 2, "HALF_OPEN": 2}


def test_registering_again_keeps_values_unless_a_breaker_state_is_given(metrics: Metrics) -> None:
    metrics.register_provider(SERVICE, PRIMARY)
    assert value(metrics, "retries_total", service=SERVICE, provider=PRIMARY) == 0
    metrics(signals.RetryScheduled(SERVICE, PRIMARY, 2, 0.1, "r1"))
    metrics(transition("CLOSED", "OPEN"))
    metrics.register_provider(SERVICE, PRIMARY)
    assert value(metrics, "retries_total", service=SERVICE, provider=PRIMARY) == 1
    assert value(metrics, "circuit_breaker_open", service=SERVICE, provider=PRIMARY) == 1
    metrics.register_provider(SERVICE, PRIMARY, state="CLOSED")  # a reload replaced the breaker
    assert value(metrics, "circuit_breaker_open", service=SERVICE, provider=PRIMARY) == 0
    assert value(metrics, "circuit_breaker_state", service=SERVICE, provider=PRIMARY, state="CLOSED") == 1


def test_forget_provider_removes_its_series_and_keeps_the_others(metrics: Metrics) -> None:
    for provider in (PRIMARY, SECONDARY):
        metrics.register_provider(SERVICE, provider)
        metrics(attempt("http_5xx", provider=provider))
        metrics(signals.RetryBudgetExhausted(SERVICE, provider, "r1"))
    metrics(finished(upstream=PRIMARY, fallback=True))
    metrics.forget_provider(SERVICE, PRIMARY)
    samples = parse(metrics)
    assert not [s for s in samples if s.labels.get("provider") == PRIMARY]
    assert value(metrics, "circuit_breaker_open", service=SERVICE, provider=SECONDARY) == 0
    assert value(metrics, "external_request_errors_total", service=SERVICE, provider=SECONDARY, reason="http_5xx") == 1
    # A request still finishing on the old route table: counted nowhere, and no series comes back.
    metrics(attempt(provider=PRIMARY))
    metrics(signals.BreakerTransition(SERVICE, PRIMARY, "CLOSED", "OPEN", "threshold"))
    metrics(finished(upstream=PRIMARY, fallback=True))
    assert not [s for s in parse(metrics) if s.labels.get("provider") == PRIMARY]
    assert value(metrics, "proxy_requests_total", service=SERVICE, route="rates", code="200", cache="miss") == 2  # the service still counts
    # Put back by a later reload: registered again, counted again.
    metrics.register_provider(SERVICE, PRIMARY)
    metrics(attempt(provider=PRIMARY))
    assert value(metrics, "external_requests_total", service=SERVICE, provider=PRIMARY, outcome="success") == 1


def test_forget_service_removes_every_series_labelled_with_it(metrics: Metrics) -> None:
    metrics.register_provider(SERVICE, PRIMARY)
    metrics.register_provider("flights", "kac")
    metrics(lookup("hit"))
    metrics(finished())
    metrics.forget_service(SERVICE)
    samples = parse(metrics)
    assert not [s for s in samples if s.labels.get("service") == SERVICE]
    assert value(metrics, "circuit_breaker_open", service="flights", provider="kac") == 0
    assert metrics.hit_rate(SERVICE) is None
    metrics(lookup("hit"))  # late events of the removed service bring nothing back
    metrics(finished())
    metrics(attempt())
    assert not [s for s in parse(metrics) if s.labels.get("service") == SERVICE]


def test_cache_lookups_are_counted_by_result(metrics: Metrics) -> None:
    for result in ("hit", "hit", "miss", "stale", "bypass", "bypass", "bypass"):
        metrics(lookup(result))
    counts = {r: value(metrics, "cache_requests_total", service=SERVICE, result=r)
              for r in ("hit", "miss", "stale", "bypass")}
    assert counts == {"hit": 2, "miss": 1, "stale": 1, "bypass": 3}


def test_cache_hit_rate_is_percent_of_hits_among_non_bypass_lookups(metrics: Metrics) -> None:
    for result in ("hit", "hit", "hit", "miss", "bypass", "bypass"):
        metrics(lookup(result))
    assert value(metrics, "cache_hit_rate", service=SERVICE) == 75.0
    metrics(lookup("stale"))  # a stale answer is not a hit
    assert value(metrics, "cache_hit_rate", service=SERVICE) == 60.0
    assert metrics.hit_rate(SERVICE) == 60.0


def test_cache_hit_rate_covers_exactly_the_last_5_minutes(metrics: Metrics, clock: FakeClock) -> None:
    metrics(lookup("miss"))
    clock.advance(200)
    for _ in range(3):
        metrics(lookup("hit"))
    assert value(metrics, "cache_hit_rate", service=SERVICE) == 75.0
    clock.advance(99)  # the miss is 299 s old: still inside
    assert value(metrics, "cache_hit_rate", service=SERVICE) == 75.0
    clock.advance(1)  # 300 s old: aged out on render, with no new lookup
    assert value(metrics, "cache_hit_rate", service=SERVICE) == 100.0


def test_cache_hit_rate_disappears_after_5_minutes_without_lookups(metrics: Metrics, clock: FakeClock) -> None:
    metrics(lookup("miss"))
    assert value(metrics, "cache_hit_rate", service=SERVICE) == 0.0
    clock.advance(300)
    assert value(metrics, "cache_hit_rate", service=SERVICE) is None  # no data: `< 50` cannot fire
    assert metrics.hit_rate(SERVICE) is None
    metrics(lookup("bypass"))  # bypass traffic alone has no hit rate
    assert value(metrics, "cache_hit_rate", service=SERVICE) is None
    metrics(lookup("hit"))
    assert value(metrics, "cache_hit_rate", service=SERVICE) == 100.0


def test_proxy_requests_are_counted_by_status_code_with_duration(metrics: Metrics) -> None:
    metrics(finished(200, duration=0.02))
    metrics(finished(200, duration=0.02))
    metrics(finished(503, duration=1.5))
    assert value(metrics, "proxy_requests_total", service=SERVICE, route="rates", code="200", cache="miss") == 2
    assert value(metrics, "proxy_requests_total", service=SERVICE, route="rates", code="503", cache="miss") == 1
    assert value(metrics, "proxy_request_duration_seconds_count", service=SERVICE) == 3
    assert value(metrics, "proxy_request_duration_seconds_bucket", service=SERVICE, le="0.025") == 2
    assert value(metrics, "proxy_request_duration_seconds_bucket", service=SERVICE, le="1.0") == 2
    assert value(metrics, "proxy_request_duration_seconds_bucket", service=SERVICE, le="2.5") == 3


def test_fallbacks_count_only_fallback_answers_by_the_upstream_that_served(metrics: Metrics) -> None:
    metrics.register_provider(SERVICE, SECONDARY)
    metrics(finished(upstream=PRIMARY))
    metrics(finished(upstream=SECONDARY, fallback=True))
    metrics(finished(upstream=SECONDARY, fallback=True))
    assert value(metrics, "fallbacks_total", service=SERVICE, provider=SECONDARY) == 2
    assert value(metrics, "fallbacks_total", service=SERVICE, provider=PRIMARY) is None


def test_stale_serves_are_counted_with_their_age_from_1_minute_to_7_days(metrics: Metrics) -> None:
    metrics(signals.StaleServed(SERVICE, "/fx/latest/USD", 7200.0, PRIMARY, "error", "r1"))
    metrics(signals.StaleServed(SERVICE, "/fx/latest/EUR", 30.0, PRIMARY, "timeout", "r2"))
    assert value(metrics, "stale_served_total", service=SERVICE, reason="error") == 1
    assert value(metrics, "stale_served_total", service=SERVICE, reason="timeout") == 1
    buckets = {float(s.labels["le"]): s.value for s in parse(metrics) if s.name == "stale_served_age_seconds_bucket"}
    assert min(buckets) == 60.0 and max(b for b in buckets if math.isfinite(b)) == 7 * 86400.0
    assert (buckets[60.0], buckets[3600.0], buckets[3 * 3600.0], buckets[math.inf]) == (1, 1, 2, 2)


def test_retries_budget_exhaustion_and_coalescing_are_counted(metrics: Metrics) -> None:
    metrics(signals.RetryScheduled(SERVICE, PRIMARY, 2, 0.1, "r1"))
    metrics(signals.RetryScheduled(SERVICE, PRIMARY, 3, 0.2, "r1"))
    metrics(signals.RetryBudgetExhausted(SERVICE, PRIMARY, "r2"))
    for _ in range(3):
        metrics(signals.Coalesced(SERVICE))
    assert value(metrics, "retries_total", service=SERVICE, provider=PRIMARY) == 2
    assert value(metrics, "retry_budget_exhausted_total", service=SERVICE, provider=PRIMARY) == 1
    assert value(metrics, "coalesced_requests_total", service=SERVICE) == 3


def test_cache_backend_state_and_errors(metrics: Metrics) -> None:
    metrics(signals.CacheBackendState("redis", False, "connection refused"))
    assert value(metrics, "cache_backend_up", backend="redis") == 0
    metrics(signals.CacheBackendState("redis", True))
    assert value(metrics, "cache_backend_up", backend="redis") == 1
    metrics(signals.CacheError("redis", "get", "timeout"))
    metrics(signals.CacheError("redis", "get", "timeout"))
    metrics(signals.CacheError("redis", "set", "timeout"))
    assert value(metrics, "cache_errors_total", backend="redis", operation="get") == 2
    assert value(metrics, "cache_errors_total", backend="redis", operation="set") == 1


def test_reloads_are_counted_and_the_last_success_uses_the_wall_clock(metrics: Metrics, clock: FakeClock) -> None:
    assert value(metrics, "config_reloads_total", result="ok") == 0
    assert value(metrics, "config_reloads_total", result="error") == 0
    metrics(signals.ConfigReloaded(True, "sighup"))
    succeeded_at = clock.time()
    clock.advance(30)
    metrics(signals.ConfigReloaded(False, "admin", ("routes.yaml:3: bad",)))
    assert value(metrics, "config_reloads_total", result="ok") == 1
    assert value(metrics, "config_reloads_total", result="error") == 1
    assert value(metrics, "config_last_reload_success_timestamp_seconds") == succeeded_at


def test_label_values_never_contain_a_request_path(metrics: Metrics) -> None:
    metrics.register_provider(SERVICE, PRIMARY)
    metrics(attempt("http_5xx", url="https://primary.example/v6/latest/USD?access_key=x"))
    metrics(finished(502, path="/fx/latest/USD", fallback=True))
    metrics(signals.StaleServed(SERVICE, "/fx/latest/USD", 90.0, PRIMARY, "error", "r1"))
    metrics(signals.UpstreamSkipped(SERVICE, PRIMARY, "breaker_open", "r1"))
    metrics(lookup("stale"))
    label_values = {v for s in parse(metrics) for k, v in s.labels.items() if k != "le"}
    assert label_values >= {SERVICE, PRIMARY, "http_5xx", "502", "error"}
    assert not [v for v in label_values if "/" in v or "USD" in v or "latest" in v]


def own_series(metrics: Metrics) -> list[bytes]:
    """The scrape without the process, Python and GC collectors' lines: those measure the test process
    itself (CPU seconds, RSS, collections) and move between two scrapes whatever the proxy does."""
    return [line for line in metrics.render()[0].splitlines()
            if not any(name in line for name in (b"process_", b"python_gc_", b"python_info"))]


def test_unknown_events_are_ignored(metrics: Metrics) -> None:
    before = own_series(metrics)
    metrics(object())
    metrics("AttemptFinished")
    metrics(signals.BreakerFailure(SERVICE, PRIMARY, 1, 5))
    assert own_series(metrics) == before


def test_render_gives_prometheus_text_and_its_content_type(metrics: Metrics) -> None:
    metrics(attempt())
    body, content_type = metrics.render()
    assert content_type == prometheus_client.CONTENT_TYPE_LATEST
    assert content_type.startswith("text/plain")
    assert b'external_requests_total{outcome="success",provider="fx_primary",service="fx"} 1.0' in body


def test_two_instances_keep_separate_registries_and_leave_the_global_one_alone(clock: FakeClock) -> None:
    first, second = Metrics(clock), Metrics(clock)
    first(attempt())
    first(attempt())
    second(attempt())
    assert value(first, "external_requests_total", service=SERVICE, provider=PRIMARY, outcome="success") == 2
    assert value(second, "external_requests_total", service=SERVICE, provider=PRIMARY, outcome="success") == 1
    assert prometheus_client.REGISTRY.get_sample_value(
        "external_requests_total", {"service": SERVICE, "provider": PRIMARY, "outcome": "success"}) is None


def test_a_given_registry_is_used(clock: FakeClock) -> None:
    registry = prometheus_client.CollectorRegistry()
    metrics = Metrics(clock, registry)
    metrics(lookup("hit"))
    assert registry.get_sample_value("cache_requests_total", {"service": SERVICE, "result": "hit"}) == 1
