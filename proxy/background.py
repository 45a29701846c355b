"""Background tasks that the proxy starts and must stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

log = structlog.get_logger("resilience-proxy")


def stop_if_asked() -> None:
    """Raise CancelledError if the running task has been asked to stop.

    A background loop that survives ordinary errors calls this on every turn: a cancellation
    that lands inside a library call can come out as another error (or as a plain return from
    a helper that answers None on any error), and a loop that carried on would never stop.
    The task's cancellation count still says it was asked.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError()


async def cancel_and_wait(task: asyncio.Task[object] | None, *, grace: float = 1.0) -> None:
    """Cancel a background loop and wait until it has really stopped (its errors are its own).

    If the task is still running `grace` seconds after a cancellation, it is cancelled again:
    shutting down must not hang on a loop that lost the first request to stop.
    """
    if task is None:
        return
    task.cancel()
    while not task.done():
        await asyncio.wait({task}, timeout=grace)
        if not task.done():
            log.warning("a background task survived its cancellation; cancelling it again", task=task.get_name())
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
