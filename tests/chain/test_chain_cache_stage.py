"""The cache stage over a memory store and a fake transport: fresh, stale, stale-if-slow, coalescing."""

from __future__ import annotations

import asyncio

import pytest

from proxy import signals
from proxy.chain.fallback import UpstreamsFailed
from proxy.clock import FakeClock
from tests.chain_kit import kit
from tests.fake_transport import RESET, reply, settle, slow

CACHED = {"ttl": "60s", "stale": "1h", "stale_if_slow": "off"}


def cached(cache: dict | None = None, **service: object) -> dict:
    return {"svc": {"retry": "NONE", "timeout": "5s", "deadline": "10s", "hedge_after": "off",
                    "cache": {**CACHED, **(cache or {})}, **service,
                    "upstreams": [{"name": "vendor", "url": "http://vendor.test"}]}}


async def get(k, path="/svc/x", **kwargs):
    return await k.cache(k.exchange("GET", path, **kwargs))


async def test_a_fresh_copy_answers_without_a_call():
    k = kit(cached())
    k.transport.script("vendor", reply(200, json={"n": 1}), reply(200, json={"n": 2}))
    first = await get(k)
    k.clock.advance(59)
    second = await get(k)
    assert (first.cache, second.cache) == ("MISS", "HIT")
    assert second.body == first.body and second.age == 59 and second.upstream == "vendor"
    assert len(k.transport.requests) == 1


async def test_a_copy_past_its_ttl_is_fetched_again_and_replaced():
    k = kit(cached())
    k.transport.script("vendor", reply(200, json={"n": 1}), reply(200, json={"n": 2}))
    await get(k)
    k.clock.advance(61)
    again = await get(k)
    assert again.cache == "MISS" and again.body == b'{"n": 2}' and len(k.transport.requests) == 2
    assert (await get(k)).body == b'{"n": 2}'


async def test_when_every_upstream_fails_the_stale_copy_answers_and_says_why():
    k = kit(cached())
    k.transport.script("vendor", reply(200, json={"n": 1}), reply(503))
    await get(k)
    k.clock.advance(120)
    stale = await get(k)
    assert stale.cache == "STALE" and stale.body == b'{"n": 1}' and stale.fallback
    assert stale.cache_status == "resilience-proxy; fwd=stale; fwd-status=503; detail=all_upstreams_failed"
    [served] = k.of(signals.StaleServed)
    assert served.reason == "error" and served.upstream == "vendor"


async def test_past_its_stale_window_a_copy_never_answers_and_the_failure_goes_up():
    k = kit(cached())
    k.transport.script("vendor", reply(200), RESET)
    await get(k)
    k.clock.advance(60 + 3600 + 1)
    with pytest.raises(UpstreamsFailed) as failed:
        await get(k)
    assert failed.value.attempts[0].outcome == "reset"


@pytest.mark.parametrize("answer", [reply(404), reply(200, headers={"Cache-Control": "no-store"})])
async def test_an_answer_the_rules_do_not_store_is_not_a_copy(answer):
    k = kit(cached())
    k.transport.script("vendor", answer)
    first = await get(k)
    second = await get(k)
    assert first.cache_status == "resilience-proxy; fwd=miss" and second.cache == "MISS"
    assert len(k.transport.requests) == 2


async def test_a_request_that_must_not_be_cached_bypasses_the_copy():
    k = kit(cached())
    k.transport.script("vendor", reply(200))
    await get(k)
    bypass = await get(k, headers={"Cache-Control": "no-store"})
    assert bypass.cache == "BYPASS" and len(k.transport.requests) == 2


