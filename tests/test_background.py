"""Stopping background loops: a cancellation lost inside a library must not hang shutdown."""

from __future__ import annotations

import asyncio

import structlog

from proxy.background import cancel_and_wait, stop_if_asked


async def lost_cancellation() -> None:
    """A library call that turns a cancellation into an ordinary error, as some do."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        raise ConnectionError("connection closed while reading") from None


async def test_a_loop_that_asks_stops_on_the_first_cancellation():
    turns = 0

    async def loop() -> None:
        nonlocal turns
        while True:
            stop_if_asked()
            turns += 1
            try:
                await lost_cancellation()
            except Exception:
                stop_if_asked()  # the error stands for the cancellation: stop instead of logging it
                raise AssertionError("the loop went on after it was cancelled") from None

    task = asyncio.get_running_loop().create_task(loop())
    await asyncio.sleep(0)
    with structlog.testing.capture_logs() as lines:
        await asyncio.wait_for(cancel_and_wait(task, grace=5.0), 1.0)
    assert task.cancelled() and turns == 1
    assert not [line for line in lines if "survived" in line["event"]]  # no second cancellation was needed


async def test_cancel_and_wait_cancels_again_a_loop_that_lost_the_first_request():
    turns = 0

    async def careless() -> None:
        nonlocal turns
        lost = False
        while True:  # never asks whether it should stop
            turns += 1
            try:
                await lost_cancellation()
            except ConnectionError:
                if lost:
                    raise RuntimeError("stopped by the second cancellation") from None
                lost = True

    task = asyncio.get_running_loop().create_task(careless())
    await asyncio.sleep(0)
    with structlog.testing.capture_logs() as lines:
        # The second cancellation lands in the library call too, whose error ends the loop this time.
        await asyncio.wait_for(cancel_and_wait(task, grace=0.05), 1.0)
    assert isinstance(task.exception(), RuntimeError) and turns == 2
    assert [line["event"] for line in lines] == ["a background task survived its cancellation; cancelling it again"]
