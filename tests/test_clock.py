"""The clocks: the system one, and the stepped one tests use instead of sleeping."""

from __future__ import annotations

import asyncio

from proxy.clock import SYSTEM_CLOCK, FakeClock


async def test_a_stepped_clock_jumps_over_sleeps_and_notes_them():
    clock = FakeClock()
    start = clock.monotonic()
    await clock.sleep(30.0)
    assert clock.monotonic() == start + 30.0 and clock.sleeps == [30.0]


async def test_without_autojump_a_sleep_waits_for_the_test_to_move_the_clock():
    clock = FakeClock(autojump=False)
    sleeper = asyncio.ensure_future(clock.sleep(5.0))
    await asyncio.sleep(0)
    assert clock.sleepers == 1 and not sleeper.done()
    clock.advance(4.9)
    await asyncio.sleep(0)
    assert not sleeper.done()
    clock.advance(0.1)
    await sleeper
    assert clock.sleepers == 0


async def test_a_sleep_ends_early_when_its_until_completes_on_either_clock():
    for clock in (FakeClock(autojump=False), SYSTEM_CLOCK):
        until = asyncio.get_running_loop().create_future()
        sleeper = asyncio.ensure_future(clock.sleep(3600.0, until=until))
        await asyncio.sleep(0)
        assert not sleeper.done()
        until.set_result(None)
        await asyncio.wait_for(sleeper, 1.0)  # an hour's sleep, over as soon as `until` is


async def test_a_cancelled_sleep_leaves_nothing_waiting_on_the_clock():
    clock = FakeClock(autojump=False)
    sleeper = asyncio.ensure_future(clock.sleep(5.0))
    await asyncio.sleep(0)
    sleeper.cancel()
    await asyncio.gather(sleeper, return_exceptions=True)
    assert clock.sleepers == 0
