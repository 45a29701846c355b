"""The per-request cache stage: fresh copy → (coalesced) upstreams → stale copy → error.

A fresh copy answers at once (`X-Cache: HIT`). Otherwise identical concurrent misses share
one trip through the fallback stage; its answer is stored when the rules allow. When the
trip fails, a copy still inside its stale window answers (`X-Cache: STALE`) and the
failure is reported as an event; without one, the failure goes up to become the error.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Awaitable, Callable

from multidict import CIMultiDict

from . import events
from .cache import Coalescer, Entry, Store, cache_key, parse_cache_control, request_bypass_reason, response_storable
from .cache.coalesce import CoalescedCallCancelled
from .clock import Clock
from .config import CacheRule, CacheSettings
from .exchange import Answer, Exchange
from .fallback import UpstreamsFailed

NAME = "resilience-proxy"
_CLUSTER_LOCK_MAX = 30.0  # seconds a replica may hold a fetch lock; expiry frees it if the replica dies
_CLUSTER_POLL = 0.02
Forward = Callable[[Exchange], Awaitable[Answer]]


_CONDITIONAL = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range", "Range")


def _conditional(exchange: Exchange) -> bool:
    """Conditional and range requests are answered by the upstream for this caller alone."""
    headers = exchange.headers
    return any(name in headers for name in _CONDITIONAL)


def _public(answer: Answer) -> bool:
    """No Set-Cookie and no private/no-store: an answer another caller may see."""
    headers = CIMultiDict(answer.headers)
    if "Set-Cookie" in headers:
        return False
    directives = parse_cache_control(headers)
    return "private" not in directives and "no-store" not in directives


def _credential(exchange: Exchange) -> str:
    headers = exchange.headers
    return "\n".join(headers.getall("Authorization", ())) + "\0" + "\n".join(headers.getall("Cookie", ()))


class CacheStage:
    def __init__(self, store: Store, forward: Forward, settings: CacheSettings, clock: Clock,
                 emit: events.Subscriber) -> None:
        self._store = store
        self._forward = forward
        self._settings = settings
        self._clock = clock
        self._emit = emit
        self._coalescer = Coalescer()
        self._refreshing: set[asyncio.Task[None]] = set()

    @property
    def store(self) -> Store:
        return self._store

    def rule_for(self, exchange: Exchange) -> CacheRule:
        return exchange.route.cache if exchange.route is not None else exchange.service.cache

    async def __call__(self, exchange: Exchange) -> Answer:
        rule = self.rule_for(exchange)
        service = exchange.service.name
        if not rule.enabled or _conditional(exchange) or request_bypass_reason(
                exchange.method, exchange.headers, keyed_by_credential=rule.key_by_credential):
            self._emit(events.CacheLookup(service, "bypass"))
            answer = await self._forward(exchange)
            answer.cache = "BYPASS"
            answer.cache_status = f"{NAME}; fwd=bypass"
            return answer
        credential = _credential(exchange) if rule.key_by_credential else None
        key = cache_key(service, exchange.method, exchange.path, exchange.query, exchange.headers,
                        vary=rule.vary, credential=credential)
        entry = await self._store.get(key)
        now = self._clock.time()
        if entry is not None and entry.is_fresh(now):
            self._emit(events.CacheLookup(service, "hit", entry.age(now)))
            return self._from_entry(entry, now, "HIT", f"{NAME}; hit; ttl={int(entry.fresh_until - now)}")
        if entry is not None and rule.stale_while_revalidate and entry.is_usable_stale(now):
            self._emit(events.CacheLookup(service, "stale", entry.age(now)))
            self._refresh_in_background(exchange, key, rule)
            return self._from_entry(entry, now, "STALE", f"{NAME}; fwd=stale; detail=revalidating", fallback=False)
        fetch = self._fetch_clustered if rule.coalesce == "cluster" and hasattr(self._store, "lock") else self._fetch
        try:
            try:
                # HEAD shares GET's cache key but never its in-flight call: a HEAD answer has no body.
                answer, shared = await self._coalescer.run(f"{exchange.method} {key}", lambda: fetch(exchange, key, rule))
            except CoalescedCallCancelled:
                # The caller we were waiting on went away; ask upstream ourselves.
                answer, shared = await self._fetch(exchange, key, rule), False
            if shared:
                if answer.stream is not None or not answer.shareable:
                    # One streamed body cannot feed two callers, and what may not be stored (Set-Cookie,
                    # private, no-store) may not be handed to another caller either.
                    answer, shared = await self._fetch(exchange, key, rule), False
                else:
                    self._emit(events.Coalesced(service))
        except UpstreamsFailed as failure:
            now = self._clock.time()
            if entry is not None and entry.is_usable_stale(now):
                return self._serve_stale(exchange, entry, now, failure)
            self._emit(events.CacheLookup(service, "miss"))
            raise
        self._emit(events.CacheLookup(service, "miss"))
        if shared:
            # Followers get their own copy of the answer object; the body bytes are shared.
            answer = Answer(status=answer.status, headers=answer.headers, body=answer.body, upstream=answer.upstream,
                            reason=answer.reason, cache=answer.cache, cache_status=answer.cache_status,
                            fallback=answer.fallback, shareable=True)
        return answer

    async def _fetch(self, exchange: Exchange, key: str, rule: CacheRule) -> Answer:
        answer = await self._forward(exchange)
        answer.cache = "MISS"
        body_len = None if answer.stream is not None else len(answer.body)
        reason = None if exchange.method == "GET" else "method"  # a HEAD answer has no body to keep
        reason = reason or response_storable(answer.status, CIMultiDict(answer.headers), body_len,
                                             cache_statuses=rule.statuses, max_body_bytes=self._settings.max_body_bytes)
        # The same rules decide whether waiting callers may share this answer.
        answer.shareable = reason is None or (reason in ("method", "status", "too-large") and _public(answer))
        if reason is None and answer.upstream is not None:
            now = self._clock.time()
            stale = min(rule.stale, self._settings.max_stale)
            await self._store.set(key, Entry(status=answer.status, headers=list(answer.headers), body=answer.body,
                                             stored_at=now, fresh_until=now + rule.ttl,
                                             stale_until=now + rule.ttl + stale, upstream=answer.upstream))
            answer.cache_status = f"{NAME}; fwd=miss; stored"
        else:
            answer.cache_status = f"{NAME}; fwd=miss"
        return answer

    async def _fetch_clustered(self, exchange: Exchange, key: str, rule: CacheRule) -> Answer:
        """One upstream call across every replica sharing Redis: a short lock per key.

        The replica that takes the lock fetches and stores; the others watch for the copy it
        writes. If the holder fails or Redis cannot tell, they fetch for themselves.
        """
        store: Any = self._store
        token = uuid.uuid4().hex
        lock_ttl = max(0.1, min(exchange.deadline_at - self._clock.monotonic(), _CLUSTER_LOCK_MAX))
        held = await store.lock(key, token, lock_ttl)
        if held:
            # Double-check: the previous holder may have stored a copy between our lookup and the lock.
            entry = await self._fresh_shared(store, key)
            if entry is not None:
                await store.unlock(key, token)
                return self._cluster_answer(entry)
        if held is False:
            entry = await self._await_cluster_copy(store, key, exchange.deadline_at)
            if entry is not None:
                self._emit(events.Coalesced(exchange.service.name))
                return self._cluster_answer(entry)
        try:
            return await self._fetch(exchange, key, rule)
        finally:
            if held:
                await store.unlock(key, token)

    async def _fresh_shared(self, store: Any, key: str) -> Entry | None:
        """The copy in Redis (not the local tier) if it is fresh."""
        entry = await store.get_shared(key)
        return entry if entry is not None and entry.is_fresh(self._clock.time()) else None

    def _cluster_answer(self, entry: Entry) -> Answer:
        return self._from_entry(entry, self._clock.time(), "MISS", f"{NAME}; fwd=miss; detail=coalesced-cluster")

    async def _await_cluster_copy(self, store: Any, key: str, deadline_at: float) -> Entry | None:
        while self._clock.monotonic() < deadline_at:
            await asyncio.sleep(_CLUSTER_POLL)  # polling Redis, not a backoff: real time on purpose
            entry = await self._fresh_shared(store, key)
            if entry is not None:
                return entry
            if not await store.locked(key):  # released (or Redis gone) without a fresh copy
                return await self._fresh_shared(store, key)
        return None

    def _from_entry(self, entry: Entry, now: float, state: str, cache_status: str, *, fallback: bool = False) -> Answer:
        return Answer(status=entry.status, headers=entry.headers, body=entry.body, upstream=entry.upstream,
                      cache=state, age=entry.age(now), cache_status=cache_status, fallback=fallback)

    def _serve_stale(self, exchange: Exchange, entry: Entry, now: float, failure: UpstreamsFailed) -> Answer:
        service = exchange.service.name
        age = entry.age(now)
        status = failure.last_status or failure.status
        reason = failure.error
        self._emit(events.CacheLookup(service, "stale", age))
        self._emit(events.StaleServed(service, exchange.path, age, entry.upstream, reason, exchange.request_id))
        cache_status = f"{NAME}; fwd=stale" + (f"; fwd-status={status}" if status else "") + f"; detail={reason}"
        return self._from_entry(entry, now, "STALE", cache_status, fallback=True)

    def _refresh_in_background(self, exchange: Exchange, key: str, rule: CacheRule) -> None:
        async def refresh() -> None:
            try:
                answer, _ = await self._coalescer.run(key, lambda: self._fetch(exchange, key, rule))
                if answer.stream is not None:
                    answer.stream.release()
            except (UpstreamsFailed, CoalescedCallCancelled):
                pass  # the stale copy keeps serving; the attempts were already reported

        task = asyncio.get_running_loop().create_task(refresh())
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def close(self) -> None:
        refreshing = list(self._refreshing)
        for task in refreshing:
            task.cancel()
        await asyncio.gather(*refreshing, return_exceptions=True)
        await self._store.close()

