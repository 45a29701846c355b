"""Wiring of watch events: watcher → outbox → (WebSocket hub, webhook worker), one place.

With the Redis backend the outbox is a Redis Stream shared by every replica: each replica
tails it so its own WebSocket clients also get events another replica detected, and the
webhook worker reads it through a consumer group. With the memory backend everything stays
in this process (and is not durable).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

import structlog

from proxy import signals
from proxy.background import cancel_and_wait, stop_if_asked
from proxy.clock import Clock
from proxy.config.model import Config
from proxy.fleet.connection import open_client, target_of
from proxy.watch.outbox import Event, MemoryOutbox, RedisOutbox, parse_event_fields
from proxy.watch.push import Hub
from proxy.watch.watcher import Watcher
from proxy.watch.webhooks import WebhookWorker

if TYPE_CHECKING:
    from proxy.chain.build import Runtime

log = structlog.get_logger("resilience-proxy")


class EventsSystem:
    """The watcher, outbox, WebSocket hub and webhook worker of one process, wired together.

    `current_runtime()` is the route table in force (topics and polls follow a reload).
    """

    def __init__(self, config: Config, *, current_runtime: Callable[[], "Runtime"], clock: Clock,
                 emit: signals.Subscriber) -> None:
        settings = config.events
        self._redis: Any = None
        if config.cache.backend == "redis":
            # Its own connections: blocking stream reads must not share the cache's 50 ms budget.
            self._redis = open_client(target_of(config.cache), socket_timeout=10, connect_timeout=2)
            self.outbox: Any = RedisOutbox(self._redis, f"{config.cache.prefix}{{{settings.stream}}}", settings.maxlen)
        else:
            self.outbox = MemoryOutbox(clock, settings.maxlen)
        self.watcher = Watcher(current_runtime, self.outbox, self._publish, clock=clock, emit=emit,
                               max_topics=settings.max_topics)
        self.hub = Hub(self.watcher, self.outbox, settings, clock, emit)
        self.webhooks = WebhookWorker(lambda: current_runtime().config, self.outbox, clock, emit, redis=self._redis)
        self._tail_task: asyncio.Task[None] | None = None
        self._started_webhooks = False

    def _publish(self, event: Event) -> None:
        self.hub.publish(event)
        if self._redis is None:
            self.webhooks.enqueue(event)

    async def _tail(self) -> None:
        """Hand events other replicas wrote to this replica's WebSocket clients."""
        last = "$"
        while True:
            stop_if_asked()
            try:
                batches = await self._redis.xread({self.outbox.key: last}, block=1000, count=100)
                for _, entries in batches or []:
                    for raw_id, fields in entries:
                        last = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                        self.hub.publish(parse_event_fields(last, fields))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stop_if_asked()
                log.warning(f"outbox tail: {exc}", kind="events")
                await asyncio.sleep(1.0)

    def start(self) -> None:
        self.watcher.start()
        self.hub.start()
        if self._redis is not None:
            self._tail_task = asyncio.get_running_loop().create_task(self._tail())
        self.config_changed()

    def config_changed(self) -> None:
        """After a reload: re-resolve topics (telling subscribers of dropped ones), start webhooks if new."""
        for topic in self.watcher.reconfigure():
            self.hub.forget_topic(topic, "the route table no longer watches this topic")
        if not self._started_webhooks and self.webhooks.any_webhooks():
            self._started_webhooks = True
            self.webhooks.start()

    async def stop(self) -> None:
        await self.watcher.stop()
        await self.hub.stop()
        await self.webhooks.stop()
        await cancel_and_wait(self._tail_task)
        if self._redis is not None:
            await self._redis.aclose()

    async def describe(self) -> dict[str, Any]:
        return {
            "backend": "redis" if self._redis is not None else "memory",
            "durable": self.outbox.durable,
            "length": await self.outbox.length(),
            "deadLetters": await self.outbox.dead_letters(),
            "topics": self.watcher.describe(),
            "websocket": self.hub.describe(),
            "webhooks": dict(self.webhooks.counters),
        }
