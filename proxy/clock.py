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

    async def sleep(self, seconds: float) -> None:
        """Wait (backoff); a fake clock advances instead of waiting."""


class SystemClock:
    """The real clock."""

    # The functions themselves, not methods around them: a request reads the clock about ten times.
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)


class FakeClock:
    """A clock that only moves when told to, or when code sleeps on it.

    `sleep()` advances the clock by the requested amount and yields to the loop once,
    so a backoff of 30 s costs a test nothing. `sleeps` records every requested sleep.
    """

    def __init__(self, start_wall: float = 1_733_040_000.0, start_mono: float = 1000.0) -> None:
        self._wall = start_wall
        self._mono = start_mono
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._mono += seconds
        self._wall += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds > 0:
            self.advance(seconds)
        await asyncio.sleep(0)


SYSTEM_CLOCK = SystemClock()