async def test_stale_if_slow_answers_with_the_copy_and_the_refresh_lands_later():
    k = kit(cached({"stale_if_slow": "10ms"}), clock=FakeClock(autojump=False))
    k.transport.script("vendor", reply(200, json={"n": 1}), slow(3.0, reply(200, json={"n": 2})))
    await get(k)
    k.clock.advance(61)
    stale = await get(k)  # the refresh waits for a clock nobody moves: 10 ms of real time pass
    assert stale.cache == "STALE" and stale.body == b'{"n": 1}'
    assert [e.reason for e in k.of(signals.StaleServed)] == ["slow"]
    assert k.cache.refreshing == 1
    k.clock.advance(3.0)
    await settle()
    assert k.cache.refreshing == 0
    fresh = await get(k)
    assert fresh.cache == "HIT" and fresh.body == b'{"n": 2}' and len(k.transport.requests) == 2


async def test_while_a_refresh_runs_other_callers_get_the_copy_at_once():
    k = kit(cached({"stale_if_slow": "10ms"}), clock=FakeClock(autojump=False))
    k.transport.script("vendor", reply(200, json={"n": 1}), slow(3.0, reply(200, json={"n": 2})))
    await get(k)
    k.clock.advance(61)
    await get(k)
    others = [await get(k) for _ in range(3)]
    assert {a.cache for a in others} == {"STALE"}
    assert [e.reason for e in k.of(signals.StaleServed)] == ["slow", "revalidating", "revalidating", "revalidating"]
    assert len(k.transport.requests) == 2  # one refresh for everybody
    await k.close()


async def test_stale_if_slow_zero_serves_the_copy_and_refreshes_behind_it():
    k = kit(cached({"stale_if_slow": "0s"}))
    k.transport.script("vendor", reply(200, json={"n": 1}), reply(200, json={"n": 2}))
    await get(k)
    k.clock.advance(61)
    stale = await get(k)
    await settle()
    assert stale.cache == "STALE" and stale.body == b'{"n": 1}'
    assert (await get(k)).body == b'{"n": 2}'


async def test_a_refresh_that_answers_in_time_is_the_answer():
    k = kit(cached({"stale_if_slow": "5s"}))
    k.transport.script("vendor", reply(200, json={"n": 1}), reply(200, json={"n": 2}))
    await get(k)
    k.clock.advance(61)
    answer = await get(k)
    assert answer.cache == "MISS" and answer.body == b'{"n": 2}'


async def test_no_refresh_when_every_breaker_is_open_the_copy_answers():
    k = kit(cached({"stale_if_slow": "5s"}))
    k.transport.script("vendor", reply(200))
    await get(k)
    k.breaker("vendor").force_open()
    k.clock.advance(61)
    stale = await get(k)
    assert stale.cache == "STALE" and len(k.transport.requests) == 1
    assert [e.reason for e in k.of(signals.StaleServed)] == ["breaker_open"]


async def test_identical_concurrent_misses_share_one_call():
    k = kit(cached(), clock=FakeClock(autojump=False))
    k.transport.script("vendor", slow(1.0, reply(200, json={"n": 1})))
    callers = [asyncio.create_task(get(k)) for _ in range(20)]
    await settle()
    k.clock.advance(1.0)
    answers = await asyncio.gather(*callers)
    assert len(k.transport.requests) == 1
    assert {a.body for a in answers} == {b'{"n": 1}'} and len(k.of(signals.Coalesced)) == 19


async def test_an_answer_another_caller_may_not_see_is_not_shared_each_asks_for_itself():
    k = kit(cached(), clock=FakeClock(autojump=False))
    k.transport.script("vendor", slow(1.0, reply(200, headers={"Set-Cookie": "s=1"})))
    callers = [asyncio.create_task(get(k)) for _ in range(3)]
    await settle()
    k.clock.advance(1.0)
    await settle()
    k.clock.advance(1.0)
    await asyncio.gather(*callers)
    assert len(k.transport.requests) == 3 and not k.of(signals.Coalesced)


async def test_a_miss_without_a_copy_may_be_hedged_one_with_a_copy_may_not():
    k = kit(cached())
    k.transport.script("vendor", reply(503))
    seen = []
    forward = k.cache._forward

    async def spy(exchange):
        seen.append(exchange.may_hedge)
        return await forward(exchange)

    k.cache._forward = spy
    with pytest.raises(UpstreamsFailed):
        await get(k)
    assert seen == [True]
