"""The retry stage on a fake transport and a stepped clock: policy, backoff, Retry-After, budget, deadline."""

from __future__ import annotations

import pytest

from proxy import signals
from proxy.resilience.outcome import Outcome
from tests.chain_kit import kit
from tests.fake_transport import RESET, TIMEOUT, reply

POLICY = {"retries": 3, "base_delay": "100ms", "max_delay": "1s", "retry_on": ["5xx", "timeout", "reset"]}


def one(retry: object = POLICY, **service: object) -> dict:
    return {"svc": {"retry": retry, "timeout": "2s", "deadline": "30s", "hedge_after": "off",
                    "breaker": {"fail_threshold": 50, "failure_rate": "off"}, **service,
                    "upstreams": [{"name": "vendor", "url": "http://vendor.test"}]}}


async def tries_until_done(k, method="GET", **kwargs):
    """The first try and every retry the stage agrees to, as the fallback stage drives them."""
    exchange = k.exchange(method, "/svc/x", **kwargs)
    upstream = exchange.service.upstreams[0]
    tries = await k.retry.first(upstream, exchange)
    while await k.retry.again(tries, exchange):
        pass
    return tries, exchange


async def test_a_failure_the_policy_names_is_retried_until_it_succeeds():
    k = kit(one())
    k.transport.script("vendor", reply(503), RESET, reply(200))
    tries, exchange = await tries_until_done(k)
    assert tries.result.outcome is Outcome.SUCCESS and tries.made == 3 and tries.retries == 2
    assert [a.outcome for a in exchange.attempts] == ["http_5xx", "reset", "success"]


async def test_retries_stop_at_the_policys_count():
    k = kit(one())
    k.transport.script("vendor", reply(500))
    tries, _ = await tries_until_done(k)
    assert tries.made == 4 and len(k.transport.requests) == 4  # one try and three retries


async def test_an_outcome_the_policy_does_not_name_is_not_retried():
    k = kit(one(retry={**POLICY, "retry_on": ["5xx"]}))
    k.transport.script("vendor", TIMEOUT, reply(200))
    tries, _ = await tries_until_done(k)
    assert tries.result.outcome is Outcome.TIMEOUT and len(k.transport.requests) == 1


@pytest.mark.parametrize("step", [reply(200), reply(404)])
async def test_an_answer_is_never_retried(step):
    k = kit(one())
    k.transport.script("vendor", step)
    tries, _ = await tries_until_done(k)
    assert tries.made == 1


async def test_backoff_waits_the_full_jitter_cap_doubling_up_to_max_delay():
    k = kit(one(retry={**POLICY, "retries": 5}))
    k.transport.script("vendor", reply(503))
    await tries_until_done(k)
    # HighestDraw makes every jittered wait its cap: 0.1, 0.2, 0.4, 0.8, then max_delay.
    assert k.clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert [e.delay for e in k.of(signals.RetryScheduled)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])


async def test_time_spent_elsewhere_since_the_last_try_is_not_waited_again():
    k = kit(one())
    k.transport.script("vendor", reply(503), reply(200))
    exchange = k.exchange("GET", "/svc/x")
    tries = await k.retry.first(exchange.service.upstreams[0], exchange)
    k.clock.advance(0.06)  # another upstream's try took 60 ms of the 100 ms backoff
    assert await k.retry.again(tries, exchange)
    assert k.clock.sleeps == pytest.approx([0.04])


async def test_a_retry_after_within_max_delay_is_waited_instead_of_the_backoff():
    k = kit(one())
    k.transport.script("vendor", reply(503, headers={"Retry-After": "1"}), reply(200))
    tries, _ = await tries_until_done(k)
    assert tries.result.outcome is Outcome.SUCCESS and k.clock.sleeps == [1.0]


async def test_a_retry_after_longer_than_max_delay_is_not_waited_here():
    k = kit(one())
    k.transport.script("vendor", reply(503, headers={"Retry-After": "120"}), reply(200))
    tries, _ = await tries_until_done(k)
    assert tries.result.outcome is Outcome.HTTP_5XX and len(k.transport.requests) == 1
    assert k.clock.sleeps == []
    assert k.breaker("vendor").resting  # the upstream rests instead, for every request


async def test_no_retry_whose_wait_outlives_the_deadline():
    k = kit(one())
    k.transport.script("vendor", reply(503))
    exchange = k.exchange("GET", "/svc/x")
    exchange.deadline_at = k.clock.monotonic() + 0.05  # less than the 100 ms backoff
    tries = await k.retry.first(exchange.service.upstreams[0], exchange)
    assert not await k.retry.again(tries, exchange)
    assert len(k.transport.requests) == 1 and k.clock.sleeps == []


async def test_a_post_without_an_idempotency_key_is_never_retried():
    k = kit(one())
    k.transport.script("vendor", reply(503), reply(200))
    tries, _ = await tries_until_done(k, "POST", body=b"{}")
    assert tries.made == 1


async def test_a_post_with_an_idempotency_key_is_retried_with_its_body():
    k = kit(one())
    k.transport.script("vendor", reply(503), reply(200))
    tries, _ = await tries_until_done(k, "POST", body=b'{"a":1}', headers={"Idempotency-Key": "abc"})
    assert tries.result.outcome is Outcome.SUCCESS
    assert [r.body for r in k.transport.requests] == [b'{"a":1}', b'{"a":1}']


async def test_the_retry_budget_holds_retries_to_its_floor_and_says_so():
    k = kit(one(), defaults={"retry_budget": {"ratio": 0.1, "min_per_second": 0.2, "window": "10s"}})
    k.transport.script("vendor", reply(503))
    for _ in range(3):
        await tries_until_done(k)
    # The floor is 0.2/s over 10 s: two retries in the window, whatever the policy allows.
    assert len(k.transport.requests) == 3 + 2
    # Each request that wanted one more retry and was refused says so: all three of them.
    assert len(k.of(signals.RetryBudgetExhausted)) == 3


async def test_a_refused_key_is_followed_by_the_next_key_at_once_outside_the_policy():
    k = kit({"svc": {"retry": "NONE", "upstreams": [
        {"name": "vendor", "url": "http://vendor.test", "query": {"k": "{key}"}, "keys": ["a", "b", "c"]}]}})
    k.transport.script("vendor", reply(401), reply(401), reply(200))
    tries, _ = await tries_until_done(k)
    assert tries.result.outcome is Outcome.SUCCESS and tries.rotations == 2 and tries.retries == 0
    assert [r.url.query["k"] for r in k.transport.requests] == ["a", "b", "c"]
    assert k.clock.sleeps == []


async def test_a_backoff_ends_early_when_the_upstreams_breaker_opens_meanwhile():
    k = kit(one())
    k.transport.script("vendor", reply(503), reply(200))
    exchange = k.exchange("GET", "/svc/x")
    tries = await k.retry.first(exchange.service.upstreams[0], exchange)
    k.breaker("vendor").rest(k.clock.time() + 60)  # another request learnt the upstream must rest
    assert not await k.retry.again(tries, exchange)  # its gate is shut longer than the wait: not worth it
    assert len(k.transport.requests) == 1
