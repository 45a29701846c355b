"""The HIT fast path (server.HitPath): the same answers, counts and refusals as the full chain."""

from __future__ import annotations

import pytest
import structlog
from yarl import URL

from proxy import logs
from tests.fakes import Ok
from tests.test_caching import RATES, cached, redis_table

VARIABLE = {"x-request-id", "date"}


class ChainCalls:
    """Counts requests that went through the chain instead of the fast path."""

    def __init__(self, runtime) -> None:
        self.count = 0
        self._chain = runtime.chain
        runtime.chain = self

    async def __call__(self, exchange):
        self.count += 1
        return await self._chain(exchange)


def comparable(response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in response.headers.items():
        if name.lower() not in VARIABLE:
            out.setdefault(name.lower(), []).append(value)
    return out


@pytest.fixture
def warning_logs():
    logs.configure("warning", "json")
    yield
    structlog.reset_defaults()


async def start(fake_upstream, proxy_factory, clock, **kwargs):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES, headers={"Content-Type": "application/json", "ETag": '"v1"'})
    proxy = await proxy_factory(cached(primary.url, **kwargs), clock=clock)
    return primary, proxy, ChainCalls(proxy.process.runtime)


@pytest.mark.parametrize("quiet", [False, True], ids=["info-logs", "warning-logs"])
async def test_a_fast_hit_carries_the_same_headers_and_body_as_a_chain_hit(fake_upstream, proxy_factory, clock,
                                                                          request, quiet):
    if quiet:
        request.getfixturevalue("warning_logs")
    primary, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    clock.advance(42)
    fast = await proxy.get("/fx/latest/USD")
    assert chain.count == 1  # only the miss went through the chain
    # `%55` is `U`: the same copy, but an encoded path always takes the full path.
    slow = await proxy.client.get(URL(proxy.url + "/fx/latest/%55SD", encoded=True))
    assert chain.count == 2
    assert fast.status == slow.status == 200
    assert fast.headers["X-Cache"] == slow.headers["X-Cache"] == "HIT"
    assert comparable(fast) == comparable(slow)
    assert fast.headers["Age"] == "42" and fast.headers["X-Upstream"] == "fx_primary"
    assert fast.headers["Cache-Status"] == f"resilience-proxy; hit; ttl={86400 - 42}"
    assert len(fast.headers["X-Request-ID"]) == 32 and fast.headers["X-Request-ID"] != slow.headers["X-Request-ID"]
    assert await fast.read() == await slow.read() == RATES
    assert primary.calls == 1


async def test_a_fast_hit_keeps_a_valid_caller_request_id_and_replaces_an_unsafe_one(fake_upstream, proxy_factory, clock):
    _, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    await proxy.get("/fx/latest/USD")
    kept = await proxy.get("/fx/latest/USD", headers={"X-Request-ID": "abc-123"})
    replaced = await proxy.get("/fx/latest/USD", headers={"X-Request-ID": "bad id\twith tab"})
    assert chain.count == 1
    assert kept.headers["X-Request-ID"] == "abc-123"
    assert replaced.headers["X-Request-ID"] != "bad id\twith tab" and len(replaced.headers["X-Request-ID"]) == 32


async def test_the_fast_path_never_answers_across_credentials_encodings_or_no_store(fake_upstream, proxy_factory, clock):
    primary, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    await proxy.get("/fx/latest/USD")
    assert (await proxy.get("/fx/latest/USD", headers={"Authorization": "Bearer x"})).headers["X-Cache"] == "BYPASS"
    assert (await proxy.get("/fx/latest/USD", headers={"Cookie": "a=b"})).headers["X-Cache"] == "BYPASS"
    assert (await proxy.get("/fx/latest/USD", headers={"Cache-Control": "no-store"})).headers["X-Cache"] == "BYPASS"
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Encoding": "gzip"})).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Encoding": "gzip"})).headers["X-Cache"] == "HIT"
    conditional = await proxy.get("/fx/latest/USD", headers={"If-None-Match": '"v1"'})
    assert conditional.headers["X-Cache"] == "BYPASS"
    assert chain.count == 6  # everything above but the gzip HIT went through the chain
    assert primary.calls == 6


async def test_vary_routes_and_stale_copies_take_the_full_path(fake_upstream, proxy_factory, clock):
    primary, proxy, chain = await start(fake_upstream, proxy_factory, clock,
                                        route_cache={"ttl": "1m", "vary": ["Accept-Language"]})
    await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Language": "en"})).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})).headers["X-Cache"] == "HIT"
    assert chain.count == 3
    clock.advance(61)  # past the ttl: never served fresh, refetched by the chain
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})).headers["X-Cache"] == "MISS"
    assert chain.count == 4 and primary.calls == 3


@pytest.mark.parametrize("quiet", [False, True], ids=["info-logs", "warning-logs"])
async def test_fast_hits_are_counted_in_metrics_and_stats(fake_upstream, proxy_factory, clock, request, quiet):
    if quiet:
        request.getfixturevalue("warning_logs")
    _, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    for _ in range(4):
        await proxy.get("/fx/latest/USD")
    assert chain.count == 1
    metrics = proxy.process.metrics
    registry = metrics.registry
    assert registry.get_sample_value("proxy_requests_total", {"service": "fx", "code": "200"}) == 4
    assert registry.get_sample_value("cache_requests_total", {"service": "fx", "result": "hit"}) == 3
    assert registry.get_sample_value("cache_requests_total", {"service": "fx", "result": "miss"}) == 1
    assert registry.get_sample_value("proxy_request_duration_seconds_count", {"service": "fx"}) == 4
    assert metrics.hit_rate("fx") == 75.0
    body, _ = metrics.render()
    assert 'cache_hit_rate{service="fx"} 75.0' in body.decode()
    window = proxy.process.stats.window(5)["services"]["fx"]
    assert window["requests"] == 4 and window["cacheHitRate"] == 75.0


async def test_the_hit_rate_window_still_ages_out_fast_hits(fake_upstream, proxy_factory, clock, warning_logs):
    _, proxy, _ = await start(fake_upstream, proxy_factory, clock)
    await proxy.get("/fx/latest/USD")
    await proxy.get("/fx/latest/USD")
    clock.advance(301)
    assert proxy.process.metrics.hit_rate("fx") is None


async def test_a_fast_hit_writes_the_request_log_line_at_info(fake_upstream, proxy_factory, clock):
    _, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    await proxy.get("/fx/latest/USD")
    with structlog.testing.capture_logs() as lines:
        await proxy.get("/fx/latest/USD")
    assert chain.count == 1
    requests = [line for line in lines if line.get("kind") == "request"]
    assert len(requests) == 1
    assert requests[0]["x_cache"] == "HIT" and requests[0]["status"] == 200 and requests[0]["route"] == "/fx/latest/{base}"


async def test_a_local_copy_is_re_read_from_redis_after_local_ttl(fake_upstream, proxy_factory, clock, redis_url,
                                                                  redis_prefix):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES)
    proxy = await proxy_factory(redis_table(primary.url, redis_url, redis_prefix), clock=clock)
    if not proxy.process.runtime.store.connected:
        pytest.skip("no Redis answers at " + redis_url)
    chain = ChainCalls(proxy.process.runtime)
    await proxy.get("/fx/latest/USD")
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    assert chain.count == 1  # the local copy answered on the fast path
    clock.advance(1.5)  # past local_ttl (1s): the copy must be re-read from Redis, by the chain
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    assert chain.count == 2
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    assert chain.count == 2 and primary.calls == 1
