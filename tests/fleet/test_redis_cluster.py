"""The proxy on a 3-master Redis Cluster: copies shared by replicas, keys spread over the masters,
purges on every master, and every key the proxy writes (locks, buckets, rests, breakers, outbox)
accepted by the Cluster (no CROSSSLOT, no MOVED left unfollowed)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from proxy import signals
from tests.fakes import Delay, Fail, eventually, route_table
from tests.redis_servers import Cluster, Servers, need_redis_tools, port_from_env

need_redis_tools()


@pytest.fixture(scope="module")
def cluster():
    with tempfile.TemporaryDirectory(prefix="rp-cluster-") as directory:
        servers = Servers(Path(directory))
        running = Cluster(servers, port_from_env("REDIS_CLUSTER_PORT", 7101))
        try:
            running.start()
            yield running
        finally:
            servers.stop_all()


def cluster_table(upstreams: list[dict], cluster: Cluster, prefix: str) -> str:
    return route_table({"fx": {"timeout": "1s", "retry": "NONE", "cache": {"ttl": "1h"}, "upstreams": upstreams}},
                       # A generous op_timeout: on a loaded CI machine one SET over the default 50 ms marks Redis
                       # down for a while and the copies after it are (by design) not written.
                       cache={"backend": "redis", "url": cluster.url, "cluster": True, "prefix": prefix,
                              "op_timeout": "2s"})


def cache_errors(proxy) -> list:
    seen: list = []
    proxy.process.bus.subscribe(lambda e: seen.append(e) if type(e) is signals.CacheError else None)
    return seen


async def test_a_copy_one_replica_fetched_is_a_hit_on_the_other(cluster, fake_upstream, proxy_factory, redis_prefix):
    upstream = await fake_upstream("primary")
    text = cluster_table([{"name": "fx_primary", "url": upstream.url}], cluster, redis_prefix)
    a, b = await proxy_factory(text), await proxy_factory(text)
    errors = cache_errors(a) + cache_errors(b)
    first = await a.get("/fx/latest/USD")
    assert (first.status, first.headers["X-Cache"]) == (200, "MISS")
    second = await b.get("/fx/latest/USD")
    assert (second.status, second.headers["X-Cache"], second.headers["X-Upstream"]) == (200, "HIT", "fx_primary")
    assert await second.read() == await first.read()
    assert upstream.calls == 1
    assert a.process.runtime.store.connected and errors == []


async def test_copies_spread_over_the_masters_and_a_purge_clears_every_one(cluster, fake_upstream, proxy_factory,
                                                                           redis_prefix):
    upstream = await fake_upstream("primary")
    text = cluster_table([{"name": "fx_primary", "url": upstream.url}], cluster, redis_prefix)
    a, b = await proxy_factory(text), await proxy_factory(text)
    for n in range(30):
        assert (await a.get(f"/fx/item/{n}")).headers["X-Cache"] == "MISS"
    per_master = {port: len(cluster.keys(port, f"{redis_prefix}fx:*")) for port in cluster.ports}
    assert sum(per_master.values()) == 30
    assert all(count > 0 for count in per_master.values()), per_master  # hashed over all three

    purged = await a.request("DELETE", "/health/integrations/cache/fx")
    assert (purged.status, (await purged.json())["purged"]) == (200, 30)
    assert {port: cluster.keys(port, f"{redis_prefix}fx:*") for port in cluster.ports} == \
        {port: [] for port in cluster.ports}
    assert (await b.get("/fx/item/7")).headers["X-Cache"] == "MISS"
    assert upstream.calls == 31


async def test_every_key_the_proxy_writes_is_accepted_by_the_cluster(cluster, fake_upstream, proxy_factory,
                                                                      redis_prefix):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    flaky = await fake_upstream("flaky")
    primary.script(Fail(429, headers={"Retry-After": "30"}))
    flaky.default = Fail(503)
    text = route_table({
        "fx": {"timeout": "1s", "retry": "NONE", "cache": {"ttl": "1h", "coalesce": "cluster"}, "upstreams": [
            {"name": "fx_primary", "url": primary.url, "rate_limit": "100/m"},
            {"name": "fx_secondary", "url": secondary.url}]},
        "rates": {"timeout": "1s", "retry": "NONE", "breaker": {"profile": "FAST", "shared": True}, "upstreams": [
            {"name": "rates_primary", "url": flaky.url}, {"name": "rates_secondary", "url": secondary.url}]}},
        cache={"backend": "redis", "url": cluster.url, "cluster": True, "prefix": redis_prefix},
        events={"stream": "events"})
    a, b = await proxy_factory(text), await proxy_factory(text)
    errors = cache_errors(a) + cache_errors(b)
    assert await eventually(lambda: a.process.fleet.listening and b.process.fleet.listening, within=5.0)

    # A rest (Retry-After) written by one replica holds on the other: a one-key script, a pipelined read.
    assert (await a.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    assert await eventually(lambda: b.breaker("fx_primary").resting, within=3.0)
    assert primary.calls == 1
    everywhere = lambda pattern: sorted(k for p in cluster.ports for k in cluster.keys(p, redis_prefix + pattern))
    assert everywhere("rest:*") == [f"{redis_prefix}rest:fx_primary"]
    assert everywhere("ratelimit:*") == [f"{redis_prefix}ratelimit:fx_primary"]

    # A shared breaker opened on one replica is followed by the other (state and lease share a hash tag).
    for n in range(3):
        assert (await a.get(f"/rates/{n}")).headers["X-Upstream"] == "rates_secondary"
    assert a.breaker("rates_primary").state.value == "OPEN"
    assert await eventually(lambda: b.breaker("rates_primary").state.value == "OPEN", within=3.0)
    assert everywhere("{breaker:*") == [f"{redis_prefix}{{breaker:rates_primary}}"]
    for n in range(5):
        assert (await b.get(f"/rates/other/{n}")).headers["X-Upstream"] == "rates_secondary"
    assert flaky.calls == 3  # the other replica sent it nothing
    assert errors == []


async def test_replicas_coalesce_one_fetch_across_the_cluster(cluster, fake_upstream, proxy_factory, redis_prefix):
    import asyncio

    upstream = await fake_upstream("primary")
    upstream.default = Delay(0.3)
    # A generous op_timeout: on a busy machine a 50 ms budget may run out, and the replica then
    # (rightly) fetches for itself; this test is about the lock, not the budget.
    text = route_table({"fx": {"timeout": "2s", "retry": "NONE", "cache": {"ttl": "1h", "coalesce": "cluster"},
                               "upstreams": [{"name": "fx_primary", "url": upstream.url}]}},
                       cache={"backend": "redis", "url": cluster.url, "cluster": True, "prefix": redis_prefix,
                              "op_timeout": "1s"})
    a, b = await proxy_factory(text), await proxy_factory(text)
    errors = cache_errors(a) + cache_errors(b)
    answers = await asyncio.gather(a.get("/fx/latest/JPY"), b.get("/fx/latest/JPY"))
    assert sorted(r.status for r in answers) == [200, 200]
    assert (upstream.calls, errors) == (1, [])  # the other replica waited on the lock, then read the copy


async def test_the_outbox_stream_and_its_last_values_share_one_slot(cluster, redis_prefix):
    from proxy.fleet.connection import RedisTarget, open_client
    from proxy.watch.outbox import RedisOutbox

    client = open_client(RedisTarget(cluster.url, cluster=True), socket_timeout=2, connect_timeout=2)
    try:
        outbox = RedisOutbox(client, f"{redis_prefix}{{events}}", 100)
        assert await outbox.record_change("fx.USD", "/fx/latest/USD", "2026-12-04T00:00:00Z", b"1") is None
        event = await outbox.record_change("fx.USD", "/fx/latest/USD", "2026-12-04T00:00:01Z", b"2")
        assert event is not None and (event.before, event.after) == (1, 2)
        assert await outbox.length() == 1
    finally:
        await client.aclose()


async def test_a_purge_walks_each_master_to_the_end_of_its_scan(cluster, redis_prefix):
    from proxy.cache.redis_store import RedisStore
    from proxy.clock import FakeClock
    from proxy.fleet.connection import RedisTarget, open_client
    from tests.cache.test_cache_redis import make_entry

    clock = FakeClock(start_wall=__import__("time").time())
    store = RedisStore(RedisTarget(cluster.url, cluster=True), prefix=redis_prefix, clock=clock, scan_count=2,
                       op_timeout=1.0, connect=open_client)
    try:
        for n in range(40):
            await store.set(f"fx:{n:064x}", make_entry(clock))
        await store.set(f"fx:eu:{0:064x}", make_entry(clock))  # another service's key stays
        assert await store.purge("fx") == 40  # many SCAN pages per master, each followed to its end
        assert [k for p in cluster.ports for k in cluster.keys(p, f"{redis_prefix}*")] == [f"{redis_prefix}fx:eu:{0:064x}"]
    finally:
        await store.close()
