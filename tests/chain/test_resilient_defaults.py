"""What a route table with only upstreams, a timeout and TTLs gets: fallback before retry, leaving a
flaky or refusing upstream, Retry-After honoured for every request, and a 503 that says when to come back.

Real fake upstreams on loopback, a stepped clock; every test counts the calls each upstream saw.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes import Advance, Delay, Fail, Ok, Reset, metric, refused_port, route_table


def defaults_table(primary: str, secondary: str | None = None, *, cache: bool = False, **service: object) -> str:
    """What most users write: the upstreams, a timeout and (maybe) TTLs. Nothing else."""
    upstreams = [{"name": "fx_primary", "url": primary}]
    if secondary:
        upstreams.append({"name": "fx_secondary", "url": secondary})
    settings: dict[str, object] = {"timeout": "300ms"}
    if cache:
        settings["cache"] = {"ttl": "2s", "stale": "1h"}
    settings.update(service)
    return route_table({"fx": {**settings, "upstreams": upstreams}})


def attempts(body: dict) -> list[tuple[str, str]]:
    return [(a["upstream"], a["outcome"]) for a in body["attempts"]]


# --- fallback before retry ---------------------------------------------------------------------

async def test_a_5xx_moves_to_the_next_upstream_at_once_without_a_retry_or_a_backoff(fake_upstream, proxy_factory,
                                                                                      clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert (primary.calls, secondary.calls) == (1, 1)
    assert clock.sleeps == []  # DEFAULT retries 5xx, but only once no other upstream can answer


async def test_a_hanging_upstream_costs_one_timeout_not_two_while_another_answers(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Delay(2.0)
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url, hedge_after="off"), clock=clock)
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert (primary.calls, secondary.calls) == (1, 1)  # retry_first would have paid a second timeout here


async def test_retries_come_after_every_upstream_had_its_try_round_by_round(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(502)
    secondary.default = Reset()
    text = defaults_table(primary.url, secondary.url, retry="CONSERVATIVE", deadline="10s")
    proxy = await proxy_factory(text, clock=clock)
    response = await proxy.get("/fx/latest/USD")
    assert response.status == 502
    assert attempts(await response.json()) == [("fx_primary", "http_5xx"), ("fx_secondary", "reset")] * 3
    assert (primary.calls, secondary.calls) == (3, 3)
    assert len(clock.sleeps) == 4 and all(wait <= 0.4 for wait in clock.sleeps)  # CONSERVATIVE: caps 0.2, 0.4 s


async def test_a_retry_round_answers_from_the_upstream_that_recovered(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(503))
    primary.default = Ok(body=b'{"from": "primary"}')
    secondary.default = Reset()
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_primary"
    assert (primary.calls, secondary.calls) == (2, 1)


async def test_every_upstream_answering_5xx_ends_the_request_without_a_retry_round(fake_upstream, proxy_factory,
                                                                                   clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)
    secondary.default = Fail(500)
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    response = await proxy.get("/fx/latest/USD")
    assert response.status == 502
    assert attempts(await response.json()) == [("fx_primary", "http_5xx"), ("fx_secondary", "http_5xx")]
    assert (primary.calls, secondary.calls) == (1, 1)  # DEFAULT would have made up to three more rounds
    assert clock.sleeps == []  # and the caller waited for no backoff


async def test_a_later_round_in_which_every_upstream_answered_5xx_is_the_last(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Reset())
    primary.default = secondary.default = Fail(503)
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    response = await proxy.get("/fx/latest/USD")
    assert attempts(await response.json()) == [("fx_primary", "reset"), ("fx_secondary", "http_5xx"),
                                               ("fx_primary", "http_5xx"), ("fx_secondary", "http_5xx")]
    assert (primary.calls, secondary.calls) == (2, 2)


async def test_a_single_upstreams_5xx_is_still_retried(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Fail(503), Fail(503))
    primary.default = Ok(body=b'{"from": "primary"}')
    proxy = await proxy_factory(defaults_table(primary.url), clock=clock)
    response = await proxy.get("/fx/latest/USD")
    assert (response.status, response.headers["X-Upstream"]) == (200, "fx_primary")
    assert primary.calls == 3 and len(clock.sleeps) == 2  # the seed's "5xx retried", with its backoff


async def test_one_upstream_left_to_answer_5xx_is_retried_when_the_other_was_skipped(fake_upstream, proxy_factory,
                                                                                      clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    secondary.script(Fail(503))
    secondary.default = Ok(body=b'{"from": "secondary"}')
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    proxy.breaker("fx_primary").force_open()
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert (primary.calls, secondary.calls) == (0, 2)  # one upstream's 5xx may be a blip: worth its retry


async def test_the_backoff_counts_from_the_upstreams_own_last_try(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)
    secondary.default = Advance(clock, 0.5, then=Reset())  # the secondary's try takes half a (stepped) second
    text = defaults_table(primary.url, secondary.url, timeout="2s",
                          retry={"retries": 1, "base_delay": "200ms", "max_delay": "200ms",
                                 "retry_on": ["5xx", "reset"]})
    proxy = await proxy_factory(text, clock=clock)
    await proxy.get("/fx/latest/USD")
    assert primary.calls == 2 and secondary.calls == 2
    # The primary's backoff (under 200 ms) had passed during the secondary's try: not waited again.
    # The secondary's own retry came right after the primary's, so its backoff was waited.
    assert clock.sleeps[0] == 0.0
    assert len(clock.sleeps) == 2


async def test_fallback_before_retry_false_keeps_the_seed_order(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = secondary.default = Fail(502)
    text = defaults_table(primary.url, secondary.url, retry="CONSERVATIVE", deadline="10s", fallback_before_retry=False)
    proxy = await proxy_factory(text, clock=clock)
    response = await proxy.get("/fx/latest/USD")
    assert attempts(await response.json()) == [("fx_primary", "http_5xx")] * 3 + [("fx_secondary", "http_5xx")] * 3


async def test_a_post_still_moves_on_only_when_the_upstream_never_got_it(fake_upstream, proxy_factory, clock):
    secondary = await fake_upstream("secondary")
    primary = await fake_upstream("primary")
    primary.default = Fail(503)
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    assert (await proxy.request("POST", "/fx/orders", data=b"{}")).status == 502
    assert (primary.calls, secondary.calls) == (1, 0)
    refused = await proxy_factory(defaults_table(f"http://127.0.0.1:{refused_port()}", secondary.url), clock=clock)
    response = await refused.request("POST", "/fx/orders", data=b"{}")
    assert response.headers["X-Upstream"] == "fx_secondary" and secondary.calls == 1


# --- leaving a flaky or dead upstream ------------------------------------------------------------

async def test_a_primary_failing_three_calls_in_ten_is_left_at_its_third_failure(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    for failed in [False, True, False, False, True, False, False, True, False, False] * 3:
        primary.script(Fail(503) if failed else Ok(body=b'{"from": "primary"}'))
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    for _ in range(30):
        assert (await proxy.get("/fx/latest/USD")).status == 200
        clock.advance(0.05)
    # Three failures within seven calls: the failure rate opened the breaker at the eighth call,
    # although no two failures came in a row; the rest went to the secondary.
    assert primary.calls == 8
    assert proxy.breaker("fx_primary").state.value == "OPEN"
    assert secondary.calls == 3 + 22


async def test_a_primary_failing_everything_is_left_at_its_third_failure(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url, retry="NONE"), clock=clock)
    for _ in range(10):
        assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 3
    assert proxy.breaker("fx_primary").snapshot()["failures"] == 3


async def test_a_refused_connection_opens_the_breaker_at_once(fake_upstream, proxy_factory, clock):
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(defaults_table(f"http://127.0.0.1:{refused_port()}", secondary.url), clock=clock)
    first = await proxy.get("/fx/latest/USD")
    assert first.headers["X-Upstream"] == "fx_secondary"
    assert proxy.breaker("fx_primary").state.value == "OPEN"
    circuits = await (await proxy.get("/health/integrations/circuits")).json()
    assert next(c for c in circuits["circuits"] if c["provider"] == "fx_primary")["state"] == "OPEN"
    clock.advance(1)
    second = await proxy.get("/fx/latest/EUR")
    assert second.headers["X-Upstream"] == "fx_secondary" and secondary.calls == 2
    assert await metric(proxy, "circuit_breaker_transitions_total", service="fx", provider="fx_primary",
                        to="OPEN") == 1


# --- Retry-After holds for every request -------------------------------------------------------------

async def test_a_429_with_retry_after_rests_the_upstream_for_every_request_until_then(fake_upstream, proxy_factory,
                                                                                     clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(429, headers={"Retry-After": "5"}))
    primary.default = Ok(body=b'{"from": "primary"}')
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    rest_ends = clock.time() + 5
    for _ in range(20):
        clock.advance(0.24)  # 4.8 s in all: still inside the window
        response = await proxy.get("/fx/latest/USD")
        assert response.headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 1  # nothing inside the window
    health = await (await proxy.get("/health")).json()
    provider = health["services"]["fx"]["providers"][0]
    assert (provider["status"], provider["circuitState"], provider["restingUntil"]) == \
        ("DEGRADED", "CLOSED", "2024-12-01T08:00:05.000Z")
    circuits = await (await proxy.get("/health/integrations/circuits")).json()
    assert circuits["circuits"][0]["restingUntil"] == "2024-12-01T08:00:05.000Z"
    assert await metric(proxy, "upstream_rest_until_seconds", service="fx", provider="fx_primary") == rest_ends
    assert await metric(proxy, "upstream_rests_total", service="fx", provider="fx_primary") == 1
    assert await metric(proxy, "upstream_skipped_total", service="fx", provider="fx_primary", reason="resting") == 20
    clock.advance(0.2)  # the window is over: the next request tries the primary again
    assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_primary"
    assert primary.calls == 2
    assert proxy.breaker("fx_primary").resting_until is None


async def test_a_503_with_retry_after_rests_the_upstream_too(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(503, headers={"Retry-After": "30"}))
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    for _ in range(3):
        await proxy.get("/fx/latest/USD")
    assert primary.calls == 1
    assert proxy.breaker("fx_primary").resting_until == pytest.approx(clock.time() + 30)


async def test_a_vendor_asking_for_a_year_rests_for_max_rest_only(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(429, headers={"Retry-After": str(365 * 86400)}))
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    await proxy.get("/fx/latest/USD")
    assert proxy.breaker("fx_primary").resting_until == pytest.approx(clock.time() + 3600)  # max_rest: 1h
    clock.advance(3600)
    assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_primary"


async def test_max_rest_0_ignores_retry_after_across_requests(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(429, headers={"Retry-After": "5"}))
    primary.default = Ok(body=b'{"from": "primary"}')
    text = defaults_table(primary.url, secondary.url, breaker={"profile": "STANDARD", "max_rest": 0})
    proxy = await proxy_factory(text, clock=clock)
    await proxy.get("/fx/latest/USD")
    assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_primary"


async def test_unreadable_retry_after_values_start_no_rest(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    for value in ("soon", "-5", "", "0", "Wed, 01 Dec 2100 99:99:99 GMT"):
        primary.script(Fail(429, headers={"Retry-After": value}))
    primary.default = Ok(body=b'{"from": "primary"}')
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    for _ in range(6):
        await proxy.get("/fx/latest/USD")
    assert primary.calls == 6 and proxy.breaker("fx_primary").resting_until is None


# --- a 503 that says when to come back ---------------------------------------------------------------

async def test_a_503_when_every_upstream_rests_carries_retry_after_until_the_first_may_be_tried(fake_upstream,
                                                                                                 proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(429, headers={"Retry-After": "20"})
    secondary.default = Fail(429, headers={"Retry-After": "7"})
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url), clock=clock)
    assert (await proxy.get("/fx/latest/USD")).status == 502  # both answered 429: nothing to pass on
    clock.advance(2.5)
    response = await proxy.get("/fx/latest/USD")
    body = await response.json()
    assert response.status == 503 and body["error"] == "all_upstreams_unavailable"
    assert attempts(body) == [("fx_primary", "resting"), ("fx_secondary", "resting")]
    assert response.headers["Retry-After"] == "5"  # the secondary's 7 s, 2.5 s of which are gone, rounded up
    assert (primary.calls, secondary.calls) == (1, 1)


async def test_a_503_when_every_breaker_is_open_says_when_the_first_probes(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = secondary.default = Fail(500)
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url, retry="NONE", breaker="FAST"), clock=clock)
    for _ in range(3):
        await proxy.get("/fx/latest/USD")
    clock.advance(12)
    response = await proxy.get("/fx/latest/USD")
    assert response.status == 503 and (await response.json())["error"] == "all_breakers_open"
    assert response.headers["Retry-After"] == "18"  # FAST stays open 30 s


async def test_a_503_with_every_breaker_forced_open_gives_no_time_it_cannot_know(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    proxy = await proxy_factory(defaults_table(primary.url), clock=clock)
    proxy.breaker("fx_primary").force_open()
    response = await proxy.get("/fx/latest/USD")
    assert response.status == 503 and "Retry-After" not in response.headers


async def test_a_retry_waiting_for_its_backoff_stops_waiting_when_the_breaker_opens(fake_upstream, proxy_factory):
    from proxy.clock import FakeClock
    from tests.fakes import eventually

    clock = FakeClock(autojump=False)
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)
    secondary.default = Reset()
    text = defaults_table(primary.url, secondary.url,
                          retry={"retries": 1, "base_delay": "10s", "max_delay": "10s", "retry_on": ["5xx", "reset"]})
    proxy = await proxy_factory(text, clock=clock)
    request = asyncio.ensure_future(proxy.get("/fx/latest/USD"))
    assert await eventually(lambda: clock.sleepers == 1)  # both upstreams failed: a retry waits its backoff
    assert not request.done()
    proxy.breaker("fx_primary").force_open()   # meanwhile (another request's failures, an operator)...
    proxy.breaker("fx_secondary").force_open()
    response = await asyncio.wait_for(request, 5.0)  # ...the wait ends: the retries would be turned away
    assert response.status == 502
    assert [(a["upstream"], a["outcome"]) for a in (await response.json())["attempts"]] == [
        ("fx_primary", "http_5xx"), ("fx_secondary", "reset"), ("fx_primary", "breaker_open")]
    assert clock.monotonic() == 1000.0  # not one stepped second went by waiting
    assert (primary.calls, secondary.calls) == (1, 1)


async def test_a_copy_answers_without_a_refresh_while_every_breaker_is_open(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(defaults_table(primary.url, secondary.url, cache=True), clock=clock)
    await proxy.get("/fx/latest/USD")
    clock.advance(10)
    proxy.breaker("fx_primary").force_open()
    proxy.breaker("fx_secondary").force_open()
    stale = await proxy.get("/fx/latest/USD")
    assert stale.headers["X-Cache"] == "STALE"
    assert stale.headers["Cache-Status"] == "resilience-proxy; fwd=stale; detail=all_breakers_open"
    assert proxy.process.runtime.cache.refreshing == 0  # nothing was started that could only be turned away
    assert (primary.calls, secondary.calls) == (1, 0)
    assert await metric(proxy, "stale_served_total", service="fx", reason="breaker_open") == 1
