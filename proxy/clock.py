"""Time as an injected dependency, so breakers, backoff and TTLs are tested by stepping a clock."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What resilience code may ask of time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: durations, deadlines, breaker timers."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch: cache ages, `retry after` timestamps."""

    async def sleep(self, seconds: float, until: "asyncio.Future[None] | None" = None) -> None:
        """Wait (backoff), or less when `until` completes first; a fake clock advances instead of waiting."""


class SystemClock:
    """The real clock."""

    # The functions themselves, not methods around them: a request reads the clock about ten times.
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float, until: "asyncio.Future[None] | None" = None) -> None:
        if seconds <= 0:
            return
        if until is None:
            await asyncio.sleep(seconds)
            return
        timer = asyncio.get_running_loop().call_later(seconds, _settle, until)
        try:
            await asyncio.shield(until)
        finally:
            timer.cancel()


def _settle(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


class FakeClock:
    """A clock that only moves when told to, or when code sleeps on it.

    `sleep()` advances the clock by the requested amount and yields to the loop once,
    so a backoff of 30 s costs a test nothing. `sleeps` records every requested sleep.
    With `autojump=False` a sleep instead waits until the test `advance()`s the clock past
    its end (or its `until` completes), so a test can act while code sleeps.
    """

    def __init__(self, start_wall: float = 1_733_040_000.0, start_mono: float = 1000.0, *,
                 autojump: bool = True) -> None:
        self._wall = start_wall
        self._mono = start_mono
        self.sleeps: list[float] = []
        self._autojump = autojump
        self._sleeping: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._mono += seconds
        self._wall += seconds
        for end, woken in self._sleeping:
            if end <= self._mono:
                _settle(woken)

    async def sleep(self, seconds: float, until: "asyncio.Future[None] | None" = None) -> None:
        self.sleeps.append(seconds)
        if self._autojump:
            if seconds > 0:
                self.advance(seconds)
            await asyncio.sleep(0)
            return
        woken = until if until is not None else asyncio.get_running_loop().create_future()
        entry = (self._mono + seconds, woken)
        self._sleeping.append(entry)
        try:
            await asyncio.shield(woken)
        finally:
            self._sleeping.remove(entry)

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting for the clock (autojump=False)."""
        return len(self._sleeping)


SYSTEM_CLOCK = SystemClock()
