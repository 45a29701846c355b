"""Provider adapters: one JSON shape from every vendor, derived routes, rate limits and key rotation.

The committed routes.yaml is run as it is, with only the vendors' base URLs pointed at the
bundled mock vendors that answer in each real vendor's shape.
"""

from __future__ import annotations

import io

import orjson
import pytest
import structlog

from proxy.demo.mocks import MockProviders
from proxy.observability import logs
from tests.fakes import Fail, Ok, route_table, start_proxy, stop_proxy


@pytest.fixture
async def vendors():
    mocks = MockProviders()
    await mocks.start()
    yield mocks
    await mocks.stop()


@pytest.fixture
async def committed(vendors, proxy_factory, clock):
    return await proxy_factory(vendors.committed_route_table(), clock=clock, env=vendors.env)


async def test_both_fx_vendors_answer_in_one_shape(vendors, committed):
    primary = await committed.get("/fx/latest/USD")
    body = await primary.json()
    assert primary.headers["X-Upstream"] == "fx_primary"
    assert set(body) == {"base", "rates", "updated", "source"}
    assert body["base"] == "USD" and body["source"] == "fx_primary" and body["rates"]["KRW"] > 0
    await vendors.fx_primary.go_down()
    secondary = await committed.get("/fx/latest/EUR")
    other = await secondary.json()
    assert secondary.headers["X-Upstream"] == "fx_secondary"
    assert set(other) == set(body)
    assert other["base"] == "EUR" and other["source"] == "fx_secondary"
    assert set(other["rates"]) <= set(body["rates"])
    assert secondary.headers["Content-Type"] == "application/json"


async def test_a_stale_answer_has_the_normalised_shape(vendors, committed, clock):
    await committed.get("/fx/latest/USD")
    await vendors.fx_primary.go_down()
    await vendors.fx_secondary.go_down()
    clock.advance(2 * 86400)
    stale = await committed.get("/fx/latest/USD")
    assert stale.headers["X-Cache"] == "STALE"
    assert set(await stale.json()) == {"base", "rates", "updated", "source"}


async def test_a_derived_rate_costs_no_upstream_call_when_its_source_is_cached(vendors, committed):
    await committed.get("/fx/latest/USD")
    calls = vendors.fx_primary.calls + vendors.fx_secondary.calls
    rate = await committed.get("/fx/rate/USD/KRW")
    body = await rate.json()
    assert rate.status == 200
    assert body == {"base": "USD", "quote": "KRW", "rate": vendors.rates.rates("USD")["KRW"],
                    "updated": body["updated"], "source": "fx_primary"}
    assert rate.headers["X-Cache"] == "HIT"
    assert vendors.fx_primary.calls + vendors.fx_secondary.calls == calls


async def test_a_derived_rate_fetches_its_source_once_when_nothing_is_cached(vendors, committed):
    rate = await committed.get("/fx/rate/USD/JPY")
    assert rate.status == 200 and rate.headers["X-Cache"] == "MISS"
    latest = await committed.get("/fx/latest/USD")
    assert latest.headers["X-Cache"] == "HIT"
    assert vendors.fx_primary.calls == 1


@pytest.mark.parametrize("quote", ["XYZ", "K%27RW", "a.b"])
async def test_an_unknown_or_odd_currency_is_404_json_not_500(vendors, committed, quote):
    response = await committed.get(f"/fx/rate/USD/{quote}")
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"


async def test_an_unknown_base_is_the_vendors_404(vendors, committed):
    response = await committed.get("/fx/latest/ZZZ")
    assert response.status == 404
    assert response.headers["X-Upstream"] == "fx_primary"
    assert vendors.fx_secondary.calls == 0


async def test_flights_schedules_are_normalised_from_both_providers(vendors, committed):
    kac = await committed.get("/flights/schedules/GMP")
    body = await kac.json()
    assert kac.status == 200 and kac.headers["X-Upstream"] == "flights_kac"
    assert body["source"] == "flights_kac" and len(body["flights"]) == 5
    assert set(body["flights"][0]) == {"flight", "airline", "scheduled", "estimated", "gate", "status"}
    seen = vendors.flights_kac.seen[-1]
    assert seen.query["schDeptCityCode"] == "GMP" and "schFlightNum" not in seen.query
    await vendors.flights_kac.go_down()
    other = await committed.get("/flights/schedules/CJU")
    other_body = await other.json()
    assert other.headers["X-Upstream"] == "flights_odcloud"
    assert other_body == {"flights": [{"flight": "TW721", "airline": "티웨이항공", "scheduled": "0815", "estimated": None,
                                       "gate": None, "status": None}], "source": "flights_odcloud"}


async def test_a_broken_transform_or_non_json_answer_falls_back(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Ok(body=b"<html>maintenance</html>", headers={"Content-Type": "text/html"}),
                   Ok(body=b'{"unexpected": "shape"}'))
    secondary.default = Ok(body=b'{"base": "USD", "rates": {"KRW": 1}}')
    text = route_table({"fx": {"retry": "NONE", "routes": [{"match": "/fx/latest/{base}"}], "upstreams": [
        {"name": "fx_primary", "url": primary.url, "transform": "base_code && {base: base_code}"},
        {"name": "fx_secondary", "url": secondary.url, "transform": "{base: base}"}]}})
    proxy = await proxy_factory(text, clock=clock)
    for expected_detail in ("not JSON", "produced nothing"):
        response = await proxy.get("/fx/latest/USD")
        assert response.headers["X-Upstream"] == "fx_secondary"
        assert await response.json() == {"base": "USD"}
    stats = await (await proxy.get("/health/integrations/stats?minutes=1")).json()
    assert stats["providers"]["fx_primary"]["errors"] == 2


