"""The derived-route stage: an answer made from another route's answer, through the same chain."""

from __future__ import annotations

import orjson
import pytest

from proxy.chain.fallback import UpstreamsFailed
from tests.chain_kit import kit
from tests.fake_transport import reply

RATES = {"base": "USD", "rates": {"KRW": 1400.5, "JPY": 150.25}, "updated": "today"}
DERIVE = "rates.{quote} && {base: base, quote: '{quote}', rate: rates.{quote}}"


def fx(**upstream: object) -> dict:
    return {"fx": {"retry": "NONE", "cache": {"ttl": "1h", "stale": "1d"}, "routes": [
        {"match": "/fx/latest/{base}", "name": "latest"},
        {"match": "/fx/rate/{base}/{quote}", "name": "rate", "derive": {"from": "/fx/latest/{base}", "transform": DERIVE}},
    ], "upstreams": [{"name": "vendor", "url": "http://vendor.test", "path": "/latest/{base}", **upstream}]}}


async def test_a_derived_answer_is_the_transform_of_its_source():
    k = kit(fx())
    k.transport.script("vendor", reply(200, json=RATES, headers={"ETag": '"v1"', "X-Vendor": "1"}))
    answer = await k.chain(k.exchange("GET", "/fx/rate/USD/KRW"))
    assert answer.status == 200 and orjson.loads(answer.body) == {"base": "USD", "quote": "KRW", "rate": 1400.5}
    assert ("Content-Type", "application/json") in answer.headers
    assert not any(k.lower() == "etag" for k, _ in answer.headers)  # the source's validator is not the derived one
    assert [str(r.url) for r in k.transport.requests] == ["http://vendor.test/latest/USD"]


async def test_a_derived_answer_comes_from_the_sources_copy_without_a_call():
    k = kit(fx())
    k.transport.script("vendor", reply(200, json=RATES))
    await k.chain(k.exchange("GET", "/fx/latest/USD"))
    answer = await k.chain(k.exchange("GET", "/fx/rate/USD/JPY"))
    assert answer.cache == "HIT" and orjson.loads(answer.body)["rate"] == 150.25
    assert len(k.transport.requests) == 1


@pytest.mark.parametrize("quote", ["XYZ", "K'RW"])
async def test_a_quote_the_source_lacks_or_cannot_name_is_a_404_saying_why(quote):
    k = kit(fx())
    k.transport.script("vendor", reply(200, json=RATES))
    answer = await k.chain(k.exchange("GET", f"/fx/rate/USD/{quote}"))
    body = orjson.loads(answer.body)
    assert answer.status == 404 and body["error"] == "not_found" and body["service"] == "fx"
    assert body["detail"] in ("nothing matches", "the value of {quote} cannot be used in a transform")


async def test_the_sources_own_error_is_the_derived_answer():
    k = kit(fx())
    k.transport.script("vendor", reply(404, json={"error": "unknown base"}))
    answer = await k.chain(k.exchange("GET", "/fx/rate/QQQ/KRW"))
    assert answer.status == 404 and orjson.loads(answer.body) == {"error": "unknown base"}


async def test_a_source_that_fails_fails_the_derived_request_with_the_sources_attempts():
    k = kit(fx())
    k.transport.script("vendor", reply(503))
    exchange = k.exchange("GET", "/fx/rate/USD/KRW")
    with pytest.raises(UpstreamsFailed) as failed:
        await k.chain(exchange)
    assert [a.outcome for a in failed.value.attempts] == ["http_5xx"]
    assert exchange.attempts == failed.value.attempts  # recorded on the caller's request too


async def test_a_route_that_is_not_derived_goes_straight_through():
    k = kit(fx())
    k.transport.script("vendor", reply(200, json=RATES))
    answer = await k.chain(k.exchange("GET", "/fx/latest/USD"))
    assert orjson.loads(answer.body) == RATES
