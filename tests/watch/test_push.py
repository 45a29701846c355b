"""WebSocket delivery (proxy/watch/push.py) on its own: a Hub served by a real aiohttp server on
loopback, a watcher over a Runtime, a memory outbox and a stepped clock. No proxy process."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy import signals
from proxy.config.model import EventsSettings
from proxy.watch.outbox import Event, MemoryOutbox
from proxy.watch.push import Hub
from proxy.watch.watcher import Watcher
from tests.watch_helpers import flight, runtime_for, watched_table

TOPIC = "flights/status/KE001"
ROUTE = "/flights/status/{flight}"


@pytest.fixture
async def hub_for(fake_upstream, clock):
    """Start a Hub (with the given events settings) at ws://127.0.0.1:PORT/events; connect clients to it."""
    api = await fake_upstream("kac")
    api.default = flight("SCHEDULED")
    runtime = runtime_for(watched_table(api.url), clock)
    session = aiohttp.ClientSession()
    runners: list[web.ServerRunner] = []

    async def make(**settings):
        outbox = MemoryOutbox(clock, 100)
        emitted: list = []
        watcher = Watcher(lambda: runtime, outbox, lambda event: None, clock=clock, emit=emitted.append)
        hub = Hub(watcher, outbox, dataclasses.replace(EventsSettings(), **settings), clock, emitted.append)
        runner = web.ServerRunner(web.Server(hub.handle), access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/events"
        return hub, outbox, emitted, lambda query="": session.ws_connect(url + query)

    yield make
    await session.close()
    for runner in runners:
        await runner.cleanup()
    await runtime.close()


async def send(ws, **frame) -> dict:
    await ws.send_str(orjson.dumps(frame).decode())
    return await receive(ws)


async def receive(ws, timeout: float = 2.0) -> dict:
    message = await ws.receive(timeout=timeout)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return orjson.loads(message.data)


async def nothing(ws, wait: float = 0.2) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await ws.receive(timeout=wait)


def change(evt_id: str, status: str, topic: str = TOPIC) -> Event:
    return Event(evt_id, topic, "2024-12-01T10:00:00.000Z", {"status": "SCHEDULED"}, {"status": status}, ROUTE)


async def test_an_event_reaches_the_subscribers_of_its_topic_only(hub_for):
    hub, _, emitted, connect = await hub_for()
    subscribed, other = await connect(), await connect()
    assert await send(subscribed, op="subscribe", topic=TOPIC) == {"type": "subscribed", "topic": TOPIC}
    assert (await send(other, op="subscribe", topic="flights/status/OZ202"))["type"] == "subscribed"
    hub.publish(change("1733040000000-0", "DELAYED"))
    assert await receive(subscribed) == {"type": "event", "evtId": "1733040000000-0", "topic": TOPIC,
                                         "at": "2024-12-01T10:00:00.000Z", "before": {"status": "SCHEDULED"},
                                         "after": {"status": "DELAYED"}, "redelivery": False}
    await nothing(other)
    assert signals.EventDelivered("ws", ROUTE, False) in emitted


async def test_an_unacknowledged_event_is_sent_again_with_doubling_waits_until_acked(hub_for, clock):
    hub, _, _, connect = await hub_for(ack_timeout=30.0)
    ws = await connect()
    await send(ws, op="subscribe", topic=TOPIC)
    hub.publish(change("1733040000000-0", "DELAYED"))
    assert (await receive(ws))["redelivery"] is False
    clock.advance(29)
    assert await hub.redeliver_due() == 0  # not due yet
    clock.advance(1)
    assert await hub.redeliver_due() == 1
    again = await receive(ws)
    assert (again["evtId"], again["redelivery"]) == ("1733040000000-0", True)
    clock.advance(59)
    assert await hub.redeliver_due() == 0  # the second wait is twice the first
    clock.advance(1)
    assert await hub.redeliver_due() == 1
    await receive(ws)
    assert await send(ws, op="ack", evtId="1733040000000-0") == {"type": "acked", "evtId": "1733040000000-0"}
    clock.advance(3600)
    assert await hub.redeliver_due() == 0
    assert hub.describe()["unacked"] == 0 and hub.describe()["acked"] == 1


async def test_a_client_resuming_with_last_evt_id_gets_what_it_missed_in_order(hub_for):
    hub, outbox, _, connect = await hub_for()
    first = await outbox.append(TOPIC, ROUTE, "t1", {"status": "A"}, {"status": "B"})
    await outbox.append("flights/status/OZ202", ROUTE, "t2", {"status": "A"}, {"status": "X"})
    second = await outbox.append(TOPIC, ROUTE, "t3", {"status": "B"}, {"status": "C"})
    third = await outbox.append(TOPIC, ROUTE, "t4", {"status": "C"}, {"status": "D"})
    ws = await connect()
    assert (await send(ws, op="subscribe", topic=TOPIC, last_evt_id=first.evt_id))["type"] == "subscribed"
    replayed = [await receive(ws), await receive(ws)]
    assert [f["evtId"] for f in replayed] == [second.evt_id, third.evt_id]  # only its topic, only after the id
    await nothing(ws)


async def test_a_resume_id_in_the_url_applies_to_every_subscribe(hub_for):
    hub, outbox, _, connect = await hub_for()
    first = await outbox.append(TOPIC, ROUTE, "t1", {"status": "A"}, {"status": "B"})
    second = await outbox.append(TOPIC, ROUTE, "t2", {"status": "B"}, {"status": "C"})
    ws = await connect(f"?last_evt_id={first.evt_id}")
    await send(ws, op="subscribe", topic=TOPIC)
    assert (await receive(ws))["evtId"] == second.evt_id


@pytest.mark.parametrize("frame, error", [
    (b"not json", "malformed"),
    (b"[1, 2]", "malformed"),
    (b'{"op": "dance"}', "malformed"),
    (b'{"op": "ack", "evtId": "1-0"}', "unknown_evt_id"),
    (b'{"op": "unsubscribe", "topic": "flights/status/KE001"}', "unknown_topic"),
    (b'{"op": "subscribe", "topic": "hotels/1"}', "unknown_topic"),
    (b'{"op": "subscribe", "topic": "flights/status/KE001", "last_evt_id": "yesterday"}', "malformed"),
])
async def test_a_bad_frame_gets_a_named_error_and_the_connection_keeps_working(hub_for, frame, error):
    hub, _, _, connect = await hub_for()
    ws = await connect()
    await ws.send_str(frame.decode())
    answer = await receive(ws)
    assert answer["type"] == "error" and answer["error"] == error and answer["detail"]
    assert (await send(ws, op="subscribe", topic=TOPIC))["type"] == "subscribed"


async def test_a_frame_over_the_size_limit_ends_that_connection_only(hub_for):
    hub, _, _, connect = await hub_for(max_frame=256)
    big, other = await connect(), await connect()
    await big.send_str(orjson.dumps({"op": "subscribe", "topic": "x" * 1000}).decode())
    message = await big.receive(timeout=2.0)
    # aiohttp's reader closes with 1009 (message too big): the frame is never read, nor answered.
    assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.MESSAGE_TOO_BIG)
    assert (await send(other, op="subscribe", topic=TOPIC))["type"] == "subscribed"
    assert hub.describe()["clients"] == 1


