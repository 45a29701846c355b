"""Time limits for many concurrent awaits on one event loop, kept by one timer.

`async with deadlines.after(seconds):` behaves as `async with asyncio.timeout(seconds):` (the
block's task is cancelled when the time is up and the block raises TimeoutError; a cancel from
anyone else stays a cancel), but entering and leaving it only adds and removes a dict entry.
asyncio.timeout arms a loop timer on entry and cancels it on exit: measured on uvloop at 50
concurrent pass-through requests, that was about 9 µs of the 90 µs of CPU a request took, for a
timer that almost never fires. Here one timer is armed for the earliest deadline; when it
fires it cancels the tasks whose time is up and re-arms for the earliest of the rest. Under a
steady load with one timeout per route it fires about once per timeout, looking at each
request in flight once.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

_NEVER = float("inf")


def for_running_loop(deadlines: Deadlines | None) -> Deadlines:
    """`deadlines` if it belongs to the running loop, else a new Deadlines for that loop."""
    loop = asyncio.get_running_loop()
    return deadlines if deadlines is not None and deadlines.loop is loop else Deadlines(loop)


class Deadlines:
    """The deadlines of one event loop's awaits; see the module's text."""

    __slots__ = ("loop", "_live", "_timer", "_armed_for")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._live: dict[Deadline, None] = {}  # entered and not yet left or expired
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = _NEVER  # the deadline `_timer` fires at

    def after(self, delay: float) -> Deadline:
        """A time limit of `delay` seconds from now, for `async with`."""
        return Deadline(self, self.loop.time() + delay)

    def __len__(self) -> int:
        return len(self._live)

    def _enter(self, deadline: Deadline) -> None:
        self._live[deadline] = None
        if deadline.when < self._armed_for:
            self._arm(deadline.when)

    def _leave(self, deadline: Deadline) -> None:
        self._live.pop(deadline, None)
        # The timer stays armed: re-arming on every exit is the cost this module avoids.

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = when
        self._timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_for = _NEVER
        now = self.loop.time()
        due = [deadline for deadline in self._live if deadline.when <= now]
        for deadline in due:
            del self._live[deadline]
            deadline._expire()
        if self._live:
            # A timer that fires a little early (libuv's clock counts milliseconds) finds its
            # deadline still live and is simply armed for it again.
            self._arm(min(deadline.when for deadline in self._live))


class Deadline:
    """One time limit; enter it once, from inside a task."""

    __slots__ = ("_owner", "when", "_task", "_cancelling", "_expired")

    def __init__(self, owner: Deadlines, when: float) -> None:
        self._owner = owner
        self.when = when
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False

    def expired(self) -> bool:
        return self._expired

    async def __aenter__(self) -> Deadline:
        if self._task is not None:
            raise RuntimeError("a Deadline is entered once")
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a Deadline is used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._owner._enter(self)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._expired:
            self._owner._leave(self)
            return
        assert self._task is not None
        # Ours was the cancel, and nobody else's is pending: the block ran out of time.
        if (self._task.uncancel() <= self._cancelling and exc_type is not None
                and issubclass(exc_type, asyncio.CancelledError)):
            raise TimeoutError from exc

    def _expire(self) -> None:
        assert self._task is not None
        self._expired = True
        self._task.cancel()
