"""A copy past its ttl never makes a caller wait on a slow refresh: stale-if-slow, one background
refresh per key, and every stale answer counted with its reason and logged at most once a minute."""

from __future__ import annotations

import asyncio
import gc

import pytest
import structlog

from tests.fakes import Delay, Fail, Ok, Reset, eventually, metric, route_table

V1, V2 = b'{"v": 1}', b'{"v": 2}'


def table(primary: str, secondary: str | None = None, retry: object = "NONE", **cache: object) -> str:
    upstreams = [{"name": "fx_primary", "url": primary}]
    if secondary:
        upstreams.append({"name": "fx_secondary", "url": secondary})
    rule = {"ttl": "1m", "stale": "1h", **cache}
    return route_table({"fx": {"timeout": "2s", "retry": retry, "cache": rule, "upstreams": upstreams}})


async def expired_copy(proxy, clock, path: str = "/fx/latest/USD") -> None:
    assert (await proxy.get(path)).headers["X-Cache"] == "MISS"
    clock.advance(120)  # past the 1 m ttl, well inside the 1 h stale window


async def refreshed(proxy) -> None:
    assert await eventually(lambda: proxy.process.runtime.cache.refreshing == 0, within=5.0)


async def test_a_slow_refresh_is_not_waited_for_and_lands_in_the_cache_in_the_background(fake_upstream, proxy_factory,
                                                                                        clock):
    primary = await fake_upstream("primary")
    primary.script(Ok(body=V1), Delay(0.4, then=Ok(body=V2)))
    proxy = await proxy_factory(table(primary.url, stale_if_slow="50ms"), clock=clock)
    await expired_copy(proxy, clock)
    stale = await proxy.get("/fx/latest/USD")
    assert stale.headers["X-Cache"] == "STALE" and await stale.read() == V1
    assert stale.headers["Age"] == "120"
    assert stale.headers["Cache-Status"] == "resilience-proxy; fwd=stale; detail=slow"
    assert proxy.process.runtime.cache.refreshing == 1  # still going after the caller had its answer
    await refreshed(proxy)
    fresh = await proxy.get("/fx/latest/USD")
    assert (fresh.headers["X-Cache"], await fresh.read(), fresh.headers["Age"]) == ("HIT", V2, "0")
    assert primary.calls == 2
    assert await metric(proxy, "stale_served_total", service="fx", reason="slow") == 1


async def test_a_refresh_that_answers_in_time_is_the_answer(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Ok(body=V1), Ok(body=V2))
    proxy = await proxy_factory(table(primary.url, stale_if_slow="2s"), clock=clock)
    await expired_copy(proxy, clock)
    response = await proxy.get("/fx/latest/USD")
    assert (response.headers["X-Cache"], await response.read()) == ("MISS", V2)
    assert "Age" not in response.headers
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    assert primary.calls == 2
    assert await metric(proxy, "stale_served_total", service="fx", reason="slow") is None


async def test_one_refresh_per_key_and_nobody_else_waits_for_it(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Ok(body=V1), Delay(0.5, then=Ok(body=V2)))
    proxy = await proxy_factory(table(primary.url, stale_if_slow="100ms"), clock=clock)
    await expired_copy(proxy, clock)
    # A full collection of the whole test run's heap can pause the loop for over 100 ms (stale_if_slow
    # below): have it now, not while the first caller waits.
    gc.collect()
    first = asyncio.ensure_future(proxy.get("/fx/latest/USD"))
    await eventually(lambda: primary.calls == 2)
    followers = await asyncio.gather(*(proxy.get("/fx/latest/USD") for _ in range(5)))
    assert not first.done()  # the followers were answered while the first still waited for the refresh
    assert [r.headers["X-Cache"] for r in followers] == ["STALE"] * 5
    assert all("detail=revalidating" in r.headers["Cache-Status"] for r in followers)
    assert (await first).headers["Cache-Status"].endswith("detail=slow")
    assert primary.calls == 2  # one refresh for six callers
    assert await metric(proxy, "stale_served_total", service="fx", reason="revalidating") == 5
    await refreshed(proxy)


async def test_stale_if_slow_0_serves_the_copy_at_once_and_refreshes_it(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Ok(body=V1), Ok(body=V2))
    proxy = await proxy_factory(table(primary.url, stale_if_slow=0), clock=clock)
    await expired_copy(proxy, clock)
    stale = await proxy.get("/fx/latest/USD")
    assert (stale.headers["X-Cache"], await stale.read()) == ("STALE", V1)
    assert stale.headers["Cache-Status"].endswith("detail=revalidating")
    await refreshed(proxy)
    assert await (await proxy.get("/fx/latest/USD")).read() == V2


async def test_stale_if_slow_off_waits_for_the_refresh(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Ok(body=V1), Delay(0.3, then=Ok(body=V2)))
    proxy = await proxy_factory(table(primary.url, stale_if_slow="off"), clock=clock)
    await expired_copy(proxy, clock)
    response = await proxy.get("/fx/latest/USD")
    assert (response.headers["X-Cache"], await response.read()) == ("MISS", V2)


