"""Watching routes for changes: one poll per subscribed topic per interval, an event per change.

A topic names a watched route with its parameters (`flights/status/KE001?date=2024-12-01`).
Only topics someone subscribes to (or that a watch lists in `topics:`) are polled, and a
topic costs one poll per interval however many subscribers it has. A poll is a request like
any other — it goes through the chain, so the cache, breakers and fallback apply and an
outage does not multiply calls. When the fields a watch selects change, the event is written
to the outbox first, then handed to delivery.

With Redis, the last value of every topic lives in Redis and is compared-and-set together
with the event's XADD in one script, so replicas polling the same topic emit each change
once, a crash can never record a value without its event, and a restarted proxy still
notices a change that happened while it was down.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import parse_qsl, urlencode

import orjson
import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import signals
from proxy.adapters.transform import TransformError, decode_json, evaluate
from proxy.background import cancel_and_wait, stop_if_asked
from proxy.chain.exchange import Exchange
from proxy.chain.fallback import UpstreamsFailed
from proxy.clock import Clock
from proxy.config.model import Route, Service
from proxy.config.routing import UnsafePath, check_target
from proxy.observability.tracing import start_trace
from proxy.watch.outbox import Event, Outbox

if TYPE_CHECKING:
    from proxy.chain.build import Runtime

log = structlog.get_logger("resilience-proxy")
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class UnknownTopic(ValueError):
    """The topic names no watched route."""


class TooManyTopics(ValueError):
    """The proxy watches as many topics as it may (events.max_topics)."""


@dataclass(slots=True)
class Topic:
    name: str
    service: Service
    route: Route
    path: str
    query: tuple[tuple[str, str], ...]
    params: dict[str, str]
    subscribers: set[Any] = field(default_factory=set)
    static: bool = False
    due: float = 0.0
    polls: int = 0


def _iso(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Watcher:
    """Keeps the subscribed topics, polls the due ones, detects changes and emits events.

    Topics are resolved against, and polls go through the chain of, the route table
    `current_runtime()` gives at that moment (a reload swaps it); `clock` says when a topic is due.
    """

    def __init__(self, current_runtime: Callable[[], "Runtime"], outbox: Outbox,
                 publish: Callable[[Event], Awaitable[None] | None], *, clock: Clock,
                 emit: signals.Subscriber = signals.discard, max_topics: int = 1000, concurrency: int = 16) -> None:
        self._runtime = current_runtime
        self._clock = clock
        self._outbox = outbox
        self._publish = publish
        self._emit = emit
        self._max_topics = max_topics    # across every client: each topic is an upstream call per interval
        self._polls = asyncio.Semaphore(concurrency)  # a burst of due topics must not be a burst upstream
        self.topics: dict[str, Topic] = {}
        self._task: asyncio.Task[None] | None = None

    # --- topics --------------------------------------------------------------------------

    def resolve(self, topic: str) -> Topic:
        """Parse and check a topic; raises UnknownTopic with the reason."""
        if not isinstance(topic, str) or not topic or len(topic) > 512:
            raise UnknownTopic("a topic is a watched route's path, e.g. flights/status/KE001?date=2024-12-01")
        path_part, _, query_part = topic.partition("?")
        raw_path = "/" + path_part.lstrip("/")
        try:
            decoded = check_target(raw_path)
        except (UnsafePath, UnicodeDecodeError) as exc:
            raise UnknownTopic(str(exc)) from None
        config = self._runtime().config
        service = config.service_for(decoded)
        route, params = service.route_for(decoded) if service else (None, {})
        if service is None or route is None or route.watch is None:
            raise UnknownTopic(f"no watched route matches {topic!r}")
        query = tuple(sorted(parse_qsl(query_part, keep_blank_values=True)))
        name = decoded.lstrip("/") + ("?" + urlencode(query) if query else "")
        return Topic(name, service, route, raw_path, query, params)

    def subscribe(self, topic: str, subscriber: Any) -> str:
        resolved = self.resolve(topic)
        if resolved.name not in self.topics and len(self.topics) >= self._max_topics:
            raise TooManyTopics(f"this proxy already watches {self._max_topics} topics (events.max_topics)")
        current = self.topics.setdefault(resolved.name, resolved)
        if not current.subscribers and not current.static:
            current.due = 0.0  # a topic nobody watched before is polled at once (its baseline)
        current.subscribers.add(subscriber)
        self._emit(signals.TopicSubscribers(current.route.name, current.name, len(current.subscribers)))
        return current.name

    def unsubscribe(self, topic: str, subscriber: Any) -> None:
        current = self.topics.get(topic)
        if current is None:
            return
        current.subscribers.discard(subscriber)
        self._emit(signals.TopicSubscribers(current.route.name, current.name, len(current.subscribers)))
        if not current.subscribers and not current.static:
            self._drop(topic)  # nobody listens: stop polling it

    def _drop(self, topic: str) -> None:
        self.topics.pop(topic, None)
        self._outbox.forget(topic)

    def add_static_topics(self) -> list[str]:
        """Topics a watch lists under `topics:` are always polled (for webhook-only consumers)."""
        problems = []
        for _, route in self._runtime().config.watched_routes():
            for topic in route.watch.topics:  # type: ignore[union-attr]
                try:
                    resolved = self.resolve(topic)
                except UnknownTopic as exc:
                    problems.append(f"{topic}: {exc}")
                    continue
                self.topics.setdefault(resolved.name, resolved).static = True
        return problems

    def reconfigure(self) -> dict[str, list[Any]]:
        """After a reload: resolve every topic against the new table.

        Topics keep their subscribers and last values when their route is still watched (with
        the new route's upstreams, interval and fields); the others are dropped, and their
        subscribers returned so they can be told. Static topics follow the new `topics:` lists.
        """
        orphans: dict[str, list[Any]] = {}
        for name, topic in list(self.topics.items()):
            try:
                fresh = self.resolve(name)
            except UnknownTopic:
                orphans[name] = list(topic.subscribers)
                self._drop(name)
                continue
            topic.service, topic.route, topic.params = fresh.service, fresh.route, fresh.params
            topic.static = False
        for problem in self.add_static_topics():
            log.warning(f"watch topic ignored: {problem}", kind="watch")
        for name, topic in list(self.topics.items()):
            if not topic.subscribers and not topic.static:
                self._drop(name)
        return orphans

    # --- polling -------------------------------------------------------------------------

    async def tick(self) -> int:
        """Poll every topic that is due; returns how many were polled."""
        now = self._clock.monotonic()
        due = [t for t in list(self.topics.values()) if t.due <= now and (t.subscribers or t.static)]
        for topic in due:
            topic.due = now + topic.route.watch.interval  # type: ignore[union-attr]
        await asyncio.gather(*(self._poll(topic) for topic in due))
        return len(due)

    async def run(self, granularity: float = 0.5) -> None:
        while True:
            stop_if_asked()
            try:
                await self.tick()
            except Exception:
                stop_if_asked()
                log.exception("watch poll failed")
            await asyncio.sleep(granularity)

    def start(self, granularity: float = 0.5) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(granularity))

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _poll(self, topic: Topic) -> None:
        async with self._polls:
            await self._poll_now(topic)

    async def _poll_now(self, topic: Topic) -> None:
        runtime = self._runtime()
        clock = runtime.clock
        topic.polls += 1
        exchange = Exchange(
            request_id=f"watch-{topic.polls}-{topic.name}"[:128], method="GET", service=topic.service,
            route=topic.route, params=topic.params, path=topic.path,
            rest=topic.path[len(topic.service.prefix.rstrip("/")):], query=topic.query, headers=_NO_HEADERS,
            deadline_at=clock.monotonic() + topic.service.deadline,
            # A trace of its own per poll: the vendor gets a traceparent, as for a caller's request, and
            # the poll's attempt lines share one trace id (not sampled: a poll has no span to export).
            trace=start_trace(None, None, recording=False))
        try:
            answer = await runtime.chain(exchange)
        except UpstreamsFailed as failure:
            log.warning(f"Watch poll of {topic.name} failed: {failure.error}", kind="watch", topic=topic.name)
            return
        if answer.stream is not None:
            answer.stream.release()
            return
        if answer.status != 200:
            return
        try:
            selected = evaluate(topic.route.watch.fields, topic.params,  # type: ignore[union-attr]
                                decode_json(answer.body, answer.headers))
        except TransformError as exc:
            log.warning(f"Watch of {topic.name} cannot read the answer: {exc}", kind="watch", topic=topic.name)
            return
        value = orjson.dumps(selected, option=orjson.OPT_SORT_KEYS)
        try:
            event = await self._outbox.record_change(topic.name, topic.route.name, _iso(clock.time()), value)
        except Exception as exc:
            # The last value stays as it was, so the change is found again at the next poll.
            log.warning(f"Watch of {topic.name}: the outbox is unavailable ({exc}); will try again",
                        kind="watch", topic=topic.name)
            return
        if event is None:
            return
        self._emit(signals.WatchEventEmitted(topic.service.name, topic.route.name, event.evt_id))
        published = self._publish(event)
        if published is not None:
            await published

    def describe(self) -> dict[str, Any]:
        return {name: {"subscribers": len(t.subscribers), "static": t.static, "route": t.route.name,
                       "polls": t.polls} for name, t in self.topics.items()}
