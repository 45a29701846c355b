"""The bench's fake providers: each fault is what docs/benchmarks.md says, the same for every proxy."""

from __future__ import annotations

import aiohttp

from bench.servers import FakeProvider, PreciseTimer, ProviderServer


async def test_fail30_fails_calls_1_4_and_7_of_every_10_counted_from_the_switch():
    timer = PreciseTimer()
    server = ProviderServer(FakeProvider("p", timer), name="p")
    await server.start(0)
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as session:
            async def statuses(count: int) -> list[int]:
                out = []
                for i in range(count):
                    async with session.get(f"{base}/item/{i}") as reply:
                        out.append(reply.status)
                return out

            assert await statuses(5) == [200] * 5  # "ok" (a warm-up) moves nothing the fault counts from
            async with session.post(f"{base}/__bench/mode/fail30") as reply:
                assert reply.status == 200
            failing = [i + 1 for i, status in enumerate(await statuses(20)) if status == 503]
            assert failing == [1, 4, 7, 11, 14, 17]
            async with session.post(f"{base}/__bench/mode/fail30") as reply:  # a new round starts over
                assert reply.status == 200
            assert [i + 1 for i, status in enumerate(await statuses(7)) if status == 503] == [1, 4, 7]
            async with session.get(f"{base}/__bench/calls") as reply:
                assert (await reply.json())["calls"] == 32  # every call counted, for the report
    finally:
        await server.stop()
        timer.close()
