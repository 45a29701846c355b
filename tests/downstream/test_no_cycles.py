"""No request leaves reference cycles behind.

The process runs with a gen-0 threshold of 20,000 (`proxy.ops.cli`): whatever a request leaves in
a cycle piles up until one collection frees it all at once. A failed call once left ~60 objects
per request (its traceback held the coalescer's frame, whose future held the exception): every
2 s of an outage at 200 req/s a 10-40 ms pause hit every caller waiting (bench all_down_cold_cache,
p99 13 ms against nginx's 2 ms). Each path below runs with the collector off; what is then only
collectable as a cycle, and belongs to the proxy, must be nothing.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from typing import Any

import pytest

from tests.fakes import Delay, Fail, Ok, refused_port, route_table

pytestmark = pytest.mark.http_pieces("front", "client")  # over ours and aiohttp's (docs/http-pieces.md)

ROUNDS = 12


def _ours(thing: Any) -> str | None:
    """The name of a proxy object or frame in the garbage (the demo's fake servers aside), else None."""
    if type(thing).__name__ == "frame":
        where = thing.f_code.co_filename
        if "/proxy/" in where and "/proxy/demo/" not in where:
            return f"frame {where.rsplit('/proxy/', 1)[1]}:{thing.f_code.co_name}"
        return None
    module = type(thing).__module__ or ""
    if module.startswith("proxy.") and not module.startswith("proxy.demo"):
        return f"{module}.{type(thing).__qualname__}"
    return None


async def cyclic_garbage(send, rounds: int = ROUNDS) -> Counter[str]:
    """What of the proxy's only the collector frees after `send()` ran `rounds` times, by kind."""
    await send(0)  # first: lazily made things (pools, memo entries) are not garbage
    gc.collect()
    gc.disable()
    try:
        for round_ in range(1, rounds + 1):
            await send(round_)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = Counter(name for name in map(_ours, gc.garbage) if name is not None)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return found


def table(**services: dict[str, Any]) -> str:
    return route_table({name: {"timeout": "2s", **settings} for name, settings in services.items()})


async def test_answers_of_every_kind_leave_no_cycles(fake_upstream, proxy_factory):
    good = await fake_upstream("good")
    failing = await fake_upstream("failing")
    failing.default = Fail(503)
    resting = await fake_upstream("resting")
    resting.default = Fail(429, headers={"Retry-After": "1"})
    never_open = {"fail_threshold": 100000, "failure_rate": "off"}
    proxy = await proxy_factory(table(
        passing={"upstreams": [{"name": "p1", "url": good.url}]},
        cached={"upstreams": [{"name": "c1", "url": good.url}], "cache": {"ttl": "1h"}},
        fallback={"retry": "NONE", "breaker": never_open, "cache": {"ttl": "1h"},
                  "upstreams": [{"name": "f1", "url": failing.url}, {"name": "f2", "url": good.url}]},
        failed={"retry": "NONE", "breaker": never_open, "cache": {"ttl": "1h"},
                "upstreams": [{"name": "x1", "url": failing.url}]},
        rested={"retry": "NONE", "breaker": {"max_rest": 0},
                "upstreams": [{"name": "r1", "url": resting.url}, {"name": "r2", "url": good.url}]},
        down={"cache": {"ttl": "1h"}, "upstreams": [{"name": "d1", "url": f"http://127.0.0.1:{refused_port()}"},
                                                    {"name": "d2", "url": f"http://127.0.0.1:{refused_port()}"}]},
    ))

    def expect(path: str, status: int, upstream_calls: Any = None):
        async def send(round_: int) -> None:
            before = upstream_calls.calls if upstream_calls is not None else 0
            async with await proxy.get(f"{path}/{round_}") as reply:
                await reply.read()
                assert reply.status == status, (path, reply.status)
            if upstream_calls is not None:
                assert upstream_calls.calls == before + 1  # the path under test did reach that upstream
        return send

    async def post(round_: int) -> None:
        async with await proxy.request("POST", f"/passing/{round_}", data=b'{"n": 1}') as reply:
            await reply.read()
            assert reply.status == 200

    async def hit(round_: int) -> None:
        async with await proxy.get("/cached/same") as reply:
            await reply.read()
            assert reply.headers["X-Cache"] == ("MISS" if round_ == 0 else "HIT")

    async with await proxy.get("/down/first") as reply:  # both refuse: their breakers open at once
        assert reply.status == 502
    paths = {
        "pass-through": expect("/passing", 200, good),
        "POST": post,
        "HIT": hit,
        "503 then the next upstream": expect("/fallback", 200, failing),
        "every upstream failed (502)": expect("/failed", 502, failing),
        "429 then the next upstream": expect("/rested", 200, resting),
        "all breakers open (503)": expect("/down", 503),
    }
    left = {name: dict(await cyclic_garbage(send)) for name, send in paths.items()}
    assert left == {name: {} for name in paths}
    assert proxy.breaker("d1").state.name == "OPEN" and proxy.breaker("x1").state.name == "CLOSED"


async def test_a_closed_connection_leaves_no_cycle(fake_upstream, proxy_factory):
    """Each caller on a new connection (no keep-alive): the connection and its parser must not
    hold each other once it is closed."""
    import aiohttp

    good = await fake_upstream("good")
    proxy = await proxy_factory(table(passing={"upstreams": [{"name": "p1", "url": good.url}]}))

    async def one_connection(round_: int) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async with session.get(f"{proxy.url}/passing/{round_}") as reply:
                assert reply.status == 200 and await reply.read()

    assert dict(await cyclic_garbage(one_connection)) == {}
    assert good.calls == ROUNDS + 1


async def test_stale_hedged_and_retried_answers_leave_no_cycles(fake_upstream, proxy_factory, clock):
    """The paths with tasks of their own: a refresh behind a stale copy, a hedge and its cancelled
    loser, a retry after its backoff."""
    good = await fake_upstream("good")
    failing = await fake_upstream("failing")
    failing.default = Fail(503)
    late = await fake_upstream("late")
    late.default = Delay(0.06)
    flaky = await fake_upstream("flaky")
    never_open = {"fail_threshold": 100000, "failure_rate": "off"}
    cache = {"ttl": "1s", "stale": "1h", "stale_if_slow": "20ms"}
    proxy = await proxy_factory(table(
        broken={"retry": "NONE", "breaker": never_open, "cache": cache,
                "upstreams": [{"name": "b1", "url": failing.url}]},
        slow={"retry": "NONE", "breaker": never_open, "cache": cache, "upstreams": [{"name": "s1", "url": late.url}]},
        hedged={"retry": "NONE", "hedge_after": "20ms", "breaker": never_open,
                "upstreams": [{"name": "h1", "url": late.url}, {"name": "h2", "url": good.url}]},
        retried={"retry": {"policy": "DEFAULT", "base_delay": "1ms"}, "breaker": never_open,
                 "upstreams": [{"name": "t1", "url": flaky.url}]},
    ), clock=clock)
    for path, upstream in (("/broken/same", failing), ("/slow/same", late)):  # a copy from before it went bad
        upstream.script(Ok())
        async with await proxy.get(path) as reply:
            assert reply.status == 200 and reply.headers["X-Cache"] == "MISS"

    def stale(path: str, upstream: Any, detail: str):
        async def send(round_: int) -> None:
            clock.advance(2)  # the copy is past its ttl: every request refreshes it
            before = upstream.calls
            async with await proxy.get(path) as reply:
                await reply.read()
                assert (reply.status, reply.headers["X-Cache"]) == (200, "STALE")
                assert reply.headers["Cache-Status"].endswith(detail)
            assert upstream.calls == before + 1  # the refresh went out
            if detail == "slow":
                await asyncio.sleep(0.08)  # it lands after the answer, before the next round
        return send

    async def hedged(round_: int) -> None:
        async with await proxy.get(f"/hedged/{round_}") as reply:
            assert reply.status == 200 and await reply.read() == b'{"from": "good"}'

    async def retried(round_: int) -> None:
        flaky.script(Fail(503))
        async with await proxy.get(f"/retried/{round_}") as reply:
            assert reply.status == 200
        assert [s.path_qs for s in flaky.seen[-2:]] == [f"/{round_}"] * 2  # one failure, one retry

    paths = {"stale copy, failed refresh": stale("/broken/same", failing, "all_upstreams_failed"),
             "stale copy, slow refresh": stale("/slow/same", late, "slow"),
             "hedged": hedged, "retried": retried}
    left = {}
    for name, send in paths.items():
        left[name] = dict(await cyclic_garbage(send, rounds=4))  # what one request leaves, four times over
        await asyncio.sleep(0.08)  # the late answers the hedges left running land
    assert left == {name: {} for name in paths}
