"""Single flight: identical requests in flight at once make one upstream call and share its result."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class CoalescedCallCancelled(Exception):
    """The call this request was waiting for was cancelled (its caller went away)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the shared call for {key!r} was cancelled")
        self.key = key


class Coalescer:
    """Runs at most one call per key at a time; callers arriving meanwhile wait for its outcome."""

    def __init__(self) -> None:
        self._calls: dict[str, asyncio.Future] = {}

    @property
    def in_flight(self) -> int:
        """How many keys have a call running."""
        return len(self._calls)

    async def run(self, key: str, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """`(result, shared)`: `shared` is True when another caller's call produced the result.

        Every waiter gets the leader's result, or its exception re-raised, in the same loop
        iteration. A cancelled waiter leaves the call running; if the leader is cancelled, the
        waiters get `CoalescedCallCancelled`. The key is free again once the call settles.
        """
        shared = self._calls.get(key)
        if shared is not None:
            # shield: a waiter that is cancelled must not cancel the call everyone shares
            return await asyncio.shield(shared), True

        outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self._calls[key] = outcome
        try:
            result = await fn()
        except Exception as exc:
            outcome.set_exception(exc)
            raise
        except BaseException:  # CancelledError (or interpreter exit) in the leader's task
            outcome.set_exception(CoalescedCallCancelled(key))
            raise
        else:
            outcome.set_result(result)
            return result, False
        finally:
            del self._calls[key]
            if outcome.done() and not outcome.cancelled():
                outcome.exception()  # retrieved: nobody waiting is not an error worth logging
            # A failed call's traceback holds this frame, and the frame this future, which holds the
            # exception: a cycle only the garbage collector would free, with the whole request in it.
            del outcome
