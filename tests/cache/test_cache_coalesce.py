"""Coalescer: identical requests in flight make one call and all get its outcome together."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

from proxy.cache.coalesce import CoalescedCallCancelled, Coalescer


class Ticks:
    """Counts event-loop iterations, so "at the same moment" can be checked without timing."""

    def __init__(self) -> None:
        self.now = 0
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "Ticks":
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            self.now += 1
            await asyncio.sleep(0)


def counting(result=None, *, exc: BaseException | None = None, delay: float = 0.05):
    calls = []

    async def fn():
        calls.append(1)
        await asyncio.sleep(delay)
        if exc is not None:
            raise exc
        return result

    return fn, calls


async def test_concurrent_calls_with_one_key_make_one_call_and_share_its_result():
    coalescer = Coalescer()
    fn, calls = counting({"rate": 1.1})
    results = await asyncio.gather(*(coalescer.run("k", fn) for _ in range(200)))
    assert len(calls) == 1
    assert all(result == {"rate": 1.1} for result, _ in results)
    assert sum(shared for _, shared in results) == 199
    assert [shared for _, shared in results][0] is False  # the first caller led


async def test_every_waiter_gets_the_result_in_the_same_loop_iteration():
    coalescer = Coalescer()
    fn, calls = counting("ok", delay=0.05)
    done_at: list[int] = []
    async with Ticks() as ticks:
        async def one():
            await coalescer.run("k", fn)
            done_at.append(ticks.now)

        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(one() for _ in range(200)))
        elapsed = asyncio.get_running_loop().time() - started
    assert len(calls) == 1
    assert len(done_at) == 200
    assert max(done_at) - min(done_at) <= 2  # followers were not run one after another
    assert elapsed < 0.5


async def test_an_exception_reaches_every_waiter_and_the_call_is_made_once():
    coalescer = Coalescer()
    fn, calls = counting(exc=ConnectionResetError("upstream reset"))
    results = await asyncio.gather(*(coalescer.run("k", fn) for _ in range(200)), return_exceptions=True)
    assert len(calls) == 1
    assert all(isinstance(r, ConnectionResetError) and str(r) == "upstream reset" for r in results)


async def test_different_keys_do_not_wait_for_each_other():
    coalescer = Coalescer()
    fn, calls = counting("x")
    results = await asyncio.gather(coalescer.run("a", fn), coalescer.run("b", fn))
    assert len(calls) == 2
    assert [shared for _, shared in results] == [False, False]


async def test_in_flight_counts_keys_and_a_settled_key_is_freed():
    coalescer = Coalescer()
    release = asyncio.Event()

    async def fn():
        await release.wait()
        return 1

    tasks = [asyncio.create_task(coalescer.run(k, fn)) for k in ("a", "a", "b")]
    await asyncio.sleep(0)
    assert coalescer.in_flight == 2
    release.set()
    await asyncio.gather(*tasks)
    assert coalescer.in_flight == 0


async def test_the_next_call_after_settle_runs_fn_again():
    coalescer = Coalescer()
    fn, calls = counting("x", delay=0)
    assert await coalescer.run("k", fn) == ("x", False)
    assert await coalescer.run("k", fn) == ("x", False)
    assert len(calls) == 2


async def test_the_next_call_after_a_failure_runs_fn_again():
    coalescer = Coalescer()
    fn, calls = counting(exc=ValueError("bad"), delay=0)
    for _ in range(2):
        with pytest.raises(ValueError):
            await coalescer.run("k", fn)
    assert len(calls) == 2
    assert coalescer.in_flight == 0


async def test_a_cancelled_waiter_does_not_cancel_the_call_or_the_other_waiters():
    coalescer = Coalescer()
    fn, calls = counting("ok", delay=0.05)
    leader = asyncio.create_task(coalescer.run("k", fn))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(coalescer.run("k", fn)) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    assert await leader == ("ok", False)
    assert await waiters[1] == ("ok", True) and await waiters[2] == ("ok", True)
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]
    assert len(calls) == 1


async def test_a_cancelled_leader_gives_waiters_a_coalesced_call_cancelled_and_frees_the_key():
    coalescer = Coalescer()
    fn, calls = counting("ok", delay=10)
    leader = asyncio.create_task(coalescer.run("k", fn))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(coalescer.run("k", fn)) for _ in range(3)]
    await asyncio.sleep(0)
    leader.cancel()
    results = await asyncio.gather(leader, *waiters, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(isinstance(r, CoalescedCallCancelled) for r in results[1:])
    assert coalescer.in_flight == 0
    fast, _ = counting("again", delay=0)
    assert await coalescer.run("k", fast) == ("again", False)


async def test_a_failed_call_with_no_waiters_logs_no_unretrieved_future(caplog):
    coalescer = Coalescer()
    fn, _ = counting(exc=RuntimeError("alone"), delay=0)
    with pytest.raises(RuntimeError):
        await coalescer.run("k", fn)
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text
