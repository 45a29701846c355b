"""Breakers and retries through the whole proxy: real sockets, a stepped clock, counted calls."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from aiohttp.test_utils import make_mocked_request

from tests.fakes import Delay, Fail, Ok, Reset, route_table


def table(primary: str, secondary: str | None = None, *, breaker: object = "STANDARD", retry: object = "NONE",
          **service: object) -> str:
    upstreams = [{"name": "fx_primary", "url": primary}]
    if secondary:
        upstreams.append({"name": "fx_secondary", "url": secondary})
    settings = {"breaker": breaker, "retry": retry, "timeout": "1s", "deadline": "5s"}
    settings.update(service)
    return route_table({"fx": {**settings, "upstreams": upstreams}})


async def test_an_open_breaker_sends_nothing_and_goes_straight_to_the_next_upstream(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(500)
    # The seed's consecutive count alone (the failure-rate trip would open it at the third: see
    # tests/chain/test_resilient_defaults.py).
    breaker = {"profile": "STANDARD", "failure_rate": "off"}
    proxy = await proxy_factory(table(primary.url, secondary.url, breaker=breaker), clock=clock)
    for _ in range(4):
        assert (await proxy.get("/fx/a")).headers["X-Upstream"] == "fx_secondary"
    assert proxy.breaker("fx_primary").state.value == "CLOSED"
    assert (await proxy.get("/fx/a")).headers["X-Upstream"] == "fx_secondary"
    assert proxy.breaker("fx_primary").state.value == "OPEN"
    assert primary.calls == 5
    for _ in range(10):
        response = await proxy.get("/fx/a")
        assert response.headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 5  # OPEN: not one more call
    circuits = await (await proxy.get("/health/integrations/circuits")).json()
    primary_circuit = next(c for c in circuits["circuits"] if c["provider"] == "fx_primary")
    assert primary_circuit["state"] == "OPEN" and primary_circuit["failures"] == 5


async def test_after_open_timeout_one_probe_closes_the_breaker_on_success(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(500, times=3))
    primary.default = Ok(body=b'{"from": "primary"}')
    proxy = await proxy_factory(table(primary.url, secondary.url, breaker="FAST"), clock=clock)
    for _ in range(3):
        await proxy.get("/fx/a")
    assert proxy.breaker("fx_primary").state.value == "OPEN"
    clock.advance(29.9)
    assert (await proxy.get("/fx/a")).headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 3
    clock.advance(0.1)
    response = await proxy.get("/fx/a")
    assert response.headers["X-Upstream"] == "fx_primary"
    assert proxy.breaker("fx_primary").state.value == "CLOSED"
    assert primary.calls == 4


async def test_a_failed_probe_reopens_the_breaker_for_a_fresh_timeout(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)
    proxy = await proxy_factory(table(primary.url, secondary.url, breaker="FAST"), clock=clock)
    for _ in range(3):
        await proxy.get("/fx/a")
    clock.advance(30)
    await proxy.get("/fx/a")  # the probe fails
    assert primary.calls == 4
    breaker = proxy.breaker("fx_primary")
    assert breaker.state.value == "OPEN"
    assert breaker.retry_at == pytest.approx(clock.time() + 30)
    clock.advance(29)
    await proxy.get("/fx/a")
    assert primary.calls == 4


async def test_half_open_admits_at_most_half_open_max_calls_concurrent_probes(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    breaker = {"fail_threshold": 2, "open_timeout": "10s", "half_open_max_calls": 2}
    proxy = await proxy_factory(table(primary.url, secondary.url, breaker=breaker), clock=clock)
    primary.script(Fail(500, times=2))
    await proxy.get("/fx/a")
    await proxy.get("/fx/a")
    assert proxy.breaker("fx_primary").state.value == "OPEN"
    clock.advance(10)
    primary.default = Delay(0.3, then=Ok(body=b'{"from": "primary"}'))
    responses = await asyncio.gather(*(proxy.get("/fx/a") for _ in range(6)))
    by_upstream = [r.headers["X-Upstream"] for r in responses]
    assert by_upstream.count("fx_primary") == 2
    assert by_upstream.count("fx_secondary") == 4
    assert primary.calls == 4  # 2 failures + exactly 2 probes
    assert proxy.breaker("fx_primary").state.value == "CLOSED"


async def test_4xx_never_counts_against_the_breaker_or_retries(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Fail(404)
    proxy = await proxy_factory(table(primary.url, breaker="FAST", retry="AGGRESSIVE"), clock=clock)
    for _ in range(10):
        assert (await proxy.get("/fx/missing")).status == 404
    assert primary.calls == 10
    assert proxy.breaker("fx_primary").state.value == "CLOSED"
    assert clock.sleeps == []


@pytest.mark.parametrize("fault", [Fail(500), Fail(503), Reset(times=2), Delay(2.0)], ids=["500", "503", "reset", "timeout"])
async def test_retryable_failures_are_retried_exactly_retries_times(fake_upstream, proxy_factory, clock, fault):
    primary = await fake_upstream("primary")
    primary.default = fault
    retry = {"retries": 2, "base_delay": "100ms", "max_delay": "1s", "retry_on": ["5xx", "timeout", "reset"]}
    proxy = await proxy_factory(table(primary.url, retry=retry, breaker={"fail_threshold": 50, "open_timeout": "1m"},
                                      timeout="250ms"), clock=clock)
    response = await proxy.get("/fx/a")
    body = await response.json()
    assert response.status == 502
    assert len(body["attempts"]) == 3
    # A reset is re-sent once by aiohttp on a reused connection; every other fault is one call per attempt.
    expected_calls = 3 if not isinstance(fault, Reset) else primary.calls
    assert primary.calls == expected_calls >= 3
    assert len(clock.sleeps) == 2
    assert 0 <= clock.sleeps[0] <= 0.1 and 0 <= clock.sleeps[1] <= 0.2  # full jitter under 2^n caps


async def test_a_retry_that_succeeds_answers_from_the_same_upstream(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Fail(503, times=2))
    proxy = await proxy_factory(table(primary.url, retry="DEFAULT"), clock=clock)
    response = await proxy.get("/fx/a")
    assert response.status == 200
    assert response.headers["X-Upstream"] == "fx_primary"
    assert primary.calls == 3


async def test_retries_first_then_fallback_is_still_there_when_asked_for(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(503, times=2))
    text = table(primary.url, secondary.url, retry="DEFAULT", fallback_before_retry=False)
    proxy = await proxy_factory(text, clock=clock)
    response = await proxy.get("/fx/a")
    assert response.headers["X-Upstream"] == "fx_primary"
    assert primary.calls == 3 and secondary.calls == 0


async def test_post_is_tried_once_even_with_retries_configured(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Fail(503)
    proxy = await proxy_factory(table(primary.url, retry="AGGRESSIVE"), clock=clock)
    assert (await proxy.request("POST", "/fx/orders", data=b"{}")).status == 502
    assert primary.calls == 1
    assert clock.sleeps == []


async def test_retry_after_is_waited_when_it_fits_max_delay_and_never_cut_short(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Fail(429, headers={"Retry-After": "3"}), Fail(503, headers={"Retry-After": "60"}))
    retry = {"retries": 3, "base_delay": "10ms", "max_delay": "5s", "retry_on": ["5xx", "429"]}
    proxy = await proxy_factory(table(primary.url, retry=retry, deadline="1m"), clock=clock)
    response = await proxy.get("/fx/a")
    # 3 s fit max_delay: waited, then retried. 60 s do not: not waited out, and not cut to 5 s
    # either (that would knock inside the window the vendor asked for); the upstream rests.
    assert response.status == 502
    assert primary.calls == 2
    assert clock.sleeps == [3.0]
    assert proxy.breaker("fx_primary").resting_until == pytest.approx(clock.time() + 60)


async def test_no_backoff_outlives_the_deadline_the_next_upstream_answers_instead(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503, headers={"Retry-After": "8"})
    retry = {"retries": 3, "base_delay": "10ms", "max_delay": "30s", "retry_on": ["5xx"]}
    proxy = await proxy_factory(table(primary.url, secondary.url, retry=retry, deadline="5s"), clock=clock)
    response = await proxy.get("/fx/a")
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 1
    assert clock.sleeps == []


async def test_retry_budget_caps_retries_under_a_sustained_outage(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Fail(503)
    retry = {"retries": 3, "base_delay": "1ms", "max_delay": "2ms", "retry_on": ["5xx"]}
    text = table(primary.url, retry=retry, breaker={"fail_threshold": 10000, "open_timeout": "1m", "failure_rate": "off"})
    text = text.replace("services:", "defaults:\n  retry_budget: {ratio: 0.2, min_per_second: 1, window: 10s}\nservices:")
    proxy = await proxy_factory(text, clock=clock)
    requests = 100
    for _ in range(requests):
        assert (await proxy.get("/fx/a")).status == 502
    floor = 1 * 10
    assert requests < primary.calls <= requests * 1.2 + floor
    budget = proxy.process.runtime.budgets["fx_primary"]
    assert budget.exhausted_count > 0
    metrics = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
    assert 'retry_budget_exhausted_total{provider="fx_primary",service="fx"}' in metrics


async def test_breaker_transitions_are_logged_once_in_operator_words(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Fail(500, times=3))
    proxy = await proxy_factory(table(primary.url, breaker="FAST"), clock=clock)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            await proxy.get("/fx/a")
        clock.advance(30)
        await proxy.get("/fx/a")
    messages = [entry["event"] for entry in logs if entry.get("kind") == "breaker"]
    assert messages == [
        "Circuit breaker: FAILURE for fx_primary, error count: 1/3",
        "Circuit breaker: FAILURE for fx_primary, error count: 2/3",
        "Circuit breaker: OPENED for fx_primary, will retry after 2024-12-01T08:00:30Z",
        "Circuit breaker: HALF_OPEN for fx_primary, sending probes",
        "Circuit breaker: SUCCESS for fx_primary, circuit reset to CLOSED",
    ]


async def test_admin_reset_and_open_with_a_token(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    proxy = await proxy_factory(table(primary.url), clock=clock, env={"ADMIN_TOKEN": "t0ken-abc"})
    base = "/health/integrations/circuits/fx_primary"
    assert (await proxy.request("POST", base + "/open")).status == 401
    assert (await proxy.request("POST", base + "/open", headers={"Authorization": "Bearer wrong"})).status == 401
    opened = await proxy.request("POST", base + "/open", headers={"Authorization": "Bearer t0ken-abc"})
    assert opened.status == 200
    assert (await opened.json())["state"] == "OPEN"
    assert (await proxy.get("/fx/a")).status == 503
    assert primary.calls == 0
    clock.advance(3600)  # forced open does not half-open by itself
    assert (await proxy.get("/fx/a")).status == 503
    reset = await proxy.request("POST", base + "/reset", headers={"Authorization": "Bearer t0ken-abc"})
    assert (await reset.json())["state"] == "CLOSED"
    assert (await proxy.get("/fx/a")).status == 200
    assert primary.calls == 1
    unknown = await proxy.request("POST", "/health/integrations/circuits/nope/reset",
                                  headers={"Authorization": "Bearer t0ken-abc"})
    assert unknown.status == 404


async def test_admin_without_a_token_is_for_loopback_callers_only(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    proxy = await proxy_factory(table(primary.url), clock=clock)
    local = await proxy.request("POST", "/health/integrations/circuits/fx_primary/open")
    assert local.status == 200
    assert proxy.breaker("fx_primary").state.value == "OPEN"
    health = proxy.process.health
    for peer in (("10.1.2.3", 5555), ("::ffff:192.168.1.9", 5555), ("2001:db8::1", 5555, 0, 0)):
        transport = _Transport(peer)
        request = make_mocked_request("POST", "/health/integrations/circuits/fx_primary/reset", transport=transport)
        response = await health(request, "rid")
        assert response.status == 403, peer
    assert proxy.breaker("fx_primary").state.value == "OPEN"  # nothing was reset by the refused calls


class _Transport:
    """Just enough transport for make_mocked_request to report a remote peer."""

    def __init__(self, peer: tuple) -> None:
        self._peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._peer if name == "peername" else default

    def is_closing(self) -> bool:
        return False