async def test_the_per_connection_topic_cap_names_its_setting(hub_for):
    hub, _, _, connect = await hub_for(max_topics_per_connection=1)
    ws = await connect()
    await send(ws, op="subscribe", topic=TOPIC)
    refused = await send(ws, op="subscribe", topic="flights/status/OZ202")
    assert refused["error"] == "too_many_topics" and "events.max_topics_per_connection" in refused["detail"]
    assert (await send(ws, op="subscribe", topic=TOPIC))["type"] == "subscribed"  # one it holds is no more


async def test_the_per_address_cap_counts_topics_across_connections(hub_for):
    hub, _, _, connect = await hub_for(max_topics_per_peer=1)
    first, second = await connect(), await connect()
    await send(first, op="subscribe", topic=TOPIC)
    assert (await send(second, op="subscribe", topic=TOPIC))["type"] == "subscribed"  # the same topic is shared
    refused = await send(second, op="subscribe", topic="flights/status/OZ202")
    assert "events.max_topics_per_peer" in refused["detail"]


async def test_a_topic_a_reload_dropped_is_told_to_its_subscribers_and_no_longer_delivered(hub_for):
    hub, _, _, connect = await hub_for()
    ws = await connect()
    await send(ws, op="subscribe", topic=TOPIC)
    hub.forget_topic(TOPIC, "the route table no longer watches this topic")
    told = await receive(ws)
    assert (told["error"], told["topic"]) == ("unknown_topic", TOPIC)
    hub.publish(change("1733040000000-1", "DELAYED"))
    await nothing(ws)


async def test_a_client_that_falls_behind_is_told_and_dropped(hub_for):
    hub, _, emitted, connect = await hub_for(client_queue=2)
    slow = await connect()
    await send(slow, op="subscribe", topic=TOPIC)
    for n in range(10):  # published in one loop turn: the client's writer cannot keep up
        hub.publish(change(f"1733040000000-{n}", f"S{n}"))
    frames = []
    while True:
        message = await slow.receive(timeout=2.0)
        if message.type != aiohttp.WSMsgType.TEXT:
            break
        frames.append(orjson.loads(message.data))
    assert frames[-1]["error"] == "overflow"
    assert slow.close_code == 4008
    assert signals.ClientDropped("overflow") in emitted and hub.describe()["dropped"] == 1
