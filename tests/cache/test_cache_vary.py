"""The upstream's `Vary` (RFC 9111 §4.1): a stored answer is reused only for requests whose
headers named by its Vary match the request it was stored for; `Vary: *` is never reused."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from proxy.cache.entry import Entry, encode_entry
from proxy.cache.keys import cache_key
from proxy.chain.cache_stage import MAX_VARIANTS
from tests.fakes import Delay, Fail, Ok, start_proxy, stop_proxy
from tests.chain.test_caching import cached, redis_table
from tests.downstream.test_hit_path import ChainCalls

JSON = {"Accept": "application/json"}
CSV = {"Accept": "text/csv"}
IDENTITY = {"Accept-Encoding": "identity"}


@pytest.fixture
async def redis_prefix(redis_url, redis_prefix):
    """This test's own key prefix; its keys are removed afterwards."""
    yield redis_prefix
    client = aioredis.Redis.from_url(redis_url)
    async for name in client.scan_iter(match=redis_prefix + "*", count=500):
        await client.unlink(name)
    await client.aclose()


def varying(body: bytes, vary: str = "Accept") -> Ok:
    return Ok(body=body, headers={"Content-Type": "application/octet-stream", "Vary": vary})


async def test_an_answer_varying_on_accept_is_served_only_to_callers_with_that_accept(fake_upstream, proxy_factory,
                                                                                      clock):
    primary = await fake_upstream("primary")
    primary.script(varying(b"json"), varying(b"csv"))
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    first = await proxy.get("/fx/latest/USD", headers=JSON)
    assert (first.headers["X-Cache"], await first.read()) == ("MISS", b"json")
    other = await proxy.get("/fx/latest/USD", headers=CSV)
    assert (other.headers["X-Cache"], await other.read()) == ("MISS", b"csv")
    assert primary.seen[1].headers["Accept"] == "text/csv"
    # both variants are kept: each caller gets its own from the cache
    for headers, body in ((JSON, b"json"), (CSV, b"csv"), (JSON, b"json")):
        hit = await proxy.get("/fx/latest/USD", headers=headers)
        assert (hit.headers["X-Cache"], await hit.read()) == ("HIT", body)
    assert primary.calls == 2


async def test_a_caller_without_the_varied_header_is_a_variant_of_its_own(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(varying(b"ko", "Accept-Language"), varying(b"none", "Accept-Language"))
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})
    bare = await proxy.get("/fx/latest/USD", headers={"Accept-Language": ""})
    assert bare.headers["X-Cache"] == "MISS"  # an empty value is not the value `ko`
    absent = await proxy.get("/fx/latest/USD")
    assert (absent.headers["X-Cache"], await absent.read()) == ("MISS", b'{"from": "primary"}')
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})).headers["X-Cache"] == "HIT"
    assert primary.calls == 3


async def test_vary_star_is_never_reused(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = varying(b"personal", "Accept, *")
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    first = await proxy.get("/fx/latest/USD", headers=JSON)
    second = await proxy.get("/fx/latest/USD", headers=JSON)
    assert first.headers["X-Cache"] == second.headers["X-Cache"] == "MISS"
    assert "stored" not in second.headers["Cache-Status"]
    assert primary.calls == 2


async def test_vary_on_accept_encoding_or_on_the_routes_own_vary_keeps_one_plain_copy(fake_upstream, proxy_factory,
                                                                                      clock):
    primary = await fake_upstream("primary")
    primary.default = varying(b"rates", "accept-encoding, Accept-Language")
    proxy = await proxy_factory(cached(primary.url, route_cache={"vary": ["Accept-Language"]}), clock=clock)
    chain = ChainCalls(proxy.process.runtime)
    await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})).headers["X-Cache"] == "HIT"
    assert len(proxy.process.runtime.store) == 1  # no vary index: the key covers both names already
    assert primary.calls == 1 and chain.count == 2


async def test_the_fast_path_never_answers_a_variant_to_a_caller_whose_headers_differ(fake_upstream, proxy_factory,
                                                                                     clock):
    primary = await fake_upstream("primary")
    primary.script(varying(b"json"), varying(b"csv"))
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    chain = ChainCalls(proxy.process.runtime)
    await proxy.get("/fx/latest/USD", headers=JSON)
    # a plain keep-alive GET is what the lean front end and the HIT fast path answer
    other = await proxy.get("/fx/latest/USD", headers=CSV)
    assert (other.headers["X-Cache"], await other.read()) == ("MISS", b"csv")
    hit = await proxy.get("/fx/latest/USD", headers=JSON)
    assert (hit.headers["X-Cache"], await hit.read()) == ("HIT", b"json")
    assert chain.count == 3  # a copy that varies is always chosen by the full path
    assert primary.calls == 2