async def test_a_refresh_that_fails_in_time_gives_the_copy_with_the_failure_as_reason(fake_upstream, proxy_factory,
                                                                                     clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Ok(body=V1))
    primary.default = secondary.default = Fail(503)
    proxy = await proxy_factory(table(primary.url, secondary.url), clock=clock)  # the default stale_if_slow
    await expired_copy(proxy, clock)
    stale = await proxy.get("/fx/latest/USD")
    assert stale.headers["X-Cache"] == "STALE"
    assert stale.headers["Cache-Status"] == \
        "resilience-proxy; fwd=stale; fwd-status=503; detail=all_upstreams_failed"
    assert (primary.calls, secondary.calls) == (2, 1)
    assert await metric(proxy, "stale_served_total", service="fx", reason="error") == 1
    assert await metric(proxy, "fallbacks_total", service="fx", provider="fx_primary") == 1


async def test_a_head_on_an_expired_copy_refreshes_the_get_copy(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Ok(body=V1), Ok(body=V2))
    proxy = await proxy_factory(table(primary.url, stale_if_slow=0), clock=clock)
    await expired_copy(proxy, clock)
    head = await proxy.request("HEAD", "/fx/latest/USD")
    assert head.headers["X-Cache"] == "STALE"
    await refreshed(proxy)
    assert primary.seen[-1].method == "GET"
    hit = await proxy.get("/fx/latest/USD")
    assert (hit.headers["X-Cache"], await hit.read()) == ("HIT", V2)


async def test_the_stale_line_is_logged_once_per_key_per_minute_and_every_answer_counted(fake_upstream,
                                                                                        proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(Ok(body=V1), Ok(body=V1))
    proxy = await proxy_factory(table(primary.url), clock=clock)
    await proxy.get("/fx/latest/USD")
    await proxy.get("/fx/latest/EUR")
    clock.advance(120)
    primary.default = Fail(503)
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "STALE"
            clock.advance(10)
        assert (await proxy.get("/fx/latest/EUR")).headers["X-Cache"] == "STALE"
        clock.advance(15)  # a minute after the first USD line
        await proxy.get("/fx/latest/USD")
        proxy.process.bus.deliver_waiting()  # held per-request events go out together, stamped when they happened
    lines = [e for e in logs if e.get("kind") == "stale"]
    # Five 503s in a row opened the breaker: from then on the copy stands in for an open breaker.
    assert [(e["path"], e["reason"]) for e in lines] == [
        ("/fx/latest/USD", "error"), ("/fx/latest/EUR", "breaker_open"), ("/fx/latest/USD", "breaker_open")]
    assert lines[0]["event"] == "Using stale cache for fx /fx/latest/USD, age: 120s"
    assert await metric(proxy, "stale_served_total", service="fx", reason="error") == 5
    assert await metric(proxy, "stale_served_total", service="fx", reason="breaker_open") == 2


@pytest.mark.parametrize("value", ["250ms", 0, "off"])
async def test_stale_if_slow_shows_in_the_effective_config(value):
    from proxy.config.parse import parse_config

    config = parse_config(table("http://127.0.0.1:1", stale_if_slow=value), "routes.yaml", {})
    expected = {"250ms": 0.25, 0: 0.0, "off": "off"}[value]
    assert config.effective["services"]["fx"]["cache"]["stale_if_slow"] == expected


async def test_the_copy_answers_once_every_upstream_failed_and_the_retry_lands_in_the_background(
        fake_upstream, proxy_factory, clock):
    """A refresh whose first try failed on every upstream will only retry after a backoff: the caller
    takes the copy then (nginx's 502 moment), and a retry that succeeds still refreshes the cache."""
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Ok(body=V1), Fail(503), Ok(body=V2))
    secondary.default = Reset()  # not a 5xx from every upstream, which would end the refresh without a retry
    one_retry = {"retries": 1, "base_delay": "100ms", "max_delay": "100ms"}
    proxy = await proxy_factory(table(primary.url, secondary.url, retry=one_retry, stale_if_slow="5s"), clock=clock)
    await expired_copy(proxy, clock)
    stale = await proxy.get("/fx/latest/USD")
    assert (stale.headers["X-Cache"], await stale.read()) == ("STALE", V1)  # not the retry's V2, 5 s allowed
    assert stale.headers["Cache-Status"] == "resilience-proxy; fwd=stale; fwd-status=503; detail=all_upstreams_failed"
    await refreshed(proxy)
    fresh = await proxy.get("/fx/latest/USD")
    assert (fresh.headers["X-Cache"], await fresh.read()) == ("HIT", V2)
    assert (primary.calls, secondary.calls) == (3, 1)  # the copy, the first try, the retry
    assert await metric(proxy, "stale_served_total", service="fx", reason="error") == 1
