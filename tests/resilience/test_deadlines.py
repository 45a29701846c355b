"""Deadlines: asyncio.timeout's behaviour with one shared timer, on a clock the tests step."""

from __future__ import annotations

import asyncio
from typing import Callable

import pytest

from proxy.resilience.deadlines import Deadlines


class Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SteppedLoop:
    """What Deadlines uses of a loop (time, call_at), with time stepped by the test."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        self.timers.append(timer)
        return timer

    def armed(self) -> list[float]:
        return [t.when for t in self.timers if not t.cancelled]

    def fire(self, at: float | None = None) -> None:
        """Run the armed timers due by `at` (default: now), as the loop would."""
        for timer in [t for t in self.timers if not t.cancelled and t.when <= (self.now if at is None else at)]:
            timer.cancelled = True  # fired: no longer armed
            timer.callback()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.fire()


@pytest.fixture
def stepped() -> SteppedLoop:
    return SteppedLoop()


@pytest.fixture
def deadlines(stepped: SteppedLoop) -> Deadlines:
    return Deadlines(stepped)  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def limited(deadlines: Deadlines, seconds: float, wait: asyncio.Event) -> str:
    async with deadlines.after(seconds):
        await wait.wait()
    return "done"


async def test_a_block_past_its_deadline_raises_timeout_and_leaves_the_task_uncancelled(stepped, deadlines):
    seen = {}

    async def body():
        try:
            async with deadlines.after(5) as deadline:
                seen["deadline"] = deadline
                await asyncio.Event().wait()
        except TimeoutError:
            seen["cancelling"] = asyncio.current_task().cancelling()
            raise

    task = asyncio.create_task(body())
    await settle()
    stepped.advance(4.9)
    await settle()
    assert not task.done()
    stepped.advance(0.1)
    await settle()
    with pytest.raises(TimeoutError):
        await task
    assert seen["deadline"].expired() and seen["cancelling"] == 0
    assert len(deadlines) == 0


async def test_blocks_that_end_in_time_are_never_cancelled_later(stepped, deadlines):
    gate = asyncio.Event()
    tasks = [asyncio.create_task(limited(deadlines, 5, gate)) for _ in range(20)]
    await settle()
    assert len(deadlines) == 20
    gate.set()
    assert await asyncio.gather(*tasks) == ["done"] * 20
    assert len(deadlines) == 0
    # The timer still fires at the first deadline, finds nothing due and arms nothing more.
    assert stepped.armed() == [105.0]
    stepped.advance(10)
    assert stepped.armed() == []

    after = asyncio.create_task(asyncio.sleep(0, result="untouched"))
    assert await after == "untouched"


async def test_one_timer_serves_many_deadlines_and_only_the_overdue_block_times_out(stepped, deadlines):
    slow, fast = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(limited(deadlines, 5, slow))
    await settle()
    stepped.now += 1
    others = [asyncio.create_task(limited(deadlines, 5, fast)) for _ in range(10)]
    await settle()
    assert stepped.armed() == [105.0]  # later deadlines arm nothing
    stepped.advance(4)  # the first block's 5 s are up; the others have 1 s left
    await settle()
    with pytest.raises(TimeoutError):
        await first
    assert stepped.armed() == [106.0]  # re-armed for the earliest remaining deadline
    fast.set()
    assert await asyncio.gather(*others) == ["done"] * 10
    stepped.advance(5)
    assert stepped.armed() == [] and len(deadlines) == 0


async def test_an_earlier_deadline_entered_later_rearms_the_timer(stepped, deadlines):
    wait = asyncio.Event()
    long = asyncio.create_task(limited(deadlines, 30, wait))
    await settle()
    short = asyncio.create_task(limited(deadlines, 0.25, wait))
    await settle()
    assert stepped.armed() == [100.25]
    stepped.advance(0.25)
    await settle()
    with pytest.raises(TimeoutError):
        await short
    assert not long.done() and stepped.armed() == [130.0]
    stepped.advance(30)
    await settle()
    with pytest.raises(TimeoutError):
        await long


async def test_a_timer_that_fires_early_arms_again_for_the_same_deadline(stepped, deadlines):
    # libuv keeps time in milliseconds, so uvloop can run a timer a fraction of one early.
    task = asyncio.create_task(limited(deadlines, 5, asyncio.Event()))
    await settle()
    stepped.now = 104.9995
    stepped.fire(at=105.0)
    await settle()
    assert not task.done() and stepped.armed() == [105.0]
    stepped.advance(0.0005)
    await settle()
    with pytest.raises(TimeoutError):
        await task


async def test_a_cancel_from_elsewhere_stays_a_cancel(stepped, deadlines):
    task = asyncio.create_task(limited(deadlines, 5, asyncio.Event()))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0


async def test_a_cancel_from_elsewhere_at_the_same_time_as_the_deadline_stays_a_cancel(stepped, deadlines):
    task = asyncio.create_task(limited(deadlines, 5, asyncio.Event()))
    await settle()
    stepped.advance(5)  # our cancel ...
    task.cancel()     # ... and someone else's, before the task runs again
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_deadline_inside_an_asyncio_timeout_and_around_one(stepped, deadlines):

    async def ours_outside():
        async with deadlines.after(5):
            async with asyncio.timeout(60):
                await asyncio.Event().wait()

    async def ours_inside():
        async with asyncio.timeout(0.01):
            async with deadlines.after(60):
                await asyncio.Event().wait()

    outside = asyncio.create_task(ours_outside())
    inside = asyncio.create_task(ours_inside())
    await settle()
    stepped.advance(5)
    await settle()
    with pytest.raises(TimeoutError):
        await outside  # raised by ours: asyncio's own timeout had not expired
    with pytest.raises(TimeoutError):
        await inside  # raised by asyncio's after 10 ms of real time; ours passed the cancel through
    assert len(deadlines) == 0


async def test_a_deadline_is_entered_once():
    deadlines = Deadlines(asyncio.get_running_loop())
    deadline = deadlines.after(5)
    async with deadline:
        pass
    with pytest.raises(RuntimeError, match="entered once"):
        async with deadline:
            pass


async def test_on_the_real_loop_a_block_that_outlasts_its_deadline_times_out():
    deadlines = Deadlines(asyncio.get_running_loop())
    with pytest.raises(TimeoutError):
        async with deadlines.after(0.01):
            await asyncio.sleep(5)
    async with deadlines.after(5):
        await asyncio.sleep(0)
    assert len(deadlines) == 0


async def test_a_task_that_carried_on_after_an_earlier_cancel_still_gets_timeout(stepped, deadlines):
    entered = asyncio.Event()

    async def body():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # swallowed: the task's cancel count stays at 1
        async with deadlines.after(5):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await settle()
    task.cancel()
    await entered.wait()
    stepped.advance(5)
    with pytest.raises(TimeoutError):
        await task
