"""The outbox: every watch event is written here before any delivery is tried.

With the Redis backend it is a Redis Stream (XADD with an approximate MAXLEN), so a restart
or a crash loses nothing and the stream id is the event id (monotonic, unique). Webhook
delivery shares the work between replicas through a consumer group; a delivery that keeps
failing moves to a dead-letter stream. With the memory backend it is a bounded in-process
log with the same interface: fine for one replica, NOT durable (a restart forgets it).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from proxy.clock import Clock


@dataclass(frozen=True, slots=True)
class Event:
    """`{evtId, topic, at, before, after}` plus the watched route it came from."""

    evt_id: str
    topic: str
    at: str
    before: Any
    after: Any
    route: str

    def as_json(self, **extra: Any) -> dict[str, Any]:
        body = {"evtId": self.evt_id, "topic": self.topic, "at": self.at, "before": self.before, "after": self.after}
        body.update(extra)
        return body


def _fields(event_id: str, fields: dict[Any, Any]) -> Event:
    def text(name: str) -> str:
        value = fields.get(name.encode(), fields.get(name, b""))
        return value.decode() if isinstance(value, bytes) else str(value)

    data = orjson.loads(text("data") or "{}")
    return Event(evt_id=event_id, topic=text("topic"), at=data.get("at", ""), before=data.get("before"),
                 after=data.get("after"), route=text("route"))


_EVT_ID = re.compile(r"^(\d{1,19})-(\d{1,19})$")


def id_key(evt_id: str) -> tuple[int, int]:
    """Order of stream ids (`<ms>-<seq>`); ValueError for anything else."""
    found = _EVT_ID.match(evt_id) if isinstance(evt_id, str) else None
    if found is None:
        raise ValueError(f"not an event id: {evt_id!r} (expected <milliseconds>-<sequence>)")
    return int(found.group(1)), int(found.group(2))


class Outbox(Protocol):
    durable: bool

    async def record_change(self, topic: str, route: str, at: str, value: bytes) -> Event | None:
        """Compare a topic's new value with its last one; on a change append the event. Atomic."""

    def forget(self, topic: str) -> None:
        """The topic is not polled any more."""

    async def after(self, evt_id: str, topics: set[str] | None = None, count: int = 1000) -> list[Event]: ...
    async def get(self, evt_id: str) -> Event | None: ...
    async def length(self) -> int | None: ...
    async def dead_letters(self) -> int | None: ...


class MemoryOutbox:
    """A bounded in-process log (not durable): the memory backend's outbox."""

    durable = False

    def __init__(self, clock: Clock, maxlen: int) -> None:
        self._clock = clock
        self._last: dict[str, bytes] = {}
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._seq = itertools.count()
        self._last_ms = 0
        self.dead: deque[tuple[Event, str]] = deque(maxlen=maxlen)

    def _next_id(self) -> str:
        ms = max(int(self._clock.time() * 1000), self._last_ms)
        if ms != self._last_ms:
            self._seq = itertools.count()
            self._last_ms = ms
        return f"{ms}-{next(self._seq)}"

    async def append(self, topic: str, route: str, at: str, before: Any, after: Any) -> Event:
        event = Event(self._next_id(), topic, at, before, after, route)
        self._events.append(event)
        return event

    def forget(self, topic: str) -> None:
        self._last.pop(topic, None)

    async def record_change(self, topic: str, route: str, at: str, value: bytes) -> Event | None:
        old = self._last.get(topic)
        self._last[topic] = value
        if old is None or old == value:  # the first value seen is a baseline, not a change
            return None
        return await self.append(topic, route, at, orjson.loads(old), orjson.loads(value))

    async def after(self, evt_id: str, topics: set[str] | None = None, count: int = 1000) -> list[Event]:
        start = id_key(evt_id)
        found = [e for e in self._events if id_key(e.evt_id) > start and (topics is None or e.topic in topics)]
        return found[:count]

    async def get(self, evt_id: str) -> Event | None:
        return next((e for e in self._events if e.evt_id == evt_id), None)

    async def length(self) -> int | None:
        return len(self._events)

    async def dead_letters(self) -> int | None:
        return len(self.dead)

    async def kill(self, event: Event, reason: str) -> None:
        self.dead.append((event, reason))


