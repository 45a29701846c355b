"""The cache through the whole proxy: HIT/MISS/STALE/BYPASS, coalescing, Redis, and what is never stored."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import structlog

from tests.fakes import Delay, Fail, Ok, route_table, start_proxy, stop_proxy

RATES = b'{"base": "USD", "rates": {"KRW": 1400.5}}'


def cached(primary: str, secondary: str | None = None, *, cache: dict | None = None, route_cache: dict | None = None,
           top: dict | None = None, **service: object) -> str:
    upstreams = [{"name": "fx_primary", "url": primary}]
    if secondary:
        upstreams.append({"name": "fx_secondary", "url": secondary})
    settings = {"retry": "NONE", "timeout": "300ms", "deadline": "2s", "cache": cache or {"ttl": "24h", "stale": "7d"}}
    settings.update(service)
    routes = [{"match": "/fx/latest/{base}", **({"cache": route_cache} if route_cache else {})}]
    return route_table({"fx": {**settings, "routes": routes, "upstreams": upstreams}}, **(top or {}))


async def test_a_miss_is_stored_and_the_next_request_is_a_hit_without_an_upstream_call(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES, headers={"Content-Type": "application/json"})
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    miss = await proxy.get("/fx/latest/USD")
    assert miss.headers["X-Cache"] == "MISS"
    assert "Age" not in miss.headers
    assert miss.headers["Cache-Status"] == "resilience-proxy; fwd=miss; stored"
    clock.advance(300)
    hit = await proxy.get("/fx/latest/USD")
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.headers["Age"] == "300"
    assert hit.headers["X-Upstream"] == "fx_primary"
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["Cache-Status"] == f"resilience-proxy; hit; ttl={86400 - 300}"
    assert await hit.read() == RATES
    assert primary.calls == 1


async def test_the_key_ignores_query_order_but_not_query_values(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    await proxy.get("/fx/latest/USD?a=1&b=2")
    assert (await proxy.get("/fx/latest/USD?b=2&a=1")).headers["X-Cache"] == "HIT"
    assert (await proxy.get("/fx/latest/USD?a=1&b=3")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest/EUR?a=1&b=2")).headers["X-Cache"] == "MISS"
    assert primary.calls == 3


async def test_a_copy_past_its_ttl_is_refetched(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    proxy = await proxy_factory(cached(primary.url, route_cache={"ttl": "5m"}), clock=clock)
    await proxy.get("/fx/latest/USD")
    clock.advance(299)
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    clock.advance(1)
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    assert primary.calls == 2


@pytest.mark.parametrize("failure", ["5xx", "timeout", "breakers_open"])
async def test_a_stale_copy_answers_when_every_upstream_fails(fake_upstream, proxy_factory, clock, failure):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Ok(body=RATES))
    # Waiting for the refresh however long it takes: the copy stands in for the failure itself
    # (with the default stale_if_slow it would answer sooner: tests/chain/test_stale_if_slow.py).
    route_cache = {"ttl": "1h", "stale_if_slow": "off"}
    proxy = await proxy_factory(cached(primary.url, secondary.url, route_cache=route_cache), clock=clock)
    await proxy.get("/fx/latest/USD")
    clock.advance(7200)
    if failure == "5xx":
        primary.default = secondary.default = Fail(503)
    elif failure == "timeout":
        primary.default = secondary.default = Delay(2.0)
    else:
        proxy.breaker("fx_primary").force_open()
        proxy.breaker("fx_secondary").force_open()
    calls_before = primary.calls + secondary.calls
    with structlog.testing.capture_logs() as logs:
        stale = await proxy.get("/fx/latest/USD")
        proxy.process.bus.deliver_waiting()  # per-request lines are written in batches, after the answer
    assert stale.status == 200
    assert stale.headers["X-Cache"] == "STALE"
    assert stale.headers["Age"] == "7200"
    assert stale.headers["X-Upstream"] == "fx_primary"
    assert await stale.read() == RATES
    assert "fwd=stale" in stale.headers["Cache-Status"]
    if failure == "5xx":
        assert "fwd-status=503" in stale.headers["Cache-Status"]
    line = next(e for e in logs if e["event"] == "Using stale cache for fx /fx/latest/USD, age: 7200s")
    assert line["reason"] == {"5xx": "error", "timeout": "timeout", "breakers_open": "breaker_open"}[failure]
    expected_new_calls = 0 if failure == "breakers_open" else 2
    assert primary.calls + secondary.calls == calls_before + expected_new_calls


async def test_no_stale_copy_is_served_past_its_stale_window(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Ok(body=RATES))
    primary.default = Fail(500)
    proxy = await proxy_factory(cached(primary.url, cache={"ttl": "1h", "stale": "1d"}), clock=clock)
    await proxy.get("/fx/latest/USD")
    clock.advance(3600 + 86400 - 1)
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "STALE"
    clock.advance(1)
    gone = await proxy.get("/fx/latest/USD")
    assert gone.status == 502
    assert gone.headers["X-Cache"] == "MISS"


@pytest.mark.parametrize("headers, request_headers, method, why", [
    ({"Set-Cookie": "s=1"}, {}, "GET", "set-cookie"),
    ({"Cache-Control": "no-store"}, {}, "GET", "no-store"),
    ({"Cache-Control": "private, max-age=60"}, {}, "GET", "private"),
    ({}, {"Authorization": "Bearer caller"}, "GET", "authorization"),
    ({}, {"Cookie": "c=1"}, "GET", "cookie"),
    ({}, {}, "POST", "post"),
])
async def test_never_cached(fake_upstream, proxy_factory, clock, headers, request_headers, method, why):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES, headers={"Content-Type": "application/json", **headers})
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    first = await proxy.request(method, "/fx/latest/USD", headers=request_headers)
    second = await proxy.request(method, "/fx/latest/USD", headers=request_headers)
    expected = "BYPASS" if why in ("authorization", "cookie", "post") else "MISS"
    assert first.headers["X-Cache"] == second.headers["X-Cache"] == expected
    assert primary.calls == 2


GET_WITH_BODY = (b"GET /fx/latest/USD HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s")
GET_CHUNKED = (b"GET /fx/latest/USD HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"%x\r\n%s\r\n0\r\n\r\n")


@pytest.mark.parametrize("first", ["fresh-connection", "after-a-post"])
async def test_a_get_with_a_body_bypasses_the_cache_and_reaches_the_upstream_whole(fake_upstream, proxy_factory,
                                                                                   clock, first):
    from tests.downstream.test_front import Client

    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES)
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    client = await Client.open(proxy)
    if first == "after-a-post":  # the connection is aiohttp's from here on
        client.send(b"POST /fx/latest/USD HTTP/1.1\r\nHost: proxy\r\nContent-Length: 2\r\n\r\n{}")
        assert (await client.answer()).header("X-Cache") == "BYPASS"
    bodies = [b'{"q": "a"}', b'{"q": "b"}', b'{"q": "c"}']
    client.send(GET_WITH_BODY % (len(bodies[0]), bodies[0]))
    client.send(GET_WITH_BODY % (len(bodies[1]), bodies[1]))
    client.send(GET_CHUNKED % (len(bodies[2]), bodies[2]))
    answers = [await client.answer() for _ in bodies]
    assert [a.header("X-Cache") for a in answers] == ["BYPASS"] * 3
    assert [a.header("Cache-Status") for a in answers] == ["resilience-proxy; fwd=bypass"] * 3
    gets = [s for s in primary.seen if s.method == "GET"]
    assert [s.body for s in gets] == bodies  # each forwarded with its own body, none answered from another's
    # nothing a body chose was stored: a plain GET (lean path, HIT shortcut) goes upstream itself
    client.send(b"GET /fx/latest/USD HTTP/1.1\r\nHost: proxy\r\n\r\n")
    plain = await client.answer()
    assert (plain.header("X-Cache"), plain.body) == ("MISS", RATES)
    assert [s.body for s in primary.seen if s.method == "GET"] == bodies + [b""]
    client.close()


async def test_a_get_with_an_empty_body_is_a_plain_get(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    assert (await proxy.get("/fx/latest/USD", data=b"")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest/USD", headers={"Content-Length": "0"})).headers["X-Cache"] == "HIT"
    assert primary.calls == 1


async def test_answers_larger_than_max_body_bytes_are_not_stored(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=b"x" * 5000)
    top = {"cache": {"backend": "memory", "max_body_bytes": "4KiB"}}
    proxy = await proxy_factory(cached(primary.url, top=top), clock=clock)
    await proxy.get("/fx/latest/USD")
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    assert primary.calls == 2


async def test_copies_keyed_by_credential_are_never_served_to_another_caller(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=b'{"who": "someone"}')
    proxy = await proxy_factory(cached(primary.url, route_cache={"key_by_credential": True},
                                       forward_headers=["Authorization"]), clock=clock)
    alice = {"Authorization": "Bearer alice"}
    bob = {"Authorization": "Bearer bob"}
    assert (await proxy.get("/fx/latest/USD", headers=alice)).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest/USD", headers=bob)).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest/USD", headers=alice)).headers["X-Cache"] == "HIT"
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    assert primary.calls == 3


async def test_vary_headers_named_by_the_route_split_the_cache(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    proxy = await proxy_factory(cached(primary.url, route_cache={"vary": ["Accept-Language"]}), clock=clock)
    await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Language": "en"})).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})).headers["X-Cache"] == "HIT"


async def test_head_is_answered_from_a_get_copy_and_never_stores_an_empty_body(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES)
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    head_first = await proxy.request("HEAD", "/fx/latest/USD")
    assert head_first.headers["X-Cache"] == "MISS"
    get = await proxy.get("/fx/latest/USD")
    assert get.headers["X-Cache"] == "MISS" and await get.read() == RATES
    head = await proxy.request("HEAD", "/fx/latest/USD")
    assert head.headers["X-Cache"] == "HIT"
    assert head.headers["Content-Length"] == str(len(RATES))
    assert primary.calls == 2


async def test_200_concurrent_identical_misses_make_one_upstream_call(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Delay(0.2, then=Ok(body=RATES))
    proxy = await proxy_factory(cached(primary.url, timeout="5s", deadline="10s"), clock=clock)
    responses = await asyncio.gather(*(proxy.get("/fx/latest/USD") for _ in range(200)))
    assert [r.status for r in responses] == [200] * 200
    assert all([await r.read() == RATES for r in responses])
    assert primary.calls == 1
    metrics = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
    assert 'coalesced_requests_total{service="fx"} 199.0' in metrics


async def test_200_concurrent_misses_against_a_failing_upstream_make_one_call_and_200_errors(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Delay(0.2, then=Fail(503))
    proxy = await proxy_factory(cached(primary.url, timeout="5s", deadline="10s"), clock=clock)
    responses = await asyncio.gather(*(proxy.get("/fx/latest/USD") for _ in range(200)))
    assert [r.status for r in responses] == [502] * 200
    bodies = [await r.json() for r in responses]
    assert all(b["attempts"][0]["outcome"] == "http_5xx" for b in bodies)
    assert primary.calls == 1


async def test_stale_while_revalidate_serves_at_once_and_refreshes_in_the_background(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Ok(body=b'{"v": 1}'))
    primary.default = Ok(body=b'{"v": 2}')
    proxy = await proxy_factory(cached(primary.url, route_cache={"ttl": "1m", "stale_while_revalidate": True}), clock=clock)
    await proxy.get("/fx/latest/USD")
    clock.advance(120)
    stale = await proxy.get("/fx/latest/USD")
    assert stale.headers["X-Cache"] == "STALE"
    assert await stale.read() == b'{"v": 1}'
    for _ in range(100):
        if primary.calls == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    fresh = await proxy.get("/fx/latest/USD")
    assert fresh.headers["X-Cache"] == "HIT"
    assert await fresh.read() == b'{"v": 2}'
    assert primary.calls == 2


async def test_admin_purge_drops_a_services_copies(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    await proxy.get("/fx/latest/USD")
    purged = await proxy.request("DELETE", "/health/integrations/cache/fx")
    assert purged.status == 200
    assert (await purged.json())["purged"] == 1
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    assert (await proxy.request("DELETE", "/health/integrations/cache/nope")).status == 404


# --- Redis backend ------------------------------------------------------------------------------

def redis_table(primary: str, url: str, prefix: str, op_timeout: str = "50ms", **kwargs) -> str:
    return cached(primary, top={"cache": {"backend": "redis", "url": url, "prefix": prefix, "local_ttl": "1s",
                                          "op_timeout": op_timeout}}, **kwargs)


async def test_redis_copies_survive_a_proxy_restart(fake_upstream, clock, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES)
    text = redis_table(primary.url, redis_url, redis_prefix)
    first = await start_proxy(text, clock=clock)
    try:
        assert (await first.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    finally:
        await stop_proxy(first)
    clock.advance(60)
    second = await start_proxy(text, clock=clock)
    try:
        hit = await second.get("/fx/latest/USD")
        assert hit.headers["X-Cache"] == "HIT"
        assert hit.headers["Age"] == "60"
        assert await hit.read() == RATES
        assert primary.calls == 1
        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}fx:*")]
        assert len(keys) == 1
        ttl = await client.ttl(keys[0])
        assert 86400 + 7 * 86400 - 120 <= ttl <= 86400 + 7 * 86400
        await client.delete(*keys)
        await client.aclose()
    finally:
        await stop_proxy(second)


async def test_a_garbage_redis_value_is_ignored_never_executed(fake_upstream, proxy_factory, clock, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES)
    proxy = await proxy_factory(redis_table(primary.url, redis_url, redis_prefix), clock=clock)
    await proxy.get("/fx/latest/USD")
    client = aioredis.Redis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=f"{redis_prefix}fx:*")]
    await client.set(keys[0], b"\x80\x04\x95cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    clock.advance(5)  # past the in-process tier's local_ttl
    again = await proxy.get("/fx/latest/USD")
    assert again.status == 200
    assert again.headers["X-Cache"] == "MISS"
    assert await again.read() == RATES
    assert primary.calls == 2
    await client.delete(*keys)
    await client.aclose()


async def test_redis_stopping_mid_run_never_stops_requests_and_the_cache_comes_back(fake_upstream, proxy_factory, clock,
                                                                                     throwaway_redis, redis_prefix):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES)
    proxy = await proxy_factory(redis_table(primary.url, throwaway_redis.url, redis_prefix,
                                            route_cache={"ttl": "1s"}), clock=clock)
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    throwaway_redis.stop()
    clock.advance(2)
    for _ in range(5):
        response = await proxy.get("/fx/latest/USD")
        assert response.status == 200
        assert await response.read() == RATES
    cache_state = await (await proxy.get("/health/integrations/cache")).json()
    assert cache_state["connected"] is False
    throwaway_redis.start()
    clock.advance(30)  # past the store's back-off
    await proxy.get("/fx/latest/USD")
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    cache_state = await (await proxy.get("/health/integrations/cache")).json()
    assert cache_state["connected"] is True
    metrics = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
    assert 'cache_backend_up{backend="redis"} 1.0' in metrics


async def test_cluster_coalescing_makes_one_upstream_call_across_replicas(fake_upstream, clock, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    primary.default = Delay(0.3, then=Ok(body=RATES))
    # A burst opens many Redis connections at once; on a loaded machine that can pass 50 ms and the
    # store would (rightly) fail open. This test is about the lock, so give Redis time.
    text = redis_table(primary.url, redis_url, redis_prefix, op_timeout="2s", route_cache={"coalesce": "cluster"},
                       timeout="5s", deadline="10s")
    replicas = [await start_proxy(text, clock=clock), await start_proxy(text, clock=clock)]
    try:
        responses = await asyncio.gather(*(replica.get("/fx/latest/USD") for replica in replicas for _ in range(25)))
        assert [r.status for r in responses] == [200] * 50
        assert all([await r.read() == RATES for r in responses])
        assert primary.calls == 1
    finally:
        for replica in replicas:
            await stop_proxy(replica)
        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_cluster_waiters_fetch_for_themselves_when_the_lock_holder_fails(fake_upstream, clock, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    primary.default = Delay(0.2, then=Fail(503))
    # A burst opens many Redis connections at once; on a loaded machine that can pass 50 ms and the
    # store would (rightly) fail open. This test is about the lock, so give Redis time.
    text = redis_table(primary.url, redis_url, redis_prefix, op_timeout="2s", route_cache={"coalesce": "cluster"},
                       timeout="5s", deadline="10s")
    replicas = [await start_proxy(text, clock=clock), await start_proxy(text, clock=clock)]
    try:
        responses = await asyncio.gather(*(replica.get("/fx/latest/USD") for replica in replicas for _ in range(10)))
        assert [r.status for r in responses] == [502] * 20
        assert primary.calls == 2  # the holder's call, then the other replica's own once the lock was released
    finally:
        for replica in replicas:
            await stop_proxy(replica)


async def test_cluster_coalescing_needs_the_redis_backend(fake_upstream):
    from proxy.config.parse import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(cached("http://a", route_cache={"coalesce": "cluster"}), "routes.yaml", {})
    assert any("coalesce: cluster needs cache.backend: redis" in p for p in caught.value.problems)
