"""The fallback stage on a fake transport: order, fallback before retry, hedging, deadline, the final status."""

from __future__ import annotations

import pytest

from proxy import signals
from proxy.chain.fallback import UpstreamsFailed
from proxy.clock import FakeClock
from proxy.resilience.breaker import State
from tests.chain_kit import kit
from tests.fake_transport import REFUSED, RESET, TIMEOUT, UNKNOWN_HOST, UNREACHABLE, reply, slow, streamed

RETRY_ONCE = {"retries": 1, "base_delay": "100ms", "max_delay": "1s", "retry_on": ["5xx", "timeout", "reset"]}


def three(retry: object = "NONE", **service: object) -> dict:
    settings = {"retry": retry, "timeout": "1s", "deadline": "10s", "hedge_after": "off",
                "breaker": {"fail_threshold": 5, "failure_rate": "off", "open_timeout": "30s"}, **service}
    return {"svc": {**settings, "upstreams": [{"name": name, "url": f"http://{name}.test"}
                                              for name in ("first", "second", "third")]}}


async def test_the_first_upstream_that_answers_wins_in_list_order():
    k = kit(three())
    k.transport.script("first", reply(503))
    k.transport.script("second", TIMEOUT)
    k.transport.script("third", reply(200, json={"from": "third"}))
    answer = await k.fallback(k.exchange("GET", "/svc/x"))
    assert answer.upstream == "third" and answer.fallback and answer.body == b'{"from": "third"}'
    assert k.transport.order() == ["first", "second", "third"]


async def test_the_primarys_answer_is_not_a_fallback():
    k = kit(three())
    k.transport.script("first", reply(200))
    answer = await k.fallback(k.exchange("GET", "/svc/x"))
    assert answer.upstream == "first" and not answer.fallback and k.transport.order() == ["first"]


async def test_a_4xx_is_the_answer_and_nobody_else_is_asked():
    k = kit(three())
    k.transport.script("first", reply(404))
    answer = await k.fallback(k.exchange("GET", "/svc/x"))
    assert answer.status == 404 and k.transport.order() == ["first"]


async def test_every_upstream_gets_its_first_try_before_any_is_retried():
    k = kit(three(retry=RETRY_ONCE))
    k.transport.script("first", reply(503), reply(200, json={"from": "first"}))
    k.transport.script("second", reply(503))
    k.transport.script("third", RESET)
    answer = await k.fallback(k.exchange("GET", "/svc/x"))
    assert k.transport.order() == ["first", "second", "third", "first"]
    assert answer.upstream == "first"


async def test_without_fallback_before_retry_each_upstreams_retries_come_first():
    k = kit(three(retry=RETRY_ONCE, fallback_before_retry=False))
    k.transport.script("first", reply(503))
    k.transport.script("second", reply(200))
    answer = await k.fallback(k.exchange("GET", "/svc/x"))
    assert k.transport.order() == ["first", "first", "second"] and answer.upstream == "second"


async def test_every_upstream_failing_is_502_naming_each_attempt_and_its_outcome():
    k = kit(three())
    k.transport.script("first", reply(500))
    k.transport.script("second", TIMEOUT)
    k.transport.script("third", REFUSED)
    with pytest.raises(UpstreamsFailed) as failed:
        await k.fallback(k.exchange("GET", "/svc/x"))
    assert failed.value.status == 502 and failed.value.error == "all_upstreams_failed"
    assert [(a.upstream, a.outcome) for a in failed.value.attempts] == [
        ("first", "http_5xx"), ("second", "timeout"), ("third", "connect_error")]
    assert failed.value.last_status == 500


async def test_every_breaker_open_is_503_with_the_wait_until_one_may_be_tried():
    k = kit(three())
    for name in ("first", "second", "third"):
        k.transport.script(name, reply(500))
    for _ in range(5):  # fail_threshold: 5
        with pytest.raises(UpstreamsFailed):
            await k.fallback(k.exchange("GET", "/svc/x"))
    assert {k.breaker(name).state for name in ("first", "second", "third")} == {State.OPEN}
    k.clock.advance(10)
    with pytest.raises(UpstreamsFailed) as failed:
        await k.fallback(k.exchange("GET", "/svc/x"))
    assert failed.value.status == 503 and failed.value.error == "all_breakers_open"
    assert failed.value.retry_after == 20  # the 30 s open timeout less the 10 s gone
    assert len(k.transport.requests) == 15  # the last request sent nothing


