"""`GET /events`: WebSocket delivery of watch events with acknowledgements.

Client → proxy frames (JSON):
    {"op": "subscribe", "topic": "flights/status/KE001", "last_evt_id": "1733040000000-0"}   # last_evt_id optional
    {"op": "unsubscribe", "topic": "flights/status/KE001"}
    {"op": "ack", "evtId": "1733040000000-0"}
Proxy → client frames:
    {"type": "event", "evtId", "topic", "at", "before", "after", "redelivery": false}
    {"type": "subscribed", "topic"} / {"type": "unsubscribed", "topic"} / {"type": "acked", "evtId"}
    {"type": "error", "error": "unknown_topic" | "malformed" | "unknown_evt_id" | "overflow"
                      | "too_many_topics", "detail"}
A frame over `events.max_frame` is never read: aiohttp's reader closes the connection with 1009
(Message Too Big), the WebSocket's own word for it.

Delivery is at least once: an event not acknowledged within `ack_timeout` is sent again (same
evtId, `redelivery: true`), each time waiting twice as long. A client that reconnects with
`last_evt_id` gets, from the outbox, every event of its topics after that id. Every client has
its own bounded queue, so a slow one never delays the others; one that falls behind is told
(`overflow`) and disconnected, and can resume with `last_evt_id`.

Topics are capped per connection, per client address (across its connections) and per proxy,
so no one client can fill the table everyone's topics share, nor multiply the vendor's polls.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import WSMsgType, web

from proxy import signals
from proxy.background import cancel_and_wait, stop_if_asked
from proxy.clock import Clock
from proxy.config.model import EventsSettings
from proxy.watch.outbox import Event, Outbox, id_key
from proxy.watch.watcher import TooManyTopics, UnknownTopic, Watcher

log = structlog.get_logger("resilience-proxy")
_MAX_REDELIVERIES = 20
_DELIVERED_MEMORY = 4096  # ids per connection remembered to drop duplicate fan-out (local + stream tail)


@dataclass(slots=True)
class _Pending:
    event: Event
    due: float
    wait: float
    first: float
    sent: int = 1


@dataclass(eq=False)
class Client:
    """One WebSocket connection: its topics, its queue, what it has not acknowledged yet."""

    ws: web.WebSocketResponse
    queue: asyncio.Queue[bytes]
    number: int
    peer: str  # the client address its topics count against (see `peer_of`)
    topics: set[str] = field(default_factory=set)
    unacked: dict[str, _Pending] = field(default_factory=dict)
    delivered: OrderedDict[str, None] = field(default_factory=OrderedDict)  # recent ids sent (no duplicate fan-out)
    replays: set[asyncio.Task[None]] = field(default_factory=set)
    replaying: set[str] = field(default_factory=set)  # topics whose backlog is still being sent
    closing: bool = False


class Hub:
    """Fans events out to the WebSocket clients subscribed to their topics."""

    def __init__(self, watcher: Watcher, outbox: Outbox, settings: EventsSettings, clock: Clock,
                 emit: signals.Subscriber) -> None:
        self._watcher = watcher
        self._outbox = outbox
        self._settings = settings
        self._clock = clock
        self._emit = emit
        self._clients: set[Client] = set()
        self._by_topic: dict[str, set[Client]] = {}
        self._by_peer: dict[str, dict[str, int]] = {}  # peer -> topic -> how many of its connections hold it
        self._numbers = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.counters = {"delivered": 0, "acked": 0, "redelivered": 0, "dropped": 0}

    # --- fan-out ---------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """A new event (from this replica's watcher or the stream tail) for the local clients."""
        for client in list(self._by_topic.get(event.topic, ())):
            if event.topic not in client.replaying:  # a replay in progress delivers it, in order
                self._offer(client, event)

    def _offer(self, client: Client, event: Event, redelivery: bool = False) -> None:
        if client.closing or (not redelivery and event.evt_id in client.delivered):
            return
        frame = orjson.dumps(event.as_json(type="event", redelivery=redelivery))
        try:
            client.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self._overflow(client)
            return
        client.delivered[event.evt_id] = None
        if len(client.delivered) > _DELIVERED_MEMORY:
            client.delivered.popitem(last=False)
        if not redelivery:
            wait = self._settings.ack_timeout
            now = self._clock.monotonic()
            client.unacked[event.evt_id] = _Pending(event, now + wait, wait, now)
        self.counters["redelivered" if redelivery else "delivered"] += 1
        self._emit(signals.EventDelivered("ws", event.route, redelivery))

    def _overflow(self, client: Client) -> None:
        client.closing = True
        self.counters["dropped"] += 1
        self._emit(signals.ClientDropped("overflow"))
        log.warning("WebSocket client fell behind and is disconnected; it may resume with last_evt_id",
                    kind="events", client=client.number, queued=client.queue.qsize())

        async def tell_and_close() -> None:
            try:
                await client.ws.send_str(_error("overflow", "too many events waiting; reconnect with last_evt_id").decode())
                await client.ws.close(code=4008, message=b"overflow")
            except Exception:
                pass

        task = asyncio.get_running_loop().create_task(tell_and_close())
        self._closing.add(task)  # keep a reference until it is done
        task.add_done_callback(self._closing.discard)

    async def redeliver_due(self) -> int:
        """Send again every unacknowledged event whose wait is over; returns how many."""
        now = self._clock.monotonic()
        count = 0
        for client in list(self._clients):
            for pending in list(client.unacked.values()):
                if pending.due > now or client.closing:
                    continue
                if pending.sent > _MAX_REDELIVERIES:
                    del client.unacked[pending.event.evt_id]  # it stays in the outbox for a resume
                    continue
                pending.sent += 1
                pending.wait *= 2
                pending.due = now + pending.wait
                self._offer(client, pending.event, redelivery=True)
                count += 1
        return count

    async def run(self, granularity: float = 0.2, report_every: int = 25) -> None:
        for turn in itertools.count():
            stop_if_asked()
            await asyncio.sleep(granularity)
            try:
                await self.redeliver_due()
                if turn % report_every == 0:
                    await self.report()
            except Exception:
                stop_if_asked()
                log.exception("redelivery failed")

    async def report(self) -> None:
        """Tell metrics the outbox's length and the oldest unacknowledged event's age."""
        self._emit(signals.OutboxState(await self._outbox.length(), self.describe()["oldestUnackedAge"]))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for client in list(self._clients):
            await client.ws.close(code=1001, message=b"server shutting down")

    # --- one connection ------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self._settings.max_frame, heartbeat=30)
        await ws.prepare(request)
        client = Client(ws, asyncio.Queue(maxsize=self._settings.client_queue), next(self._numbers),
                        peer_of(request))
        self._clients.add(client)
        writer = asyncio.get_running_loop().create_task(self._write(client))
        try:
            resume_from = request.query.get("last_evt_id")
            async for message in ws:
                if message.type == WSMsgType.TEXT or message.type == WSMsgType.BINARY:
                    await self._on_frame(client, message.data, resume_from)
                elif message.type == WSMsgType.ERROR:
                    break  # aiohttp has closed it already (1009 for a frame over max_frame)
        finally:
            client.closing = True
            writer.cancel()
            for task in list(client.replays):
                task.cancel()
            self._clients.discard(client)
            for topic in list(client.topics):
                self._release(client, topic)
                self._watcher.unsubscribe(topic, client)
        return ws

    async def _write(self, client: Client) -> None:
        while True:
            frame = await client.queue.get()
            try:
                await client.ws.send_str(frame.decode())
            except Exception:
                return

    async def _send(self, client: Client, frame: bytes) -> None:
        try:
            client.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self._overflow(client)

    async def _on_frame(self, client: Client, data: str | bytes, resume_from: str | None) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            await self._send(client, _error("malformed", "frames are JSON objects"))
            return
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            await self._send(client, _error("malformed", 'expected {"op": "subscribe" | "unsubscribe" | "ack", ...}'))
            return
        op = message["op"]
        if op == "subscribe":
            await self._subscribe(client, message.get("topic"), message.get("last_evt_id") or resume_from)
        elif op == "unsubscribe":
            topic = message.get("topic")
            if isinstance(topic, str) and topic in client.topics:
                self._release(client, topic)
                self._watcher.unsubscribe(topic, client)
                await self._send(client, orjson.dumps({"type": "unsubscribed", "topic": topic}))
            else:
                await self._send(client, _error("unknown_topic", "not subscribed to that topic"))
        elif op == "ack":
            evt_id = message.get("evtId")
            pending = client.unacked.pop(evt_id, None) if isinstance(evt_id, str) else None
            if pending is None:
                await self._send(client, _error("unknown_evt_id", f"nothing unacknowledged with evtId {evt_id!r}"))
                return
            self.counters["acked"] += 1
            self._emit(signals.EventAcked("ws", pending.event.route))
            await self._send(client, orjson.dumps({"type": "acked", "evtId": evt_id}))
        else:
            await self._send(client, _error("malformed", f"unknown op {op!r}"))

    async def _subscribe(self, client: Client, topic: Any, last_evt_id: Any) -> None:
        if last_evt_id is not None:
            try:
                id_key(last_evt_id)
            except ValueError as exc:
                await self._send(client, _error("malformed", str(exc)))
                return
        try:
            name = self._watcher.resolve(topic).name
        except UnknownTopic as exc:
            await self._send(client, _error("unknown_topic", str(exc)))
            return
        refused = self._over_quota(client, name)
        if refused is None:
            try:
                self._watcher.subscribe(topic, client)
            except TooManyTopics as exc:
                refused = str(exc)
        if refused is not None:
            await self._send(client, _error("too_many_topics", refused))
            return
        self._hold(client, name)
        await self._send(client, orjson.dumps({"type": "subscribed", "topic": name}))
        if last_evt_id is not None:
            client.replaying.add(name)
            task = asyncio.get_running_loop().create_task(self._replay(client, name, last_evt_id))
            client.replays.add(task)
            task.add_done_callback(client.replays.discard)

    async def _replay(self, client: Client, topic: str, after: str) -> None:
        """Send a topic's events after `after`, a page at a time, as fast as the client takes them.

        Pages only fill half the client's queue, so live events keep room and a long backlog never
        overflows the queue it is catching up through.
        """
        room = max(1, self._settings.client_queue // 2)
        cursor = after
        try:
            while not client.closing:
                while client.queue.qsize() >= room:
                    await asyncio.sleep(0.01)
                    if client.closing:
                        return
                page = await self._outbox.after(cursor, {topic}, count=room - client.queue.qsize())
                if not page:
                    break
                for event in page:
                    self._offer(client, event)
                    cursor = event.evt_id
            # Live delivery takes over; one last read catches what was written while it was paused
            # (the delivered-ids memory drops anything sent twice).
            client.replaying.discard(topic)
            for event in await self._outbox.after(cursor, {topic}):
                self._offer(client, event)
        except Exception as exc:
            client.replaying.discard(topic)
            await self._send(client, _error("unavailable", f"the outbox cannot be read now ({type(exc).__name__}); "
                                            "resubscribe with last_evt_id later"))

    def _over_quota(self, client: Client, topic: str) -> str | None:
        """Why the client may not take one more topic, or None (a topic it holds costs nothing more)."""
        settings = self._settings
        if topic in client.topics:
            return None
        if len(client.topics) >= settings.max_topics_per_connection:
            return (f"at most {settings.max_topics_per_connection} topics per connection "
                    "(events.max_topics_per_connection)")
        held = self._by_peer.get(client.peer, {})
        if topic not in held and len(held) >= settings.max_topics_per_peer:
            return (f"at most {settings.max_topics_per_peer} topics per client address, across its connections "
                    "(events.max_topics_per_peer)")
        return None

    def _hold(self, client: Client, topic: str) -> None:
        if topic in client.topics:
            return
        client.topics.add(topic)
        self._by_topic.setdefault(topic, set()).add(client)
        held = self._by_peer.setdefault(client.peer, {})
        held[topic] = held.get(topic, 0) + 1

    def _release(self, client: Client, topic: str) -> None:
        client.topics.discard(topic)
        clients = self._by_topic.get(topic)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self._by_topic[topic]
        held = self._by_peer.get(client.peer, {})
        count = held.pop(topic, 0) - 1
        if count > 0:
            held[topic] = count
        elif not held:
            self._by_peer.pop(client.peer, None)

    def forget_topic(self, topic: str, detail: str) -> None:
        """A reload took the topic's watch away: tell its subscribers."""
        for client in list(self._by_topic.get(topic, ())):
            self._release(client, topic)
            frame = orjson.loads(_error("unknown_topic", detail))
            frame["topic"] = topic
            try:
                client.queue.put_nowait(orjson.dumps(frame))
            except asyncio.QueueFull:
                self._overflow(client)

    def describe(self) -> dict[str, Any]:
        now = self._clock.monotonic()
        waits = [now - p.first for c in self._clients for p in c.unacked.values()]
        delivered = self.counters["delivered"]
        return {"clients": len(self._clients), "unacked": sum(len(c.unacked) for c in self._clients),
                "oldestUnackedAge": round(max(waits), 3) if waits else None,
                "delivered": delivered, "acked": self.counters["acked"],
                "ackRatio": round(self.counters["acked"] / delivered, 4) if delivered else None,
                "redelivered": self.counters["redelivered"], "dropped": self.counters["dropped"]}


def peer_of(request: web.BaseRequest) -> str:
    """The address a client's topics count against: its IP, or its /64 for IPv6 (one host's share)."""
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return request.remote or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _error(error: str, detail: str) -> bytes:
    return orjson.dumps({"type": "error", "error": error, "detail": detail})