async def test_a_transform_failure_is_named_in_the_error_attempts(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=b"not json")
    text = route_table({"fx": {"retry": "NONE", "upstreams": [
        {"name": "fx_primary", "url": primary.url, "transform": "{base: base}"}]}})
    proxy = await proxy_factory(text, clock=clock)
    body = await (await proxy.get("/fx/x")).json()
    assert body["attempts"] == [{"upstream": "fx_primary", "outcome": "transform_failed", "status": 200,
                                 "detail": "the answer is not JSON"}]


async def test_the_rate_limit_caps_calls_exactly_and_falls_back(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    text = route_table({"fx": {"retry": "NONE", "upstreams": [
        {"name": "fx_primary", "url": primary.url, "rate_limit": {"rate": 5, "per": "1s", "burst": 5}},
        {"name": "fx_secondary", "url": secondary.url}]}})
    proxy = await proxy_factory(text, clock=clock)
    answered_by = [(await proxy.get(f"/fx/{n}")).headers["X-Upstream"] for n in range(20)]
    assert primary.calls == 5 and secondary.calls == 15
    assert answered_by[:5] == ["fx_primary"] * 5
    clock.advance(1.0)
    for n in range(20):
        await proxy.get(f"/fx/again-{n}")
    assert primary.calls == 10
    clock.advance(0.2)  # one token back
    await proxy.get("/fx/one-more")
    await proxy.get("/fx/one-too-many")
    assert primary.calls == 11


async def test_the_rate_limit_is_shared_by_replicas_through_redis(fake_upstream, clock, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    text = route_table({"fx": {"retry": "NONE", "upstreams": [
        {"name": "fx_primary", "url": primary.url, "rate_limit": "6/m"}]}},
        cache={"backend": "redis", "url": redis_url, "prefix": redis_prefix})
    replicas = [await start_proxy(text, clock=clock), await start_proxy(text, clock=clock)]
    try:
        statuses = [(await replica.get(f"/fx/{n}")).status for n in range(6) for replica in replicas]
        assert primary.calls == 6
        assert statuses.count(200) == 6 and statuses.count(503) == 6
    finally:
        for replica in replicas:
            await stop_proxy(replica)


async def test_a_refused_key_rotates_to_the_next_and_neither_value_is_logged(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Fail(429, headers={"Retry-After": "120"}, body=b'{"error": "quota exceeded"}'))
    env = {"FX_PRIMARY_API_KEY": "first-key-9a8b7c", "FX_PRIMARY_API_KEY_2": "second-key-1d2e3f"}
    text = route_table({"fx": {"retry": "NONE", "upstreams": [{
        "name": "fx_primary", "url": primary.url, "query": {"access_key": "{key}"},
        "keys": ["${FX_PRIMARY_API_KEY}", "${FX_PRIMARY_API_KEY_2}"]}]}})
    buffer = io.StringIO()
    logs.configure("debug", "json", stream=buffer)
    try:
        proxy = await proxy_factory(text, clock=clock, env=env)
        first = await proxy.get("/fx/latest")
        second = await proxy.get("/fx/latest")
        circuits = await (await proxy.get("/health/integrations/circuits")).text()
        metrics = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
    finally:
        structlog.reset_defaults()
    assert first.status == 200 and second.status == 200
    used = [seen.path_qs.split("access_key=")[1] for seen in primary.seen]
    assert used == ["first-key-9a8b7c", "second-key-1d2e3f", "second-key-1d2e3f"]
    output = buffer.getvalue()
    for secret in env.values():
        assert secret not in output and secret not in circuits and secret not in metrics
    spent = [orjson.loads(line) for line in output.splitlines() if '"api_key"' in line]
    assert len(spent) == 1 and spent[0]["status"] == 429 and spent[0]["keys_left"] == 1
    keys = orjson.loads(circuits)["circuits"][0]["keys"]
    assert [k["spent"] for k in keys] == [True, False]
    assert keys[0]["spentUntil"] == "2024-12-01T08:02:00.000Z"
    assert 'api_key_rotations_total{provider="fx_primary",service="fx"} 1.0' in metrics
    clock.advance(121)  # the first key has rested
    await proxy.get("/fx/latest")
    assert primary.seen[-1].path_qs.endswith("access_key=first-key-9a8b7c")


async def test_when_every_key_is_refused_the_next_upstream_answers(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(401, body=b'{"error": "invalid api key"}')
    text = route_table({"fx": {"retry": "NONE", "upstreams": [
        {"name": "fx_primary", "url": primary.url, "headers": {"Authorization": "Bearer {key}"},
         "keys": ["k-one-1111", "k-two-2222"]},
        {"name": "fx_secondary", "url": secondary.url}]}})
    proxy = await proxy_factory(text, clock=clock)
    response = await proxy.get("/fx/latest")
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 2
    again = await proxy.get("/fx/latest")
    assert again.headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 2  # both keys rest: the primary is skipped without a call


async def test_a_403_that_is_not_about_the_key_is_passed_through(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Fail(403, body=b'{"error": "this resource is forbidden for everyone"}')
    text = route_table({"fx": {"retry": "NONE", "upstreams": [
        {"name": "fx_primary", "url": primary.url, "query": {"k": "{key}"}, "keys": ["kkkk-1", "kkkk-2"]}]}})
    proxy = await proxy_factory(text, clock=clock)
    response = await proxy.get("/fx/private")
    assert response.status == 403
    assert primary.calls == 1
