"""The fake providers' PreciseTimer: sleeps end in deadline order, never early, cancels dropped."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from bench.servers import PreciseTimer


async def test_sleeps_end_in_deadline_order_and_never_before_their_time():
    timer = PreciseTimer()
    try:
        if sys.platform.startswith("linux"):
            assert timer.precise  # timerfd, not asyncio's millisecond timers
        ended: list[tuple[float, float]] = []

        async def nap(delay: float) -> None:
            started = time.monotonic()
            await timer.sleep(delay)
            ended.append((delay, time.monotonic() - started))

        await asyncio.gather(*(nap(d) for d in (0.030, 0.010, 0.020, 0.0105, 0.001)))
        assert [delay for delay, _ in ended] == [0.001, 0.010, 0.0105, 0.020, 0.030]
        assert all(took >= delay for delay, took in ended)
    finally:
        timer.close()


async def test_a_cancelled_sleep_is_dropped_and_the_others_still_end():
    timer = PreciseTimer()
    try:
        first = asyncio.create_task(timer.sleep(0.005))
        second = asyncio.create_task(timer.sleep(0.010))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 5)
        assert second.done() and not second.cancelled()
    finally:
        timer.close()