async def test_concurrent_misses_share_an_answer_only_with_callers_it_was_made_for(fake_upstream, proxy_factory,
                                                                                   clock):
    primary = await fake_upstream("primary")
    primary.script(Delay(0.2, varying(b"json")), Delay(0.2, varying(b"csv")))
    proxy = await proxy_factory(cached(primary.url, timeout="2s"), clock=clock)
    json_answer, csv_answer = await asyncio.gather(proxy.get("/fx/latest/USD", headers=JSON),
                                                   proxy.get("/fx/latest/USD", headers=CSV))
    assert await json_answer.read() == b"json"
    assert await csv_answer.read() == b"csv"
    assert sorted(s.headers["Accept"] for s in primary.seen) == ["application/json", "text/csv"]


async def test_a_stale_variant_stands_in_only_for_callers_it_was_made_for(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.script(varying(b"json"))
    proxy = await proxy_factory(cached(primary.url, route_cache={"ttl": "1m", "stale_if_slow": "off"}), clock=clock)
    await proxy.get("/fx/latest/USD", headers=JSON)
    primary.default = Fail(503)
    clock.advance(120)
    other = await proxy.get("/fx/latest/USD", headers=CSV)
    assert other.status == 502 and other.headers["X-Cache"] == "MISS"
    same = await proxy.get("/fx/latest/USD", headers=JSON)
    assert (same.status, same.headers["X-Cache"], await same.read()) == (200, "STALE", b"json")


async def test_the_variants_of_one_key_are_bounded_and_the_oldest_goes(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = varying(b"any")
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    store = proxy.process.runtime.store
    for n in range(MAX_VARIANTS + 3):
        await proxy.get("/fx/latest/USD", headers={"Accept": f"application/v{n}"})
    assert len(store) == 1 + MAX_VARIANTS  # the index and the newest variants, nothing more
    assert (await proxy.get("/fx/latest/USD", headers={"Accept": "application/v0"})).headers["X-Cache"] == "MISS"
    newest = {"Accept": f"application/v{MAX_VARIANTS + 2}"}
    assert (await proxy.get("/fx/latest/USD", headers=newest)).headers["X-Cache"] == "HIT"


async def test_variants_are_shared_through_redis(fake_upstream, clock, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    primary.script(varying(b"json"), varying(b"csv"))
    text = redis_table(primary.url, redis_url, redis_prefix)
    first = await start_proxy(text, clock=clock)
    try:
        await first.get("/fx/latest/USD", headers=JSON)
        await first.get("/fx/latest/USD", headers=CSV)
    finally:
        await stop_proxy(first)
    second = await start_proxy(text, clock=clock)  # nothing in process: what it knows comes from Redis
    try:
        for headers, body in ((CSV, b"csv"), (JSON, b"json")):
            hit = await second.get("/fx/latest/USD", headers=headers)
            assert (hit.headers["X-Cache"], await hit.read()) == ("HIT", body)
        assert (await second.get("/fx/latest/USD", headers={"Accept": "text/html"})).headers["X-Cache"] == "MISS"
    finally:
        await stop_proxy(second)
    assert primary.calls == 3


async def test_a_copy_stored_before_vary_was_honoured_is_not_served_across_accepts(fake_upstream, clock, redis_url,
                                                                                  redis_prefix):
    primary = await fake_upstream("primary")
    primary.default = varying(b"csv")
    text = redis_table(primary.url, redis_url, redis_prefix)
    # what an older version wrote: the answer for some caller's Accept under the plain key
    now = clock.time()
    old = Entry(200, [("Content-Type", "application/json"), ("Vary", "Accept")], b"json", now, now + 3600,
                now + 7200, "fx_primary")
    key = cache_key("fx", "GET", "/fx/latest/USD", (), IDENTITY)
    client = aioredis.Redis.from_url(redis_url)
    await client.set(redis_prefix + key, encode_entry(old), ex=7200)
    await client.aclose()
    proxy = await start_proxy(text, clock=clock)
    try:
        for _ in range(2):  # the fast path and the full path alike
            answer = await proxy.get("/fx/latest/USD", headers={**CSV, **IDENTITY})
            assert await answer.read() == b"csv"
        assert primary.calls == 1
    finally:
        await stop_proxy(proxy)


async def test_replicas_coalescing_through_redis_never_hand_a_variant_to_another_accept(fake_upstream, clock,
                                                                                        redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    primary.script(Delay(0.2, varying(b"json")), Delay(0.2, varying(b"csv")))
    text = redis_table(primary.url, redis_url, redis_prefix, op_timeout="2s", route_cache={"coalesce": "cluster"},
                       timeout="5s", deadline="10s")
    replicas = [await start_proxy(text, clock=clock), await start_proxy(text, clock=clock)]
    try:
        json_answer = asyncio.ensure_future(replicas[0].get("/fx/latest/USD", headers=JSON))
        await asyncio.sleep(0.05)  # the first replica holds the lock on the key
        csv_answer = await replicas[1].get("/fx/latest/USD", headers=CSV)
        assert await (await json_answer).read() == b"json"
        assert await csv_answer.read() == b"csv"
        assert primary.calls == 2
    finally:
        for replica in replicas:
            await stop_proxy(replica)
