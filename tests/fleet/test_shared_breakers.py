"""Breakers shared by the fleet (`breaker: {shared: true}`): one replica opens, every replica skips;
one probe per open_timeout across the fleet; an operator's reset or open acts on all; with Redis
out of reach each replica falls back to its own breaker and says so."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import structlog

from proxy import signals
from proxy.clock import FakeClock
from proxy.fleet.breakers import BreakerMessage, SharedBreakers
from proxy.fleet.link import FleetLink
from proxy.resilience.breaker import Breaker, State
from proxy.resilience.breaker_policy import PROFILES
from tests.fakes import Fail, eventually, route_table


def shared_table(primary: str, secondary: str, redis_url: str, prefix: str, shared: bool = True) -> str:
    return route_table(
        {"fx": {"timeout": "1s", "retry": "NONE", "hedge_after": "off",
                "breaker": {"profile": "FAST", "shared": shared},
                "upstreams": [{"name": "fx_primary", "url": primary}, {"name": "fx_secondary", "url": secondary}]}},
        cache={"backend": "redis", "url": redis_url, "prefix": prefix})


async def fleet_of(proxy_factory, text: str, count: int, clock=None) -> list:
    replicas = [await proxy_factory(text, **({"clock": clock} if clock else {})) for _ in range(count)]
    for replica in replicas:
        assert await eventually(lambda: replica.process.fleet_breakers.connected, within=3.0)
    return replicas


def states(replicas) -> list[str]:
    return [r.breaker("fx_primary").state.value for r in replicas]


async def trip(replica, failing, count: int = 3) -> None:
    for n in range(count):
        assert (await replica.get(f"/fx/trip/{n}")).headers["X-Upstream"] == "fx_secondary"
    assert replica.breaker("fx_primary").state is State.OPEN
    assert failing.calls >= count


async def test_a_breaker_one_replica_opens_is_skipped_by_every_other(fake_upstream, proxy_factory, redis_url,
                                                                    redis_prefix):
    primary, secondary = await fake_upstream("primary"), await fake_upstream("secondary")
    primary.default = Fail(503)
    a, b, c = await fleet_of(proxy_factory, shared_table(primary.url, secondary.url, redis_url, redis_prefix), 3)
    await trip(a, primary)
    assert primary.calls == 3
    assert await eventually(lambda: states([b, c]) == ["OPEN", "OPEN"], within=3.0)
    assert b.breaker("fx_primary").retry_at == pytest.approx(a.breaker("fx_primary").retry_at, abs=0.01)
    for replica in (b, c):
        for n in range(5):
            reply = await replica.get(f"/fx/other/{n}")
            assert (reply.status, reply.headers["X-Upstream"]) == (200, "fx_secondary")
    assert primary.calls == 3  # the others sent it nothing
    circuits = await (await b.get("/health/integrations/circuits")).json()
    primary_circuit = circuits["circuits"][0]
    assert (primary_circuit["state"], primary_circuit["shared"]) == ("OPEN", "fleet")
    assert (await (await b.get("/health")).json())["fleet"] == {"sharedBreakers": 2, "breakers": "fleet",
                                                                "redis": "single"}


async def test_a_breaker_not_shared_stays_with_its_replica(fake_upstream, proxy_factory, redis_url, redis_prefix):
    primary, secondary = await fake_upstream("primary"), await fake_upstream("secondary")
    primary.default = Fail(503)
    text = shared_table(primary.url, secondary.url, redis_url, redis_prefix, shared=False)
    a, b = await proxy_factory(text), await proxy_factory(text)
    await trip(a, primary)
    await asyncio.sleep(0.2)  # what a shared breaker would have been told by now
    assert states([b]) == ["CLOSED"]
    await b.get("/fx/other")
    assert primary.calls == 4
    assert "fleet" not in await (await b.get("/health")).json()


async def test_one_replica_of_three_probes_per_open_timeout(fake_upstream, proxy_factory, redis_url, redis_prefix):
    clock = FakeClock()
    primary, secondary = await fake_upstream("primary"), await fake_upstream("secondary")
    primary.default = Fail(503)
    replicas = await fleet_of(proxy_factory, shared_table(primary.url, secondary.url, redis_url, redis_prefix), 3,
                              clock=clock)
    await trip(replicas[0], primary)
    assert await eventually(lambda: states(replicas) == ["OPEN"] * 3, within=3.0)
    for round_ in range(1, 4):
        calls = primary.calls
        assert (await replicas[1].get("/fx/early")).headers["X-Upstream"] == "fx_secondary"
        assert primary.calls == calls  # before open_timeout nobody probes
        clock.advance(30)  # FAST: open 30 s
        # Every replica is asked at once, twice: exactly one probe reaches the upstream.
        replies = await asyncio.gather(*(r.get(f"/fx/round{round_}/{n}") for r in replicas for n in range(2)))
        assert all(reply.headers["X-Upstream"] == "fx_secondary" for reply in replies)
        assert primary.calls == calls + 1, f"round {round_}"
        # The probe failed: every replica holds the breaker open for another open_timeout.
        assert await eventually(lambda: states(replicas) == ["OPEN"] * 3, within=3.0)
        retry_ats = {round(r.breaker("fx_primary").retry_at, 2) for r in replicas}
        assert await eventually(lambda: len({round(r.breaker("fx_primary").retry_at, 2) for r in replicas}) == 1,
                                within=3.0), retry_ats

    primary.default = secondary.default  # the vendor is back: the next probe closes every breaker
    clock.advance(30)
    await asyncio.gather(*(r.get("/fx/back") for r in replicas))
    assert await eventually(lambda: states(replicas) == ["CLOSED"] * 3, within=3.0)
    assert (await replicas[2].get("/fx/after")).headers["X-Upstream"] == "fx_primary"


async def test_an_operators_reset_or_open_on_one_replica_acts_on_all(fake_upstream, proxy_factory, redis_url,
                                                                    redis_prefix):
    primary, secondary = await fake_upstream("primary"), await fake_upstream("secondary")
    primary.default = Fail(503)
    a, b, c = await fleet_of(proxy_factory, shared_table(primary.url, secondary.url, redis_url, redis_prefix), 3)
    await trip(a, primary)
    assert await eventually(lambda: states([b, c]) == ["OPEN", "OPEN"], within=3.0)

    reset = await c.request("POST", "/health/integrations/circuits/fx_primary/reset")
    assert (reset.status, (await reset.json())["shared"], (await reset.json())["state"]) == (200, "fleet", "CLOSED")
    assert await eventually(lambda: states([a, b, c]) == ["CLOSED"] * 3, within=3.0)

    primary.default = secondary.default
    forced = await b.request("POST", "/health/integrations/circuits/fx_primary/open")
    assert (forced.status, (await forced.json())["shared"]) == (200, "fleet")
    assert await eventually(lambda: all(r.breaker("fx_primary").forced for r in (a, b, c)), within=3.0)
    calls = primary.calls
    for replica in (a, c):
        assert (await replica.get("/fx/maintenance")).headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == calls
    assert a.breaker("fx_primary").retry_at is None  # forced: until reset, not until a retry time

    await a.request("POST", "/health/integrations/circuits/fx_primary/reset")
    assert await eventually(lambda: states([a, b, c]) == ["CLOSED"] * 3, within=3.0)


async def test_a_replica_that_starts_while_a_breaker_is_open_finds_it(fake_upstream, proxy_factory, redis_url,
                                                                     redis_prefix):
    primary, secondary = await fake_upstream("primary"), await fake_upstream("secondary")
    primary.default = Fail(503)
    text = shared_table(primary.url, secondary.url, redis_url, redis_prefix)
    [a] = await fleet_of(proxy_factory, text, 1)
    await trip(a, primary)
    await asyncio.sleep(0.1)  # written in a task of its own
    [late] = await fleet_of(proxy_factory, text, 1)
    assert await eventually(lambda: states([late]) == ["OPEN"], within=3.0)
    await late.get("/fx/late")
    assert primary.calls == 3


async def test_with_redis_unreachable_each_replica_keeps_its_own_breaker_and_says_so(
        fake_upstream, proxy_factory, throwaway_redis, redis_prefix):
    primary, secondary = await fake_upstream("primary"), await fake_upstream("secondary")
    primary.default = Fail(503)
    text = shared_table(primary.url, secondary.url, throwaway_redis.url, redis_prefix)
    a, b = await fleet_of(proxy_factory, text, 2)
    told: list = []
    a.process.bus.subscribe(lambda e: told.append(e) if type(e) is signals.FleetLinkChanged else None)

    throwaway_redis.stop()
    assert await eventually(lambda: not a.process.fleet_breakers.connected and not b.process.fleet_breakers.connected,
                            within=5.0)
    assert [(e.connected, e.shared_breakers) for e in told] == [(False, 2)]
    health = await (await a.get("/health")).json()
    assert health["fleet"]["breakers"] == "local"
    circuits = await (await a.get("/health/integrations/circuits")).json()
    assert circuits["circuits"][0]["shared"] == "local"

    await trip(a, primary)  # each replica pays its own failures, as without `shared`
    assert states([b]) == ["CLOSED"]
    await trip(b, primary)
    assert primary.calls == 6
    reset = await a.request("POST", "/health/integrations/circuits/fx_primary/reset")
    assert (await reset.json())["shared"] == "local"  # done here; the others could not be told
    assert states([a, b]) == ["CLOSED", "OPEN"]

    throwaway_redis.start()
    assert await eventually(lambda: a.process.fleet_breakers.connected, within=15.0, step=0.1)
    assert told[-1].connected is True


def test_the_fleet_link_going_down_is_logged_once_with_what_it_means():
    from proxy.observability.logs import EventLog

    with structlog.testing.capture_logs() as lines:
        EventLog()(signals.FleetLinkChanged(False, 2, "ConnectionError: refused"))
    assert len(lines) == 1
    assert lines[0]["log_level"] == "error" and lines[0]["kind"] == "fleet"
    assert "each replica uses its local breakers (2 set shared)" in lines[0]["event"]


# --- the pure part: a breaker following the fleet --------------------------------------------

def recording_breaker(shared: bool = True) -> tuple[Breaker, FakeClock, list]:
    from dataclasses import replace

    clock = FakeClock()
    events: list = []
    return Breaker("fx", "fx_primary", replace(PROFILES["FAST"], shared=shared), clock, events.append), clock, events


def test_a_followed_open_lasts_until_the_fleets_retry_time_then_turns_half_open():
    breaker, clock, events = recording_breaker()
    breaker.follow_open(clock.time() + 12)
    assert breaker.state is State.OPEN and breaker.retry_at == clock.time() + 12
    assert breaker.allow() is None
    assert [(e.new, e.reason) for e in events] == [("OPEN", "fleet")]
    breaker.follow_open(clock.time() + 12)  # heard twice (published, then caught up): one transition
    assert len(events) == 1
    clock.advance(12)
    permit = breaker.allow()
    assert permit is not None and permit.probe
    permit.failure(0.1)
    assert breaker.retry_at == pytest.approx(clock.time() + 30)  # its own timeout again after its own probe


def test_a_followed_forced_open_holds_until_the_fleet_closes_it():
    breaker, clock, events = recording_breaker()
    breaker.follow_open(None)
    clock.advance(10_000)
    assert breaker.state is State.OPEN and breaker.forced and breaker.retry_at is None
    breaker.follow_close()
    assert breaker.state is State.CLOSED and not breaker.forced
    breaker.follow_close()
    assert [(e.new, e.reason) for e in events] == [("OPEN", "fleet"), ("CLOSED", "fleet")]


def test_a_retry_time_already_past_lets_a_probe_through_at_once():
    breaker, clock, _ = recording_breaker()
    breaker.follow_open(clock.time() - 5)
    permit = breaker.allow()
    assert permit is not None and permit.probe


class _Runtime:
    def __init__(self, breakers: dict) -> None:
        self.breakers = breakers


@pytest.mark.parametrize("data", [
    b"not json", b"{}", "a str, not bytes", b"x" * 5000,
    msgspec.json.encode({"kind": "open", "upstream": "fx_primary", "source": "x", "retry_at": 1e12, "extra": 1}),
    msgspec.json.encode({"kind": "open", "upstream": "fx_secondary", "source": "x", "retry_at": 1e12}),
    msgspec.json.encode({"kind": "open", "upstream": "fx_primary", "source": "x", "retry_at": "soon"}),
    b'{"kind": "open", "upstream": "fx_primary", "source": "x", "retry_at": NaN}',
    msgspec.json.encode({"kind": "explode", "upstream": "fx_primary", "source": "x"}),
])
def test_a_message_that_is_not_a_decision_for_a_shared_breaker_here_changes_nothing(data):
    breaker, clock, events = recording_breaker()
    unshared, _, _ = recording_breaker(shared=False)
    unshared.provider = "fx_secondary"
    link = FleetLink("redis://127.0.0.1:1/0")
    fleet = SharedBreakers(link, "rp:", runtime=lambda: _Runtime({"fx_primary": breaker, "fx_secondary": unshared}),
                           clock=clock)
    assert fleet.apply(data) is False
    assert breaker.state is State.CLOSED and unshared.state is State.CLOSED and events == []


def test_a_decision_of_its_own_is_not_followed_twice():
    breaker, clock, events = recording_breaker()
    fleet = SharedBreakers(FleetLink("redis://127.0.0.1:1/0"), "rp:", runtime=lambda: _Runtime({"fx_primary": breaker}),
                           clock=clock)
    own = msgspec.json.encode(BreakerMessage("open", "fx_primary", fleet.source, clock.time() + 30))
    assert fleet.apply(own) is False
    other = msgspec.json.encode(BreakerMessage("open", "fx_primary", "another", clock.time() + 30))
    assert fleet.apply(other) is True and breaker.state is State.OPEN


async def test_a_breaker_opened_in_another_process_is_followed_here(fake_upstream, tmp_path, redis_url, redis_prefix):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import aiohttp

    from tests.fakes import free_port, start_proxy, stop_proxy

    primary, secondary = await fake_upstream("primary"), await fake_upstream("secondary")
    primary.default = Fail(503)
    text = shared_table(primary.url, secondary.url, redis_url, redis_prefix)
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path), "--listen",
                              f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{free_port()}"],
                             cwd=Path(__file__).resolve().parents[2], env={**os.environ, "LOG_LEVEL": "warning"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    here = await start_proxy(text)
    try:
        async def other_ready() -> bool:
            try:
                async with here.client.get(f"http://127.0.0.1:{port}/health") as reply:
                    return reply.status == 200 and (await reply.json()).get("fleet", {}).get("breakers") == "fleet"
            except aiohttp.ClientError:
                return False

        assert await eventually(other_ready, within=15.0, step=0.1)
        for n in range(3):  # the other process trips its breaker
            async with here.client.get(f"http://127.0.0.1:{port}/fx/trip/{n}") as reply:
                assert reply.headers["X-Upstream"] == "fx_secondary"
        assert await eventually(lambda: states([here]) == ["OPEN"], within=3.0)
        assert (await here.get("/fx/here")).headers["X-Upstream"] == "fx_secondary"
        assert primary.calls == 3
    finally:
        await stop_proxy(here)
        other.terminate()
        other.wait(10)
