"""Flight-status events: change detection, the outbox, WebSocket delivery with acks, webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from proxy.watch.outbox import Event
from tests.fakes import Fail, Ok, route_table, start_proxy, stop_proxy


def flight(status: str, gate: str = "3") -> Ok:
    return Ok(body=orjson.dumps({"flight": "KE001", "status": status, "gate": gate, "checked": status + gate}))


def watched(upstream: str, *, webhook: str | None = None, topics: list[str] | None = None,
            service_cache: dict | None = None, events: dict | None = None, **top) -> str:
    watch: dict = {"interval": "5m", "fields": "{status: status, gate: gate}"}
    if webhook:
        watch["deliver"] = {"webhook": webhook, "secret": "${WEBHOOK_SECRET}", "attempts": 4}
    if topics:
        watch["topics"] = topics
    service = {"retry": "NONE", "routes": [{"match": "/flights/status/{flight}", "watch": watch}],
               "upstreams": [{"name": "flights_kac", "url": upstream}]}
    if service_cache:
        service["cache"] = service_cache
    extra = dict(top)
    extra["events"] = {"ack_timeout": "30s", **(events or {})}
    return route_table({"flights": service}, **extra)


async def connect(proxy, query: str = ""):
    return await proxy.client.ws_connect(proxy.url + "/events" + query)


async def frame(ws, timeout: float = 2.0) -> dict:
    message = await ws.receive(timeout=timeout)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return orjson.loads(message.data)


async def no_frame(ws, wait: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await ws.receive(timeout=wait)


async def subscribe(ws, topic: str = "flights/status/KE001", **extra) -> dict:
    await ws.send_str(orjson.dumps({"op": "subscribe", "topic": topic, **extra}).decode())
    return await frame(ws)


def quiet(proxy):
    """Stop the background poller: the test steps the clock and polls itself."""
    return proxy.process.events.watcher.stop()


async def poll(proxy, clock, seconds: float = 300) -> int:
    clock.advance(seconds)
    return await proxy.process.events.watcher.tick()


async def test_a_status_change_reaches_a_subscriber_once_with_a_stable_id(fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    api.default = flight("SCHEDULED")
    proxy = await proxy_factory(watched(api.url), clock=clock)
    await quiet(proxy)
    ws = await connect(proxy)
    assert await subscribe(ws) == {"type": "subscribed", "topic": "flights/status/KE001"}
    assert await proxy.process.events.watcher.tick() == 1   # the baseline: no event
    await no_frame(ws)
    api.default = flight("DELAYED")
    await poll(proxy, clock)
    event = await frame(ws)
    assert event["type"] == "event" and event["topic"] == "flights/status/KE001"
    assert event["before"] == {"status": "SCHEDULED", "gate": "3"}
    assert event["after"] == {"status": "DELAYED", "gate": "3"}
    assert event["redelivery"] is False and event["at"].endswith("Z")
    await ws.send_str(orjson.dumps({"op": "ack", "evtId": event["evtId"]}).decode())
    assert await frame(ws) == {"type": "acked", "evtId": event["evtId"]}
    await poll(proxy, clock)     # same status: nothing
    await poll(proxy, clock, 60)  # not due yet: no call
    await no_frame(ws)
    assert api.calls == 3
    outbox = await (await proxy.get("/health/integrations/outbox")).json()
    assert outbox["length"] == 1 and outbox["durable"] is False
    assert outbox["websocket"]["acked"] == 1 and outbox["websocket"]["ackRatio"] == 1.0


async def test_an_unacknowledged_event_is_sent_again_after_the_ack_timeout(fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    api.default = flight("SCHEDULED")
    proxy = await proxy_factory(watched(api.url), clock=clock)
    await quiet(proxy)
    ws = await connect(proxy)
    await subscribe(ws)
    await proxy.process.events.watcher.tick()
    api.default = flight("BOARDING", gate="7")
    await poll(proxy, clock)
    first = await frame(ws)
    hub = proxy.process.events.hub
    clock.advance(29)
    assert await hub.redeliver_due() == 0
    clock.advance(1)
    assert await hub.redeliver_due() == 1
    again = await frame(ws)
    assert again["evtId"] == first["evtId"] and again["redelivery"] is True
    clock.advance(59)   # the next wait is twice as long
    assert await hub.redeliver_due() == 0
    clock.advance(1)
    assert await hub.redeliver_due() == 1
    assert (await frame(ws))["evtId"] == first["evtId"]
    await ws.send_str(orjson.dumps({"op": "ack", "evtId": first["evtId"]}).decode())
    await frame(ws)
    clock.advance(3600)
    assert await hub.redeliver_due() == 0


async def test_a_client_reconnecting_with_last_evt_id_gets_exactly_what_it_missed(fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    api.default = flight("SCHEDULED")
    proxy = await proxy_factory(watched(api.url), clock=clock)
    await quiet(proxy)
    keeper = await connect(proxy)  # keeps the topic polled while the other client is away
    await subscribe(keeper)
    ws = await connect(proxy)
    await subscribe(ws)
    await proxy.process.events.watcher.tick()
    api.default = flight("DELAYED")
    await poll(proxy, clock)
    seen = await frame(ws)
    assert (await frame(keeper))["evtId"] == seen["evtId"]
    await ws.close()
    missed = []
    for status in ("BOARDING", "DEPARTED"):
        api.default = flight(status)
        await poll(proxy, clock)
        missed.append((await frame(keeper))["evtId"])
    back = await connect(proxy)
    await subscribe(back, last_evt_id=seen["evtId"])
    replayed = [await frame(back), await frame(back)]
    assert [e["evtId"] for e in replayed] == missed
    assert [e["after"]["status"] for e in replayed] == ["BOARDING", "DEPARTED"]
    await no_frame(back)


async def test_bad_frames_get_clear_errors_and_the_connection_keeps_working(fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    proxy = await proxy_factory(watched(api.url, events={"max_frame": "1KiB"}), clock=clock)
    await quiet(proxy)
    ws = await connect(proxy)
    await ws.send_str("{not json")
    assert (await frame(ws))["error"] == "malformed"
    await ws.send_str('["op", "subscribe"]')
    assert (await frame(ws))["error"] == "malformed"
    assert (await subscribe(ws, "flights/nowhere/KE001"))["error"] == "unknown_topic"
    assert (await subscribe(ws, "../etc/passwd"))["error"] == "unknown_topic"
    await ws.send_str(orjson.dumps({"op": "ack", "evtId": "123-0"}).decode())
    assert (await frame(ws))["error"] == "unknown_evt_id"
    assert (await subscribe(ws, last_evt_id="yesterday"))["error"] == "malformed"
    assert (await subscribe(ws))["type"] == "subscribed"
    await ws.send_str("x" * 5000)
    message = await ws.receive(timeout=2)
    assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.MESSAGE_TOO_BIG)
    assert (await proxy.get("/health/live")).status == 200


async def test_a_client_that_falls_behind_is_told_and_dropped_without_delaying_others(fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    proxy = await proxy_factory(watched(api.url, events={"client_queue": 5}), clock=clock)
    await quiet(proxy)
    slow = await connect(proxy)
    await subscribe(slow, "flights/status/KE001")
    other = await connect(proxy)
    await subscribe(other, "flights/status/OZ8915")
    hub = proxy.process.events.hub
    for n in range(50):  # a burst for the slow client's topic, faster than any socket drains
        hub.publish(Event(f"1733040000000-{n}", "flights/status/KE001", "t", None, {"n": n}, "flights"))
    hub.publish(Event("1733040000001-0", "flights/status/OZ8915", "t", None, {"ok": True}, "flights"))
    got = await frame(other)
    assert got["evtId"] == "1733040000001-0"
    frames = []
    while True:
        message = await slow.receive(timeout=2)
        if message.type != aiohttp.WSMsgType.TEXT:
            break
        frames.append(orjson.loads(message.data))
    assert frames[-1]["error"] == "overflow"
    assert len(frames) <= 6
    assert slow.close_code == 4008
    assert hub.describe()["dropped"] == 1


async def test_100_subscribers_of_one_topic_cost_one_poll_per_interval(fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    api.default = flight("SCHEDULED")
    proxy = await proxy_factory(watched(api.url), clock=clock)
    await quiet(proxy)
    clients = [await connect(proxy) for _ in range(100)]
    for ws in clients:
        await subscribe(ws)
    assert await proxy.process.events.watcher.tick() == 1
    api.default = flight("CANCELLED")
    await poll(proxy, clock)
    assert api.calls == 2
    events = [await frame(ws) for ws in clients]
    assert len({e["evtId"] for e in events}) == 1
    for ws in clients:
        await ws.close()
    await asyncio.sleep(0.1)
    assert proxy.process.events.watcher.topics == {}   # nobody subscribes: not polled any more
    await poll(proxy, clock)
    assert api.calls == 2


async def test_a_webhook_that_fails_three_times_gets_the_event_once_it_answers(fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    hook = await fake_upstream("hook")
    api.default = flight("SCHEDULED")
    hook.script(Fail(500, times=3))
    proxy = await proxy_factory(watched(api.url, webhook=hook.url + "/hooks/flights", topics=["flights/status/KE001"]),
                                clock=clock, env={"WEBHOOK_SECRET": "whsec-5e6f7a8b"})
    await quiet(proxy)
    await poll(proxy, clock)   # the baseline (the background poller may have taken it already)
    api.default = flight("DELAYED")
    await poll(proxy, clock)
    for _ in range(100):
        if proxy.process.events.webhooks.counters["delivered"]:
            break
        await asyncio.sleep(0.02)
    assert hook.calls == 4
    last = hook.seen[-1]
    body = orjson.loads(last.body)
    assert body["topic"] == "flights/status/KE001" and body["after"]["status"] == "DELAYED"
    assert last.headers["X-Event-Id"] == body["evtId"]
    timestamp = last.headers["X-Signature-Timestamp"]
    assert timestamp == str(int(clock.time()))
    expected = "sha256=" + hmac.new(b"whsec-5e6f7a8b", timestamp.encode() + b"." + last.body, hashlib.sha256).hexdigest()
    assert last.headers["X-Signature"] == expected
    assert {s.body for s in hook.seen} == {last.body}   # the same event each time
    assert proxy.process.events.webhooks.counters == {"delivered": 1, "failed_attempts": 3, "dead": 0}


# --- Redis: durable outbox, restarts, several replicas ------------------------------------------

@pytest.fixture
async def cleanup(redis_url, redis_prefix):
    yield
    client = aioredis.Redis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=f"{redis_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def redis_cache(redis_url: str, prefix: str) -> dict:
    return {"cache": {"backend": "redis", "url": redis_url, "prefix": prefix, "op_timeout": "1s"}}


async def test_an_event_survives_a_restart_between_emission_and_delivery(fake_upstream, clock, redis_url, redis_prefix, cleanup):
    api = await fake_upstream("kac")
    api.default = flight("SCHEDULED")
    text = watched(api.url, topics=["flights/status/KE001"], **redis_cache(redis_url, redis_prefix))
    first = await start_proxy(text, clock=clock)
    await first.process.events.watcher.stop()
    await poll(first, clock)   # the baseline
    api.default = flight("DELAYED")
    clock.advance(300)
    await first.process.events.watcher.tick()       # emitted into the stream, delivered to nobody
    await stop_proxy(first)
    api.default = flight("DEPARTED")                # and a change while no proxy runs
    second = await start_proxy(text, clock=clock)
    try:
        await second.process.events.watcher.stop()
        ws = await connect(second)
        await subscribe(ws, last_evt_id="0-0")
        await poll(second, clock)  # unless the background poller at start-up already did
        replayed, noticed = await frame(ws), await frame(ws)
        assert replayed["after"]["status"] == "DELAYED"   # emitted by the first proxy, delivered by the second
        # The last value lives in Redis, so the change made while no proxy ran is noticed too.
        assert noticed["before"]["status"] == "DELAYED" and noticed["after"]["status"] == "DEPARTED"
        assert noticed["evtId"] > replayed["evtId"]
        await no_frame(ws)
        state = await (await second.get("/health/integrations/outbox")).json()
        assert state["durable"] is True and state["length"] == 2
    finally:
        await stop_proxy(second)


async def test_two_replicas_deliver_each_webhook_event_once(fake_upstream, clock, redis_url, redis_prefix, cleanup):
    api = await fake_upstream("kac")
    hook = await fake_upstream("hook")
    api.default = flight("SCHEDULED")
    text = watched(api.url, webhook=hook.url + "/hook", topics=["flights/status/KE001"],
                   **redis_cache(redis_url, redis_prefix))
    env = {"WEBHOOK_SECRET": "s3cret-0000"}
    replicas = [await start_proxy(text, clock=clock, env=env), await start_proxy(text, clock=clock, env=env)]
    try:
        for replica in replicas:
            await replica.process.events.watcher.stop()
        clock.advance(300)
        await asyncio.gather(*(r.process.events.watcher.tick() for r in replicas))  # the baseline
        for status in ("DELAYED", "BOARDING", "DEPARTED", "ARRIVED"):
            api.default = flight(status)
            clock.advance(300)
            await asyncio.gather(*(r.process.events.watcher.tick() for r in replicas))
        for _ in range(150):
            if hook.calls >= 4:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        ids = [orjson.loads(s.body)["evtId"] for s in hook.seen]
        assert len(ids) == 4 and len(set(ids)) == 4
        assert [orjson.loads(s.body)["after"]["status"] for s in hook.seen] == ["DELAYED", "BOARDING", "DEPARTED", "ARRIVED"]
        client = aioredis.Redis.from_url(redis_url)
        pending = await client.xpending(f"{redis_prefix}{{events}}", "webhooks")
        await client.aclose()
        assert pending["pending"] == 0
    finally:
        for replica in replicas:
            await stop_proxy(replica)


async def test_a_webhook_that_never_answers_ends_in_the_dead_letter_stream(fake_upstream, clock, redis_url, redis_prefix, cleanup):
    api = await fake_upstream("kac")
    hook = await fake_upstream("hook")
    hook.default = Fail(503)
    api.default = flight("SCHEDULED")
    text = watched(api.url, webhook=hook.url + "/hook", topics=["flights/status/KE001"],
                   **redis_cache(redis_url, redis_prefix))
    proxy = await start_proxy(text, clock=clock, env={"WEBHOOK_SECRET": "s3cret-1111"})
    try:
        await proxy.process.events.watcher.stop()
        await poll(proxy, clock)   # the baseline
        api.default = flight("CANCELLED")
        clock.advance(300)
        await proxy.process.events.watcher.tick()
        for _ in range(150):
            if proxy.process.events.webhooks.counters["dead"]:
                break
            await asyncio.sleep(0.02)
        assert hook.calls == 4
        client = aioredis.Redis.from_url(redis_url)
        dead = await client.xrange(f"{redis_prefix}{{events}}:dead")
        await client.aclose()
        assert len(dead) == 1 and dead[0][1][b"reason"] == b"HTTP 503"
        metrics = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
        assert 'event_dead_letters_total{route="/flights/status/{flight}"} 1.0' in metrics
    finally:
        await stop_proxy(proxy)


async def test_topics_are_capped_per_connection_and_per_proxy(fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    proxy = await proxy_factory(watched(api.url, events={"max_topics": 3}), clock=clock)
    await quiet(proxy)
    ws = await connect(proxy)
    answers = [await subscribe(ws, f"flights/status/KE00{n}") for n in range(4)]
    assert [a["type"] for a in answers[:3]] == ["subscribed"] * 3
    assert answers[3]["error"] == "too_many_topics"
    assert len(proxy.process.events.watcher.topics) == 3
    assert (await subscribe(ws, "flights/status/KE000"))["type"] == "subscribed"  # one it already has


async def test_one_client_address_cannot_fill_the_topic_table(fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    limits = {"max_topics": 6, "max_topics_per_connection": 2, "max_topics_per_peer": 3}
    proxy = await proxy_factory(watched(api.url, events=limits), clock=clock)
    await quiet(proxy)
    first, second = await connect(proxy), await connect(proxy)
    assert [(await subscribe(first, f"flights/status/KE00{n}"))["type"] for n in (1, 2)] == ["subscribed"] * 2
    per_connection = await subscribe(first, "flights/status/KE003")
    assert per_connection["error"] == "too_many_topics"
    assert "events.max_topics_per_connection" in per_connection["detail"]
    assert (await subscribe(second, "flights/status/KE003"))["type"] == "subscribed"
    per_peer = await subscribe(second, "flights/status/KE004")  # a third connection would not help either
    assert per_peer["error"] == "too_many_topics" and "events.max_topics_per_peer" in per_peer["detail"]
    # A topic this address already holds costs nothing more, from any of its connections.
    assert (await subscribe(second, "flights/status/KE001"))["type"] == "subscribed"
    assert len(proxy.process.events.watcher.topics) == 3
    # Everyone else still has room.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as elsewhere:
        other = await elsewhere.ws_connect(proxy.url + "/events")
        assert [(await subscribe(other, f"flights/status/KE01{n}"))["type"] for n in (1, 2)] == ["subscribed"] * 2
        assert len(proxy.process.events.watcher.topics) == 5
        await other.close()
    # What a connection gives back (unsubscribing, closing) is the address's again.
    await first.send_str(orjson.dumps({"op": "unsubscribe", "topic": "flights/status/KE002"}).decode())
    assert (await frame(first))["type"] == "unsubscribed"
    await first.close()  # its KE001 is still held by the second connection
    third = await connect(proxy)
    assert (await subscribe(third, "flights/status/KE005"))["type"] == "subscribed"
    assert "max_topics_per_peer" in (await subscribe(third, "flights/status/KE006"))["detail"]
    await second.close()
    await asyncio.sleep(0.05)  # the proxy sees the close
    assert (await subscribe(third, "flights/status/KE006"))["type"] == "subscribed"
    assert set(proxy.process.events.watcher.topics) == {"flights/status/KE005", "flights/status/KE006"}
    await third.close()


def test_topic_quotas_are_read_from_the_events_settings():
    from proxy.config.parse import parse_config

    defaults = parse_config(watched("http://127.0.0.1:1"), "routes.yaml", {}).events
    assert (defaults.max_topics_per_connection, defaults.max_topics_per_peer) == (100, 250)
    given = parse_config(watched("http://127.0.0.1:1", events={"max_topics_per_connection": 7, "max_topics_per_peer": 9}),
                         "routes.yaml", {}).events
    assert (given.max_topics_per_connection, given.max_topics_per_peer) == (7, 9)


async def test_a_reload_that_removes_a_watch_tells_its_subscribers(fake_upstream, tmp_path, clock):
    from proxy.config.parse import load_config
    from proxy.ops.process import ProxyProcess

    api = await fake_upstream("kac")
    other = await fake_upstream("other")
    api.default = other.default = flight("SCHEDULED")
    path = tmp_path / "routes.yaml"
    path.write_text(watched(api.url))
    process = ProxyProcess(load_config(path, {}), clock=clock, env={})
    await process.start()
    await process.events.watcher.stop()
    host, port = process.addresses["main"]
    async with aiohttp.ClientSession() as client:
        try:
            ws = await client.ws_connect(f"http://{host}:{port}/events")
            await subscribe(ws)
            await subscribe(ws, "flights/status/OZ8915")
            await process.events.watcher.tick()
            assert api.calls == 2
            # The same watch on another upstream: topics follow the new table.
            path.write_text(watched(other.url))
            assert await process.reload("test") == []
            clock.advance(300)
            await process.events.watcher.tick()
            assert (api.calls, other.calls) == (2, 2)
            # The watch goes away: subscribers are told, nothing is polled any more.
            path.write_text(route_table({"flights": {"retry": "NONE", "routes": [{"match": "/flights/status/{flight}"}],
                                                     "upstreams": [{"name": "flights_kac", "url": other.url}]}}))
            assert await process.reload("test") == []
            told = [await frame(ws), await frame(ws)]
            assert {f["topic"] for f in told} == {"flights/status/KE001", "flights/status/OZ8915"}
            assert {f["error"] for f in told} == {"unknown_topic"}
            assert process.events.watcher.topics == {}
            clock.advance(300)
            assert await process.events.watcher.tick() == 0
        finally:
            await process.stop()


async def test_a_long_backlog_is_replayed_whole_and_in_order_through_a_small_queue(fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    proxy = await proxy_factory(watched(api.url, events={"client_queue": 10}), clock=clock)
    await quiet(proxy)
    outbox = proxy.process.events.outbox
    ids = []
    for n in range(30):
        clock.advance(1)
        event = await outbox.record_change("flights/status/KE001", "/flights/status/{flight}", "t",
                                           orjson.dumps({"n": n}))
        if event is not None:
            ids.append(event.evt_id)
    assert len(ids) == 29  # the first value is a baseline
    ws = await connect(proxy)
    await subscribe(ws, last_evt_id="0-0")
    got, acked = [], 0
    while len(got) < 29 or acked < 29:
        message = await frame(ws)
        if message["type"] == "acked":
            acked += 1
            continue
        assert message["type"] == "event", message
        got.append(message["evtId"])
        await ws.send_str(orjson.dumps({"op": "ack", "evtId": message["evtId"]}).decode())
    assert got == ids
    assert proxy.process.events.hub.describe()["dropped"] == 0


@pytest.mark.parametrize("bad", ["1_000-0", "99999999999999999999999-0", "12", "-1-0", "abc-1"])
async def test_an_odd_last_evt_id_is_refused_and_the_connection_stays(fake_upstream, proxy_factory, clock, bad):
    api = await fake_upstream("kac")
    proxy = await proxy_factory(watched(api.url), clock=clock)
    await quiet(proxy)
    ws = await connect(proxy)
    assert (await subscribe(ws, last_evt_id=bad))["error"] == "malformed"
    assert (await subscribe(ws))["type"] == "subscribed"


async def test_the_webhook_worker_recreates_its_group_when_the_stream_is_deleted(fake_upstream, clock, redis_url,
                                                                                redis_prefix, cleanup):
    api = await fake_upstream("kac")
    hook = await fake_upstream("hook")
    api.default = flight("SCHEDULED")
    text = watched(api.url, webhook=hook.url + "/hook", topics=["flights/status/KE001"],
                   **redis_cache(redis_url, redis_prefix))
    proxy = await start_proxy(text, clock=clock, env={"WEBHOOK_SECRET": "s3cret-2222"})
    try:
        await proxy.process.events.watcher.stop()
        await poll(proxy, clock)
        client = aioredis.Redis.from_url(redis_url)
        for _ in range(100):  # the worker has created its group
            groups = await client.xinfo_groups(f"{redis_prefix}{{events}}") if await client.exists(
                f"{redis_prefix}{{events}}") else []
            if groups:
                break
            await asyncio.sleep(0.02)
        await client.delete(f"{redis_prefix}{{events}}")  # takes the consumer group with it
        await client.aclose()
        api.default = flight("DIVERTED")
        await poll(proxy, clock)
        for _ in range(200):
            if hook.calls:
                break
            await asyncio.sleep(0.02)
        assert hook.calls == 1
        assert orjson.loads(hook.seen[0].body)["after"]["status"] == "DIVERTED"
    finally:
        await stop_proxy(proxy)
