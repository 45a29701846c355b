"""The attempt stage on a fake transport: breaker gate, rate limit, key rotation, result codes, transform."""

from __future__ import annotations

import pytest

from proxy import signals
from proxy.resilience.breaker import State
from proxy.resilience.outcome import Outcome
from tests.chain_kit import kit
from tests.fake_transport import REFUSED, RESET, TIMEOUT, reply, slow

BREAKER = {"fail_threshold": 2, "open_timeout": "30s", "half_open_max_calls": 1}


def one(**upstream: object) -> dict:
    settings = {"name": "vendor", "url": "http://vendor.test/api", **upstream}
    return {"svc": {"retry": "NONE", "timeout": "2s", "deadline": "10s", "breaker": BREAKER,
                    "upstreams": [settings]}}


async def attempt(k, path="/svc/items/1", number=1, **kwargs):
    exchange = k.exchange("GET", path, **kwargs)
    upstream = exchange.service.upstreams[0]
    return await k.attempt(upstream, exchange, number), exchange


async def test_the_request_sent_is_the_url_and_headers_the_route_table_builds():
    k = kit(one(headers={"X-Api-Key": "k-1"}, query={"lang": "en"}))
    k.transport.script("vendor", reply(200, json={"ok": True}))
    result, _ = await attempt(k, headers={"Accept": "application/json", "Cookie": "c=1", "Connection": "x-hop",
                                          "X-Hop": "1"}, query=(("q", "a b"),))
    assert result.outcome is Outcome.SUCCESS
    [sent] = k.transport.requests
    assert sent.upstream == "vendor" and sent.method == "GET"
    assert str(sent.url) == "http://vendor.test/api/items/1?q=a+b&lang=en"
    assert sent.headers["X-Api-Key"] == "k-1" and sent.headers["Accept"] == "application/json"
    # Cookies are stripped by default, and so is whatever `Connection` names.
    assert "Cookie" not in sent.headers and "X-Hop" not in sent.headers and "Connection" not in sent.headers


async def test_the_timeout_is_the_upstreams_or_what_is_left_of_the_deadline_whichever_is_shorter():
    k = kit(one())
    k.transport.script("vendor", reply(200))
    exchange = k.exchange("GET", "/svc/x")
    exchange.deadline_at = k.clock.monotonic() + 0.5
    await k.attempt(exchange.service.upstreams[0], exchange, 1)
    assert k.transport.timeouts == [0.5]


@pytest.mark.parametrize("step, outcome", [(TIMEOUT, Outcome.TIMEOUT), (RESET, Outcome.RESET),
                                           (REFUSED, Outcome.CONNECT), (reply(503), Outcome.HTTP_5XX),
                                           (reply(429), Outcome.HTTP_429), (reply(404), Outcome.CLIENT_ERROR),
                                           (slow(5.0, reply(200)), Outcome.TIMEOUT)])
async def test_each_way_an_attempt_ends_is_classified_and_recorded(step, outcome):
    k = kit(one())
    k.transport.script("vendor", step)
    result, exchange = await attempt(k)
    assert result.outcome is outcome
    assert exchange.attempts[-1].upstream == "vendor" and exchange.attempts[-1].outcome == outcome.value
    [finished] = k.of(signals.AttemptFinished)
    assert finished.outcome == outcome.value and finished.provider == "vendor"


async def test_failures_open_the_breaker_and_then_nothing_is_sent():
    k = kit(one())
    k.transport.script("vendor", reply(500))
    await attempt(k)
    await attempt(k)
    assert k.breaker("vendor").state is State.OPEN
    result, exchange = await attempt(k)
    assert result.outcome is Outcome.BREAKER_OPEN
    assert len(k.transport.requests) == 2  # the third attempt never reached the transport
    assert exchange.attempts[-1].detail == "circuit OPEN"
    assert result.wait == pytest.approx(30.0)


async def test_a_4xx_is_no_failure_for_the_breaker():
    k = kit(one())
    k.transport.script("vendor", reply(404))
    for _ in range(3):
        await attempt(k)
    assert k.breaker("vendor").state is State.CLOSED and len(k.transport.requests) == 3


async def test_a_refused_connection_opens_the_breaker_at_once_when_told_to():
    k = kit(one(breaker={**BREAKER, "trip_on_refused": True}))
    k.transport.script("vendor", REFUSED)
    await attempt(k)
    assert k.breaker("vendor").state is State.OPEN


async def test_after_the_open_timeout_one_probe_goes_and_its_success_closes_the_breaker():
    k = kit(one())
    k.transport.script("vendor", reply(500), reply(500), reply(200))
    await attempt(k)
    await attempt(k)
    k.clock.advance(30.0)
    result, _ = await attempt(k)
    assert result.outcome is Outcome.SUCCESS and k.breaker("vendor").state is State.CLOSED