async def test_breakers_held_open_by_hand_are_503_with_no_time_to_promise():
    k = kit(three())
    for name in ("first", "second", "third"):
        k.breaker(name).force_open()
    with pytest.raises(UpstreamsFailed) as failed:
        await k.fallback(k.exchange("GET", "/svc/x"))
    assert failed.value.status == 503 and failed.value.retry_after is None
    assert not k.transport.requests


async def test_upstreams_skipped_for_other_reasons_are_503_all_upstreams_unavailable():
    k = kit(three())
    for name in ("first", "second", "third"):
        k.breaker(name).rest(k.clock.time() + 12.5)
    with pytest.raises(UpstreamsFailed) as failed:
        await k.fallback(k.exchange("GET", "/svc/x"))
    assert failed.value.status == 503 and failed.value.error == "all_upstreams_unavailable"
    assert failed.value.retry_after == 13  # rounded up to whole seconds
    assert {a.outcome for a in failed.value.attempts} == {"resting"}


async def test_a_spent_deadline_is_504_and_the_rest_are_recorded_as_not_tried():
    k = kit(three(timeout="5s", deadline="3s"))
    k.transport.script("first", slow(4.0, reply(200)))
    with pytest.raises(UpstreamsFailed) as failed:
        await k.fallback(k.exchange("GET", "/svc/x"))
    assert failed.value.status == 504 and failed.value.error == "deadline_exceeded"
    assert [(a.upstream, a.outcome) for a in failed.value.attempts] == [
        ("first", "timeout"), ("second", "deadline"), ("third", "deadline")]
    assert k.transport.timeouts == [3.0]  # the attempt got what was left of the deadline, not its 5 s


async def test_a_vendors_caller_error_nobody_else_answers_is_400():
    codes = {"code": "c", "codes": {"0": "success", "9": "caller_error"}}
    k = kit({"svc": {"retry": "NONE", "upstreams": [
        {"name": "first", "url": "http://first.test", "result_codes": codes},
        {"name": "second", "url": "http://second.test"}]}})
    k.transport.script("first", reply(200, json={"c": "9"}))
    k.transport.script("second", reply(503))
    with pytest.raises(UpstreamsFailed) as failed:
        await k.fallback(k.exchange("GET", "/svc/x"))
    assert failed.value.status == 400 and failed.value.error == "invalid_request"


async def test_a_post_the_first_upstream_may_have_seen_goes_nowhere_else():
    k = kit(three())
    k.transport.script("first", RESET)
    k.transport.script("second", reply(200))
    with pytest.raises(UpstreamsFailed):
        await k.fallback(k.exchange("POST", "/svc/x", body=b"{}"))
    assert k.transport.order() == ["first"]


async def test_a_post_moves_on_when_the_first_upstream_never_received_it():
    k = kit(three())
    k.transport.script("first", REFUSED)
    k.transport.script("second", reply(201))
    answer = await k.fallback(k.exchange("POST", "/svc/x", body=b"{}"))
    assert answer.upstream == "second" and k.transport.sent_to("second")[0].body == b"{}"


async def test_an_open_breaker_is_passed_over_without_a_call():
    k = kit(three())
    k.transport.script("first", reply(500))
    k.transport.script("second", reply(200))
    for _ in range(5):
        await k.fallback(k.exchange("GET", "/svc/x"))
    assert k.breaker("first").state is State.OPEN
    calls = len(k.transport.sent_to("first"))
    answer = await k.fallback(k.exchange("GET", "/svc/x"))
    assert answer.upstream == "second" and len(k.transport.sent_to("first")) == calls
    assert len(k.transport.sent_to("second")) == 6


async def test_a_streamed_answer_passed_over_has_its_connection_freed():
    k = kit(three(retry=RETRY_ONCE))
    k.transport.script("first", streamed(503, b"x" * 10), reply(503))
    k.transport.script("second", reply(200))
    await k.fallback(k.exchange("GET", "/svc/x"))
    assert k.transport.streams[0].released


def hedged(**first: object) -> dict:
    return {"svc": {"retry": "NONE", "timeout": "5s", "deadline": "10s",
                    "upstreams": [{"name": "first", "url": "http://first.test", "hedge_after": "10ms", **first},
                                  {"name": "second", "url": "http://second.test"}]}}


