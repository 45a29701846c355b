"""Rests shared through Redis: one replica's Retry-After (or refused key) holds for every replica."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from proxy import signals
from proxy.clock import FakeClock
from proxy.fleet.rests import RestMessage, SharedRests
from tests.fakes import Fail, Ok, eventually, free_port, route_table, start_proxy, stop_proxy

ROOT = Path(__file__).resolve().parents[2]


def shared_table(primary: str, secondary: str, redis_url: str, prefix: str, **primary_settings: object) -> str:
    return route_table(
        {"fx": {"timeout": "1s", "retry": "NONE", "upstreams": [
            {"name": "fx_primary", "url": primary, **primary_settings}, {"name": "fx_secondary", "url": secondary}]}},
        cache={"backend": "redis", "url": redis_url, "prefix": prefix})


async def listening(proxy) -> None:
    assert await eventually(lambda: proxy.process.fleet.listening, within=3.0)


async def test_a_rest_one_replica_was_told_of_holds_on_the_other(fake_upstream, proxy_factory, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(429, headers={"Retry-After": "30"}))
    text = shared_table(primary.url, secondary.url, redis_url, redis_prefix)
    a, b = await proxy_factory(text), await proxy_factory(text)
    await listening(a)
    await listening(b)
    assert (await a.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    assert await eventually(lambda: b.breaker("fx_primary").resting, within=3.0)
    assert b.breaker("fx_primary").resting_until == pytest.approx(a.breaker("fx_primary").resting_until, abs=0.01)
    for _ in range(5):
        assert (await b.get("/fx/latest/EUR")).headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 1  # neither replica called inside the window
    circuits = await (await b.get("/health/integrations/circuits")).json()
    assert circuits["circuits"][0]["restingUntil"] is not None


async def test_a_replica_that_starts_during_a_rest_finds_it(fake_upstream, proxy_factory, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(503, headers={"Retry-After": "30"}))
    text = shared_table(primary.url, secondary.url, redis_url, redis_prefix)
    a = await proxy_factory(text)
    await a.get("/fx/latest/USD")
    assert a.breaker("fx_primary").resting
    await asyncio.sleep(0.1)  # the rest is written to Redis in a task of its own
    late = await proxy_factory(text)
    assert await eventually(lambda: late.breaker("fx_primary").resting, within=3.0)
    assert (await late.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 1


async def test_a_refused_key_rests_on_every_replica(fake_upstream, proxy_factory, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(429, headers={"Retry-After": "60"}))
    primary.default = Ok(body=b'{"from": "primary"}')
    text = shared_table(primary.url, secondary.url, redis_url, redis_prefix,
                        keys=["key-one-aaaa", "key-two-bbbb"], query={"apikey": "{key}"})
    a, b = await proxy_factory(text), await proxy_factory(text)
    await listening(b)
    assert (await a.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_primary"  # rotated to the second key
    ring = b.process.runtime.keyrings["fx_primary"]
    assert await eventually(lambda: ring.current()[1] == "key-two-bbbb", within=3.0)
    await b.get("/fx/latest/EUR")
    assert [s.path_qs.split("apikey=")[1] for s in primary.seen] == ["key-one-aaaa", "key-two-bbbb", "key-two-bbbb"]


async def test_two_real_processes_share_a_rest(fake_upstream, tmp_path, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(429, headers={"Retry-After": "2"}))
    primary.default = Ok(body=b'{"from": "primary"}')
    text = shared_table(primary.url, secondary.url, redis_url, redis_prefix)
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path), "--listen",
                              f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{free_port()}"],
                             cwd=ROOT, env={**os.environ, "LOG_LEVEL": "warning"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    here = await start_proxy(text)
    try:
        import aiohttp

        async def other_ready() -> bool:
            try:
                async with here.client.get(f"http://127.0.0.1:{port}/health/ready") as reply:
                    return reply.status == 200
            except aiohttp.ClientError:
                return False

        assert await eventually(other_ready, within=15.0, step=0.1)
        await listening(here)
        async with here.client.get(f"http://127.0.0.1:{port}/fx/latest/USD") as reply:
            assert reply.headers["X-Upstream"] == "fx_secondary"  # the other process was told 429, Retry-After: 2
        assert await eventually(lambda: here.breaker("fx_primary").resting, within=3.0)
        assert (await here.get("/fx/latest/EUR")).headers["X-Upstream"] == "fx_secondary"
        assert primary.calls == 1
        await eventually(lambda: not here.breaker("fx_primary").resting, within=3.0)
        assert (await here.get("/fx/latest/EUR")).headers["X-Upstream"] == "fx_primary"  # over: tried again
    finally:
        await stop_proxy(here)
        other.terminate()
        other.wait(10)


# --- what comes out of Redis is checked before it is believed ---------------------------------------

class _Runtime:
    def __init__(self, breakers: dict, keyrings: dict | None = None) -> None:
        self.breakers = breakers
        self.keyrings = keyrings or {}

    def upstream(self, name: str):
        return object() if name in self.breakers else None


@pytest.mark.parametrize("data", [
    b"not json", b"{}", pickle.dumps({"kind": "rest", "upstream": "fx_primary", "until": 1e12, "source": "x"}),
    msgspec.json.encode({"kind": "rest", "upstream": "fx_primary", "until": 1e12, "source": "x", "extra": 1}),
    msgspec.json.encode({"kind": "rest", "upstream": "other_service", "until": 1e12, "source": "x"}),
    msgspec.json.encode({"kind": "rest", "upstream": "fx_primary", "until": "soon", "source": "x"}),
    b'{"kind": "rest", "upstream": "fx_primary", "until": NaN, "source": "x"}',
    msgspec.json.encode({"kind": "rest", "upstream": "fx_primary", "until": 1.0, "source": "x"}),  # long past
    msgspec.json.encode({"kind": "reboot", "upstream": "fx_primary", "until": 1e12, "source": "x"}),
    b'{"kind": "rest", "upstream": "' + b"x" * 2000 + b'", "until": 1e12, "source": "x"}',
    "a str, not bytes",
])
def test_a_message_that_is_not_a_rest_for_this_table_changes_nothing(data):
    from proxy.resilience.breaker import Breaker
    from proxy.resilience.breaker_policy import PROFILES

    clock = FakeClock()
    breaker = Breaker("fx", "fx_primary", PROFILES["STANDARD"], clock)
    fleet = SharedRests("redis://127.0.0.1:1/0", "rp:", runtime=lambda: _Runtime({"fx_primary": breaker}), clock=clock)
    assert fleet.apply(data) is False
    assert not breaker.resting


def test_a_replica_ignores_its_own_messages_and_caps_what_it_applies():
    from proxy.resilience.breaker import Breaker
    from proxy.resilience.breaker_policy import PROFILES

    clock = FakeClock()
    seen: list = []
    breaker = Breaker("fx", "fx_primary", PROFILES["STANDARD"], clock, seen.append)
    fleet = SharedRests("redis://127.0.0.1:1/0", "rp:", runtime=lambda: _Runtime({"fx_primary": breaker}), clock=clock)
    own = msgspec.json.encode(RestMessage("rest", "fx_primary", clock.time() + 30, fleet.source))
    assert fleet.apply(own) is False
    far = msgspec.json.encode(RestMessage("rest", "fx_primary", clock.time() + 10 * 86400, "another"))
    assert fleet.apply(far) is True
    assert breaker.resting_until == pytest.approx(clock.time() + 3600)  # the local max_rest caps it
    assert [e.shared for e in seen if isinstance(e, signals.UpstreamRested)] == [True]


async def test_with_redis_down_the_rest_holds_on_the_replica_that_was_told(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(429, headers={"Retry-After": "30"}))
    proxy = await proxy_factory(shared_table(primary.url, secondary.url, f"redis://127.0.0.1:{free_port()}/0", "rp:"))
    seen: list = []
    proxy.process.bus.subscribe(seen.append)
    for _ in range(3):
        assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 1
    assert await eventually(lambda: any(isinstance(e, signals.CacheError) and e.operation == "rest_publish"
                                        for e in seen), within=3.0)


async def test_a_reload_onto_a_shared_redis_joins_the_fleet_and_a_reload_off_it_leaves(
        fake_upstream, proxy_factory, tmp_path, redis_url, redis_prefix):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(429, headers={"Retry-After": "30"}))
    path = tmp_path / "routes.yaml"
    alone = route_table({"fx": {"timeout": "1s", "retry": "NONE", "upstreams": [
        {"name": "fx_primary", "url": primary.url}, {"name": "fx_secondary", "url": secondary.url}]}})
    shared = shared_table(primary.url, secondary.url, redis_url, redis_prefix, breaker={"shared": True})
    path.write_text(alone)
    a = await start_proxy(alone, filename=str(path))
    try:
        assert a.process.fleet is None
        b = await proxy_factory(shared)
        await listening(b)
        path.write_text(shared)
        assert await a.process.reload("test") == []
        await listening(a)  # joined without a restart
        joined = a.process.fleet
        assert (await (await a.get("/health")).json())["fleet"] == {"sharedBreakers": 1, "breakers": "fleet",
                                                                    "redis": "single"}
        assert (await b.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"  # B is told to rest
        assert await eventually(lambda: a.breaker("fx_primary").resting, within=3.0)  # and A hears it
        assert (await a.get("/fx/latest/EUR")).headers["X-Upstream"] == "fx_secondary"
        assert primary.calls == 1

        path.write_text(alone)
        assert await a.process.reload("test") == []
        assert a.process.fleet is None and not joined.listening  # left: its link is closed
        assert "fleet" not in (await (await a.get("/health")).json())
    finally:
        await stop_proxy(a)