async def test_a_429_with_retry_after_rests_the_upstream_for_every_request():
    k = kit(one())
    k.transport.script("vendor", reply(429, headers={"Retry-After": "20"}), reply(200))
    first, _ = await attempt(k)
    assert first.outcome is Outcome.HTTP_429
    second, exchange = await attempt(k)
    assert second.outcome is Outcome.RESTING and second.wait == pytest.approx(20.0)
    assert len(k.transport.requests) == 1
    k.clock.advance(20.0)
    third, _ = await attempt(k)
    assert third.outcome is Outcome.SUCCESS


async def test_over_the_rate_limit_the_attempt_is_skipped_without_a_call():
    k = kit(one(rate_limit="2/m"))
    k.transport.script("vendor", reply(200))
    outcomes = [(await attempt(k))[0].outcome for _ in range(3)]
    assert outcomes == [Outcome.SUCCESS, Outcome.SUCCESS, Outcome.RATE_LIMITED]
    assert len(k.transport.requests) == 2
    assert k.breaker("vendor").state is State.CLOSED  # a limit we keep says nothing about the upstream


async def test_a_refused_key_is_spent_and_the_next_attempt_carries_the_next_key():
    k = kit(one(query={"key": "{key}"}, keys=["k-one", "k-two"]))
    k.transport.script("vendor", reply(401), reply(200))
    first, _ = await attempt(k)
    assert first.outcome is Outcome.KEY_REFUSED and first.rotated
    second, _ = await attempt(k)
    assert second.outcome is Outcome.SUCCESS
    assert [r.url.query["key"] for r in k.transport.requests] == ["k-one", "k-two"]
    [spent] = k.of(signals.KeySpent)
    assert "k-one" not in spent.fingerprint and spent.keys_left == 1  # a fingerprint, never the key
    assert k.breaker("vendor").state is State.CLOSED


async def test_when_every_key_rests_the_upstream_is_skipped_until_the_cooldown_ends():
    k = kit(one(query={"key": "{key}"}, keys=["only"], key_cooldown="1h"))
    k.transport.script("vendor", reply(429), reply(200))
    await attempt(k)
    skipped, exchange = await attempt(k)
    assert skipped.outcome is Outcome.KEYS_SPENT and exchange.attempts[-1].detail == "every API key is resting"
    assert len(k.transport.requests) == 1
    k.clock.advance(3600)
    assert (await attempt(k))[0].outcome is Outcome.SUCCESS


async def test_a_403_that_does_not_mention_the_key_is_the_callers_answer():
    k = kit(one(query={"key": "{key}"}, keys=["k-one", "k-two"]))
    k.transport.script("vendor", reply(403, json={"error": "forbidden region"}))
    result, _ = await attempt(k)
    assert result.outcome is Outcome.CLIENT_ERROR and not result.rotated
    assert not k.of(signals.KeySpent)


RESULT_CODES = {"code": "header.code", "message": "header.msg",
                "codes": {"00": "success", "10": "caller_error", "30": "key_refused", "99": "vendor_error"}}


@pytest.mark.parametrize("code, outcome", [("00", Outcome.SUCCESS), ("10", Outcome.CALLER_ERROR),
                                           ("99", Outcome.VENDOR_ERROR), ("30", Outcome.KEY_REFUSED)])
async def test_a_result_code_inside_a_200_decides_the_outcome(code, outcome):
    k = kit(one(result_codes=RESULT_CODES))
    k.transport.script("vendor", reply(200, json={"header": {"code": code, "msg": "m"}}))
    result, _ = await attempt(k)
    assert result.outcome is outcome


async def test_a_vendor_error_in_a_200_counts_against_the_breaker():
    k = kit(one(result_codes=RESULT_CODES))
    k.transport.script("vendor", reply(200, json={"header": {"code": "99", "msg": "db down"}}))
    await attempt(k)
    await attempt(k)
    assert k.breaker("vendor").state is State.OPEN


async def test_the_transform_normalises_a_success_into_the_routes_shape():
    k = kit(one(transform="{value: data.v, source: '{upstream}'}"))
    k.transport.script("vendor", reply(200, json={"data": {"v": 7}}))
    result, _ = await attempt(k)
    assert result.outcome is Outcome.SUCCESS
    assert result.reply is not None and result.reply.body == b'{"value":7,"source":"vendor"}'


@pytest.mark.parametrize("body, why", [(b"<html>oops</html>", "not JSON"), (b'{"other": 1}', "expression")])
async def test_an_answer_the_transform_cannot_read_is_a_transform_failure(body, why):
    k = kit(one(transform="data.v && {value: data.v}"))
    k.transport.script("vendor", reply(200, body, headers={"Content-Type": "application/json"}))
    result, exchange = await attempt(k)
    assert result.outcome is Outcome.TRANSFORM, why
    assert exchange.attempts[-1].outcome == "transform_failed"


async def test_a_route_without_a_path_for_the_upstream_is_skipped_as_no_path():
    k = kit({"svc": {"retry": "NONE", "routes": [{"match": "/svc/only/{id}", "paths": {"vendor": "off"}}],
                     "upstreams": [{"name": "vendor", "url": "http://vendor.test"}]}})
    k.transport.script("vendor", reply(200))
    result, _ = await attempt(k, path="/svc/only/1")
    assert result.outcome is Outcome.NO_PATH and not k.transport.requests