async def test_a_late_safe_request_without_a_copy_is_hedged_and_the_hedge_answers():
    k = kit(hedged(), clock=FakeClock(autojump=False))
    k.runtime.latencies["first"].add(0.05)  # its answer times are known: a lost try is cancelled
    k.transport.script("first", slow(1.0, reply(200)))  # waits for a clock nobody advances
    k.transport.script("second", reply(200))
    exchange = k.exchange("GET", "/svc/x")
    exchange.may_hedge = True  # the cache stage says so when no copy could stand in
    answer = await k.fallback(exchange)
    assert answer.upstream == "second"
    assert [(a.upstream, a.outcome) for a in exchange.attempts] == [("second", "success"), ("first", "hedge_lost")]
    [race] = k.of(signals.HedgeRaced)
    assert race.winner == "hedge"


@pytest.mark.parametrize("method, may_hedge", [("POST", True), ("GET", False)])
async def test_no_hedge_for_an_unsafe_request_or_one_with_a_copy(method, may_hedge):
    k = kit(hedged(), clock=FakeClock(autojump=True))
    k.transport.script("first", slow(0.5, reply(200)))
    k.transport.script("second", reply(200))
    exchange = k.exchange(method, "/svc/x")
    exchange.may_hedge = may_hedge
    answer = await k.fallback(exchange)
    assert answer.upstream == "first" and k.transport.order() == ["first"]


# --- connect failures: nothing reached the upstream ---------------------------------------------

CONNECT_ONCE = {"retries": 1, "base_delay": "100ms", "max_delay": "1s", "retry_on": ["connect"]}


def one(retry: object, **service: object) -> dict:
    return {"svc": {"retry": retry, "timeout": "1s", "deadline": "10s", "hedge_after": "off",
                    "breaker": {"fail_threshold": 5, "failure_rate": "off", "open_timeout": "30s"}, **service,
                    "upstreams": [{"name": "only", "url": "http://only.test"}]}}


async def test_an_unreachable_only_upstream_is_tried_again_after_its_backoff():
    clock = FakeClock(autojump=True)
    k = kit(one(CONNECT_ONCE), clock=clock)
    k.transport.script("only", UNREACHABLE_THEN_OK[0], UNREACHABLE_THEN_OK[1])
    started = clock.monotonic()
    answer = await k.fallback(k.exchange("GET", "/svc/x"))
    assert answer.status == 200 and answer.upstream == "only"
    assert k.transport.order() == ["only", "only"]
    assert clock.monotonic() - started >= 0.1  # the policy's backoff came between the two


async def test_a_post_the_service_lets_retry_is_tried_again_after_a_connect_failure():
    k = kit(one(CONNECT_ONCE, retry_non_idempotent=True))
    k.transport.script("only", UNREACHABLE_THEN_OK[0], UNREACHABLE_THEN_OK[1])
    answer = await k.fallback(k.exchange("POST", "/svc/x", body=b"{}"))
    assert answer.status == 200 and k.transport.order() == ["only", "only"]


async def test_connect_is_not_retried_when_the_policy_does_not_name_it():
    k = kit(one({"retries": 2, "base_delay": "100ms", "retry_on": ["5xx"]}))
    k.transport.script("only", UNREACHABLE_THEN_OK[0], UNREACHABLE_THEN_OK[1])
    with pytest.raises(UpstreamsFailed) as failed:
        await k.fallback(k.exchange("GET", "/svc/x"))
    assert failed.value.status == 502 and k.transport.order() == ["only"]


async def test_a_host_that_does_not_exist_is_never_tried_again():
    k = kit(one(CONNECT_ONCE))
    k.transport.script("only", UNKNOWN_HOST, reply(200))
    with pytest.raises(UpstreamsFailed) as failed:
        await k.fallback(k.exchange("GET", "/svc/x"))
    assert k.transport.order() == ["only"]
    assert "no such host" in failed.value.attempts[0].detail


async def test_a_refused_connection_trips_the_breaker_so_it_is_not_tried_again():
    k = kit(one(CONNECT_ONCE))  # trip_on_refused is on by default
    k.transport.script("only", REFUSED, reply(200))
    with pytest.raises(UpstreamsFailed):
        await k.fallback(k.exchange("GET", "/svc/x"))
    assert k.transport.order() == ["only"] and k.breaker("only").state is State.OPEN


async def test_an_unreachable_primary_is_left_for_the_next_upstream_not_retried_first():
    k = kit(three(retry=CONNECT_ONCE))
    k.transport.script("first", UNREACHABLE_THEN_OK[0], UNREACHABLE_THEN_OK[1])
    k.transport.script("second", reply(200, json={"from": "second"}))
    answer = await k.fallback(k.exchange("GET", "/svc/x"))
    assert answer.upstream == "second" and k.transport.order() == ["first", "second"]


UNREACHABLE_THEN_OK = (UNREACHABLE, reply(200, json={"from": "only"}))
