"""Webhook delivery of watch events: signed, retried with backoff, dead-lettered, shared by replicas.

With Redis, every replica reads the outbox stream through one consumer group, so each event is
delivered by one replica ("scale out the workers" means adding replicas); an event a replica
took but never finished (it crashed) is claimed by another after `claim_idle`. With the memory
backend the worker takes events from an in-process queue.

Each POST carries the event as JSON, `X-Event-Id`, `X-Signature-Timestamp: <unix seconds>` and
`X-Signature: sha256=<hex>` — an HMAC with the watch's `secret` of `<timestamp>.<body>`, so a
receiver can refuse old (replayed) deliveries. A delivery is done when the webhook answers 2xx; after
`attempts` failures the event goes to the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
from typing import Any, Callable

import aiohttp
import orjson
import structlog

from proxy import signals
from proxy.background import cancel_and_wait, stop_if_asked
from proxy.clock import Clock
from proxy.config.model import Config, Watch
from proxy.watch.outbox import Event, parse_event_fields

log = structlog.get_logger("resilience-proxy")
GROUP = "webhooks"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookWorker:
    """Delivers watch events to the webhooks the route table `current_config()` gives names (see the module)."""

    def __init__(self, current_config: Callable[[], Config], outbox: Any, clock: Clock, emit: signals.Subscriber, *,
                 redis: Any = None, consumer: str | None = None, base_delay: float = 1.0, max_delay: float = 60.0,
                 timeout: float = 10.0, claim_idle: float = 600.0) -> None:
        self._config = current_config
        self._outbox = outbox
        self._clock = clock
        self._emit = emit
        self._redis = redis
        self.consumer = consumer or f"{socket.gethostname()}-{id(self):x}"
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._timeout = timeout
        self._claim_idle = claim_idle
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=10_000)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.counters = {"delivered": 0, "failed_attempts": 0, "dead": 0}

    def _watch_of(self, event: Event) -> Watch | None:
        config = self._config()
        for _, route in config.watched_routes():
            if route.name == event.route and route.watch is not None and route.watch.webhook is not None:
                return route.watch
        return None

    def enqueue(self, event: Event) -> None:
        """Memory backend: the watcher hands events over here."""
        if self._watch_of(event) is not None:
            try:
                self._queue.put_nowait(event)
            except asyncio.QueueFull:
                log.error("webhook queue full: event dropped (memory backend is not durable)", evt_id=event.evt_id)

    async def deliver(self, event: Event) -> bool:
        """Send one event until the webhook takes it or its attempts run out; True when delivered."""
        watch = self._watch_of(event)
        if watch is None:
            return True  # no webhook for this route (any more): nothing to do
        body = orjson.dumps(event.as_json())
        headers = {"Content-Type": "application/json", "X-Event-Id": event.evt_id}
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        reason = ""
        for attempt in range(1, watch.attempts + 1):
            if watch.secret:  # signed at each attempt, so a late retry carries a fresh timestamp
                timestamp = str(int(self._clock.time()))
                headers["X-Signature-Timestamp"] = timestamp
                headers["X-Signature"] = signature(watch.secret, timestamp.encode() + b"." + body)
            try:
                async with self._session.post(str(watch.webhook), data=body, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=self._timeout),
                                              allow_redirects=False) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        self.counters["delivered"] += 1
                        self._emit(signals.EventDelivered("webhook", event.route))
                        self._emit(signals.EventAcked("webhook", event.route))
                        return True
                    reason = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"[:200]
            self.counters["failed_attempts"] += 1
            log.warning(f"Webhook delivery of {event.evt_id} failed ({reason}), attempt {attempt}/{watch.attempts}",
                        kind="webhook", evt_id=event.evt_id, route=event.route)
            if attempt < watch.attempts:
                await self._clock.sleep(min(self._max_delay, self._base_delay * 2 ** (attempt - 1)))
        await self._outbox.kill(event, reason)
        self.counters["dead"] += 1
        self._emit(signals.EventDeadLettered(event.route, event.evt_id, reason))
        log.error(f"Webhook delivery of {event.evt_id} gave up after {watch.attempts} attempts: dead-lettered",
                  kind="webhook", evt_id=event.evt_id, route=event.route, reason=reason)
        return False

    # --- Redis: a consumer group over the outbox stream ---------------------------------------

    async def ensure_group(self, start: str = "$") -> None:
        """Create the consumer group: at the stream's end the first time, from its start when the
        stream itself was deleted and recreated (then everything in it is new)."""
        try:
            await self._redis.xgroup_create(self._outbox.key, GROUP, id=start, mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def work_once(self, block_ms: int = 1000) -> int:
        """Read and deliver what this replica is given (new entries, then stale ones of dead replicas)."""
        if self._redis is None:
            event = await asyncio.wait_for(self._queue.get(), block_ms / 1000)
            await self.deliver(event)
            return 1
        handled = 0
        batches = await self._redis.xreadgroup(GROUP, self.consumer, {self._outbox.key: ">"}, count=10, block=block_ms)
        for _, entries in batches or []:
            for raw_id, fields in entries:
                handled += await self._handle(raw_id, fields)
        claimed = await self._redis.xautoclaim(self._outbox.key, GROUP, self.consumer,
                                               min_idle_time=int(self._claim_idle * 1000), start_id="0-0", count=10)
        for raw_id, fields in (claimed[1] if claimed else []):
            if fields:
                handled += await self._handle(raw_id, fields)
        return handled

    async def _handle(self, raw_id: Any, fields: Any) -> int:
        evt_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        await self.deliver(parse_event_fields(evt_id, fields))
        await self._redis.xack(self._outbox.key, GROUP, evt_id)  # delivered or dead-lettered: done here
        return 1

    async def run(self) -> None:
        group_ready = self._redis is None
        start = "$"
        while True:
            stop_if_asked()
            try:
                if not group_ready:
                    await self.ensure_group(start)  # in the loop: Redis may be down at start, or the stream deleted
                    group_ready = True
                await self.work_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stop_if_asked()
                if isinstance(exc, TimeoutError):
                    continue
                if "NOGROUP" in str(exc):
                    group_ready, start = False, "0"
                log.warning(f"webhook worker: {exc}", kind="webhook")
                await asyncio.sleep(1.0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._session is not None:
            await self._session.close()

    def any_webhooks(self) -> bool:
        return any(r.watch is not None and r.watch.webhook is not None
                   for _, r in self._config().watched_routes())
