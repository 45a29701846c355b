"""The event bus: fan-out, a failing subscriber, and the per-request events held back for a loop turn."""

from __future__ import annotations

import asyncio

from proxy import signals


def request_finished(status: int = 200) -> signals.RequestFinished:
    return signals.RequestFinished(service="fx", route="/fx", method="GET", path="/fx/a", status=status, cache="MISS",
                                  upstream="p", attempts=(), duration=0.01, request_id="r1")


def breaker_failure() -> signals.BreakerFailure:
    return signals.BreakerFailure(service="fx", provider="p", failures=1, threshold=5)


def test_every_subscriber_gets_the_event_even_after_one_fails():
    bus = signals.EventBus()
    seen = []

    def broken(event):
        raise RuntimeError("a bug in an observer")

    bus.subscribe(broken)
    bus.subscribe(seen.append)
    event = breaker_failure()
    bus.emit(event)
    assert seen == [event] and bus.subscriber_errors == 1


async def test_per_request_events_wait_for_the_callbacks_already_due():
    # Answers made ready in the same loop turn go out before any request is counted or logged.
    bus = signals.EventBus(later=signals.PER_REQUEST)
    order = []
    bus.subscribe(lambda event: order.append(type(event).__name__))
    loop = asyncio.get_running_loop()
    loop.call_soon(order.append, "answer already due")
    bus.emit(request_finished())
    assert order == []
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["answer already due", "RequestFinished"]


async def test_other_events_are_delivered_at_once_after_the_waiting_ones():
    bus = signals.EventBus(later=signals.PER_REQUEST)
    seen = []
    bus.subscribe(seen.append)
    first, second, failure = request_finished(200), request_finished(502), breaker_failure()
    bus.emit(first)
    bus.emit(second)
    bus.emit(failure)  # the order observers see is the order things happened in
    assert seen == [first, second, failure]
    await asyncio.sleep(0)
    assert seen == [first, second, failure]  # nothing delivered twice by the scheduled turn


def test_without_a_running_loop_nothing_waits():
    bus = signals.EventBus(later=signals.PER_REQUEST)
    seen = []
    bus.subscribe(seen.append)
    event = request_finished()
    bus.emit(event)
    assert seen == [event]


async def test_waiting_events_can_be_delivered_on_demand():
    # ProxyProcess.stop() does this so a drain does not lose the last requests' counts.
    bus = signals.EventBus(later=signals.PER_REQUEST)
    seen = []
    bus.subscribe(seen.append)
    event = request_finished()
    bus.emit(event)
    bus.deliver_waiting()
    assert seen == [event]
    await asyncio.sleep(0)
    assert seen == [event]


class Interrupted(BaseException):
    pass


async def test_an_interrupted_delivery_keeps_the_rest_for_the_next_one():
    bus = signals.EventBus(later=signals.PER_REQUEST)
    seen = []
    interrupt = [True]

    def subscriber(event):
        if interrupt and event.status == 500:
            interrupt.clear()
            raise Interrupted()
        seen.append(event.status)

    bus.subscribe(subscriber)
    for status in (200, 500, 502):
        bus.emit(request_finished(status))
    try:
        bus.deliver_waiting()
    except Interrupted:
        pass
    assert seen == [200]
    await asyncio.sleep(0)  # the turn already scheduled delivers what was left
    assert seen == [200, 502]
    bus.emit(request_finished(204))  # and later events still get a turn of their own
    await asyncio.sleep(0)
    assert seen == [200, 502, 204]


def test_events_left_by_a_closed_loop_are_delivered_before_the_next_one():
    bus = signals.EventBus(later=signals.PER_REQUEST)
    seen = []
    bus.subscribe(lambda event: seen.append(event.status))
    loop = asyncio.new_event_loop()

    def emit_then_stop():
        bus.emit(request_finished(200))
        loop.stop()

    loop.call_soon(emit_then_stop)
    loop.run_forever()
    loop.close()  # its delivery turn never ran
    bus.emit(request_finished(201))
    assert seen == [200, 201]


async def test_held_events_wait_for_the_hold_then_go_out_together():
    bus = signals.EventBus(later=signals.PER_REQUEST, hold=0.02)
    seen = []
    bus.subscribe(lambda event: seen.append(event.status))
    bus.emit(request_finished(200))
    bus.emit(request_finished(201))
    for _ in range(5):
        await asyncio.sleep(0)
    assert seen == []  # several loop turns later: still held
    await asyncio.sleep(0.05)
    assert seen == [200, 201]
    bus.emit(request_finished(202))  # the next batch gets a hold of its own
    await asyncio.sleep(0)
    assert seen == [200, 201]
    await asyncio.sleep(0.05)
    assert seen == [200, 201, 202]


async def test_a_full_batch_goes_out_on_the_next_turn_without_waiting_for_the_hold():
    bus = signals.EventBus(later=signals.PER_REQUEST, hold=60.0, batch=3)
    seen = []
    bus.subscribe(lambda event: seen.append(event.status))
    bus.emit(request_finished(200))
    bus.emit(request_finished(201))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert seen == []
    bus.emit(request_finished(202))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert seen == [200, 201, 202]
    bus.emit(request_finished(203))  # a new hold starts: nothing goes out early
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert seen == [200, 201, 202]
    bus.deliver_waiting()
    assert seen == [200, 201, 202, 203]


async def test_a_held_delivery_read_early_is_not_repeated_by_its_timer():
    bus = signals.EventBus(later=signals.PER_REQUEST, hold=0.02)
    seen = []
    bus.subscribe(lambda event: seen.append(event.status))
    bus.emit(request_finished(200))
    bus.deliver_waiting()  # a scrape came first
    bus.emit(request_finished(201))  # held until the same timer
    assert seen == [200]
    await asyncio.sleep(0.05)
    assert seen == [200, 201]


def test_per_request_events_compare_and_hash_by_value_like_the_frozen_ones():
    # Not frozen (they are made on every request), but still usable as values: in sets, as keys.
    assert request_finished() == request_finished() and request_finished() != request_finished(status=500)
    assert len({request_finished(), request_finished(), request_finished(status=500)}) == 2
    assert len({breaker_failure(), breaker_failure()}) == 1