# Compare-and-set of a topic's last value and, on a change, XADD of the event — in one step, so a
# crash can never record the new value without its event (or emit a change twice across replicas).
# Returns {0} unchanged, {1} first value seen (a baseline, no event), {2, old, id} changed.
_RECORD = """
local old = redis.call('get', KEYS[1])
redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[6])
if old == ARGV[2] then return {0} end
if not old then return {1} end
local data = '{"at":"' .. ARGV[4] .. '","before":' .. old .. ',"after":' .. ARGV[2] .. '}'
local id = redis.call('xadd', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'topic', ARGV[1], 'route', ARGV[3], 'data', data)
return {2, old, id}
"""


# How long a topic's last value is kept after its last poll (a restart within it notices changes).
_LAST_VALUE_TTL = 7 * 86400


class RedisOutbox:
    """A Redis Stream per deployment, `<prefix>{<stream>}`, with `...:dead` for dead letters and
    `...:last:<topic>` for the last value of each watched topic (one hash tag: Redis Cluster friendly)."""

    durable = True

    def __init__(self, client: Any, key: str, maxlen: int, op_timeout: float = 1.0) -> None:
        self._client = client
        self.key = key
        self.dead_key = key + ":dead"
        self.state_key = key + ":last"
        self._maxlen = maxlen
        self._timeout = op_timeout

    def forget(self, topic: str) -> None:
        """Nothing to do: a topic's last value expires by itself when nobody polls it any more."""

    async def record_change(self, topic: str, route: str, at: str, value: bytes) -> Event | None:
        async with asyncio.timeout(self._timeout):
            result = await self._client.eval(_RECORD, 2, f"{self.state_key}:{topic}", self.key, topic, value, route,
                                             at, self._maxlen, _LAST_VALUE_TTL)
        if int(result[0]) != 2:
            return None
        raw_id = result[2]
        evt_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        return Event(evt_id, topic, at, orjson.loads(result[1]), orjson.loads(value), route)

    async def after(self, evt_id: str, topics: set[str] | None = None, count: int = 1000) -> list[Event]:
        found: list[Event] = []
        cursor = evt_id
        while len(found) < count:
            async with asyncio.timeout(self._timeout):
                batch = await self._client.xrange(self.key, min=f"({cursor}", max="+", count=500)
            if not batch:
                break
            for raw_id, fields in batch:
                event = _fields(raw_id.decode() if isinstance(raw_id, bytes) else raw_id, fields)
                cursor = event.evt_id
                if topics is None or event.topic in topics:
                    found.append(event)
        return found[:count]

    async def get(self, evt_id: str) -> Event | None:
        async with asyncio.timeout(self._timeout):
            batch = await self._client.xrange(self.key, min=evt_id, max=evt_id, count=1)
        if not batch:
            return None
        raw_id, fields = batch[0]
        return _fields(raw_id.decode() if isinstance(raw_id, bytes) else raw_id, fields)

    async def length(self) -> int | None:
        try:
            async with asyncio.timeout(self._timeout):
                return int(await self._client.xlen(self.key))
        except Exception:
            return None

    async def dead_letters(self) -> int | None:
        try:
            async with asyncio.timeout(self._timeout):
                return int(await self._client.xlen(self.dead_key))
        except Exception:
            return None

    async def kill(self, event: Event, reason: str) -> None:
        async with asyncio.timeout(self._timeout):
            await self._client.xadd(self.dead_key, {"evtId": event.evt_id, "topic": event.topic, "route": event.route,
                                                    "reason": reason[:500],
                                                    "data": orjson.dumps(event.as_json())},
                                    maxlen=self._maxlen, approximate=True)


def parse_event_fields(event_id: str, fields: dict[Any, Any]) -> Event:
    """An Event from a stream entry (used by the webhook worker's XREADGROUP)."""
    return _fields(event_id, fields)
