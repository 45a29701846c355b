"""The proxy on a Sentinel-watched master: shared copies, and a failover followed without a restart
(serving without the cache meanwhile, as with any Redis outage)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from proxy.clock import FakeClock
from tests.fakes import Fail, eventually, route_table
from tests.redis_servers import SentinelSet, Servers, cli, need_redis_tools, port_from_env, wait_for

need_redis_tools()


@pytest.fixture(scope="module")
def sentinel():
    with tempfile.TemporaryDirectory(prefix="rp-sentinel-") as directory:
        servers = Servers(Path(directory))
        running = SentinelSet(servers, port_from_env("REDIS_SENTINEL_DATA_PORT", 7111),
                              port_from_env("REDIS_SENTINEL_PORT", 26401))
        try:
            running.start()
            yield running
        finally:
            servers.stop_all()


@pytest.fixture(scope="module")
def guarded_sentinel():
    """A Sentinel of its own that wants a password (as Bitnami's chart sets up by default)."""
    with tempfile.TemporaryDirectory(prefix="rp-sentinel-auth-") as directory:
        servers = Servers(Path(directory))
        running = SentinelSet(servers, port_from_env("REDIS_SENTINEL_AUTH_DATA_PORT", 7121),
                              port_from_env("REDIS_SENTINEL_AUTH_PORT", 26411), sentinel_password=SENTINEL_SECRET)
        try:
            running.start()
            yield running
        finally:
            servers.stop_all()


SENTINEL_SECRET = "s3ntinel-only-s3cret"


def sentinel_table(upstream_url: str, sentinel: SentinelSet, prefix: str, service: str = "mymaster",
                   **extra: str) -> str:
    return route_table({"fx": {"timeout": "1s", "retry": "NONE", "cache": {"ttl": "1h"},
                               "upstreams": [{"name": "fx_primary", "url": upstream_url}]}},
                       cache={"backend": "redis", "prefix": prefix,
                              "sentinel": {"hosts": [f"127.0.0.1:{sentinel.sentinel_port}"], "service": service,
                                           "db": 0, "password": "${REDIS_PASSWORD:-}", **extra}})


async def test_replicas_share_copies_through_the_master_the_sentinel_names(sentinel, fake_upstream, proxy_factory,
                                                                          redis_prefix):
    upstream = await fake_upstream("primary")
    text = sentinel_table(upstream.url, sentinel, redis_prefix)
    a, b = await proxy_factory(text), await proxy_factory(text)
    assert (await a.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    assert (await b.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    assert upstream.calls == 1
    master = sentinel.master()
    assert len(cli(master, "--scan", "--pattern", f"{redis_prefix}fx:*").splitlines()) == 1  # on the master
    assert await eventually(lambda: a.process.fleet.listening, within=3.0)
    cache = await (await a.get("/health/integrations/cache")).json()
    assert cache["connected"] is True


async def test_a_rest_and_a_shared_breaker_reach_every_replica_through_the_sentinels_master(
        sentinel, fake_upstream, proxy_factory, redis_prefix):
    resting, failing, healthy = await fake_upstream("resting"), await fake_upstream("failing"), await fake_upstream("ok")
    resting.script(Fail(429, headers={"Retry-After": "30"}))
    failing.default = Fail(503)
    hosts = [f"127.0.0.1:{sentinel.sentinel_port}"]
    text = route_table({
        "fx": {"timeout": "1s", "retry": "NONE", "upstreams": [{"name": "fx_primary", "url": resting.url},
                                                               {"name": "fx_secondary", "url": healthy.url}]},
        "rates": {"timeout": "1s", "retry": "NONE", "breaker": {"profile": "FAST", "shared": True},
                  "upstreams": [{"name": "rates_primary", "url": failing.url},
                                {"name": "rates_secondary", "url": healthy.url}]}},
        cache={"backend": "redis", "prefix": redis_prefix, "sentinel": {"hosts": hosts, "service": "mymaster"}})
    a, b = await proxy_factory(text), await proxy_factory(text)
    assert await eventually(lambda: a.process.fleet.listening and b.process.fleet.listening, within=3.0)
    await a.get("/fx/latest/USD")
    for n in range(3):
        await a.get(f"/rates/{n}")
    assert await eventually(lambda: b.breaker("fx_primary").resting, within=3.0)
    assert await eventually(lambda: b.breaker("rates_primary").state.value == "OPEN", within=3.0)
    await b.get("/fx/latest/EUR")
    await b.get("/rates/other")
    assert (resting.calls, failing.calls) == (1, 3)  # the other replica sent neither anything


async def test_an_unknown_master_name_serves_without_the_cache(sentinel, fake_upstream, proxy_factory, redis_prefix):
    upstream = await fake_upstream("primary")
    proxy = await proxy_factory(sentinel_table(upstream.url, sentinel, redis_prefix, service="nosuchmaster"))
    for base in ("USD", "EUR"):
        reply = await proxy.get(f"/fx/latest/{base}")
        assert (reply.status, reply.headers["X-Cache"]) == (200, "MISS")
    assert upstream.calls == 2
    assert (await (await proxy.get("/health/integrations/cache")).json())["connected"] is False


async def test_sentinels_with_a_password_of_their_own_are_asked_with_sentinel_password(
        guarded_sentinel, fake_upstream, proxy_factory, redis_prefix, log_lines):
    upstream = await fake_upstream("primary")
    env = {"SENTINEL_PASSWORD": SENTINEL_SECRET}
    text = sentinel_table(upstream.url, guarded_sentinel, redis_prefix, sentinel_password="${SENTINEL_PASSWORD}")
    a, b = await proxy_factory(text, env=env), await proxy_factory(text, env=env)
    assert (await a.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    assert (await b.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    assert upstream.calls == 1
    assert len(cli(guarded_sentinel.master(), "--scan", "--pattern", f"{redis_prefix}fx:*").splitlines()) == 1

    # Without it the Sentinel refuses to name the master: served without the cache, and the cache says so.
    unasked = await proxy_factory(sentinel_table(upstream.url, guarded_sentinel, redis_prefix))
    reply = await unasked.get("/fx/latest/USD")
    assert (reply.status, reply.headers["X-Cache"]) == (200, "MISS")
    assert upstream.calls == 2
    assert (await (await unasked.get("/health/integrations/cache")).json())["connected"] is False
    assert SENTINEL_SECRET not in "".join(str(line) for line in log_lines())


async def test_a_failover_is_followed_without_a_restart(sentinel, fake_upstream, proxy_factory, redis_prefix):
    """Last in the module: it stops the master."""
    clock = FakeClock()
    upstream = await fake_upstream("primary")
    text = sentinel_table(upstream.url, sentinel, redis_prefix)
    a, b = await proxy_factory(text, clock=clock), await proxy_factory(text, clock=clock)
    assert (await a.get("/fx/before")).headers["X-Cache"] == "MISS"
    old_master = sentinel.master()
    promoted = sentinel.replica_port if old_master == sentinel.master_port else sentinel.master_port
    # The copy is written after the answer went out: wait until it reached the replica.
    wait_for(lambda: cli(promoted, "--scan", "--pattern", f"{redis_prefix}fx:*") != "", 5.0, "replication")

    sentinel.servers.stop(old_master)
    during = await a.get("/fx/during")  # no master: served without the cache, not failed
    assert (during.status, during.headers["X-Cache"]) == (200, "MISS")
    wait_for(lambda: sentinel.master() == promoted, 20.0, "the Sentinel to promote the replica")

    async def stored_after_failover() -> bool:
        clock.advance(10)  # past the store's backoff after a failure (and the local tier's second)
        reply = await a.get("/fx/after")
        return reply.status == 200 and a.process.runtime.store.connected

    assert await eventually(stored_after_failover, within=10.0, step=0.2)
    wait_for(lambda: len(cli(promoted, "--scan", "--pattern", f"{redis_prefix}fx:*").splitlines()) == 2, 5.0,
             "the new copy on the new master")
    calls = upstream.calls
    after = await b.get("/fx/after")
    assert (after.status, after.headers["X-Cache"]) == (200, "HIT")  # written to, and read from, the new master
    before = await b.get("/fx/before")
    assert (before.status, before.headers["X-Cache"]) == (200, "HIT")  # replicated before the master stopped
    assert upstream.calls == calls
    assert await eventually(lambda: a.process.fleet.listening, within=10.0)
