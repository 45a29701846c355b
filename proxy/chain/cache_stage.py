"""The per-request cache stage: fresh copy → (coalesced) upstreams → stale copy → error.

A fresh copy answers at once (`X-Cache: HIT`). A copy past its ttl but inside its stale window
is refreshed, once per key at a time, in a task of its own: the request that started the refresh
waits at most `stale_if_slow` for it and otherwise answers with the copy (`X-Cache: STALE`), and
requests arriving while it runs answer with the copy at once; the refresh goes on and stores what
it gets, so no caller waits on a slow vendor while a usable copy exists. Without any copy,
identical concurrent misses share one trip through the fallback stage (which may hedge a late
upstream); its answer is stored when the rules allow. When the trip fails, a copy still inside its
stale window answers; without one, the failure goes up to become the error. Every stale answer is
reported with its reason.

An answer whose `Vary` names request headers the key does not cover (RFC 9111 §4.1) is stored as
one of at most `MAX_VARIANTS` variants under a vary index (see `proxy.cache.entry`); a request is
answered only from the variant its own headers select, fresh or stale, and shares an in-flight
call only with requests that select the same one. `Vary: *` is never stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any, Awaitable, Callable

from multidict import CIMultiDict

from proxy import signals
from proxy.cache import (
    KEYED_HEADERS,
    Coalescer,
    Entry,
    Store,
    cache_key,
    parse_cache_control,
    request_bypass_reason,
    response_storable,
    variant_key,
    vary_covered,
    vary_names,
)
from proxy.cache.coalesce import CoalescedCallCancelled
from proxy.cache.entry import vary_index
from proxy.cache.rules import is_conditional
from proxy.chain.exchange import Answer, Exchange
from proxy.chain.fallback import UpstreamsFailed
from proxy.clock import Clock
from proxy.config.model import CacheRule, CacheSettings

NAME = "resilience-proxy"
_CLUSTER_LOCK_MAX = 30.0  # seconds a replica may hold a fetch lock; expiry frees it if the replica dies
_CLUSTER_POLL = 0.02
# Variants kept per key: a caller cycling through Accept values cannot fill the cache with one URL.
MAX_VARIANTS = 8
Forward = Callable[[Exchange], Awaitable[Answer]]


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


@dataclasses.dataclass(slots=True)
class _Copy:
    """Where a request's copy lives (see the module docstring on Vary)."""

    primary: str             # the request's cache key
    key: str                 # the copy's key: `primary`, or that of the variant the vary index selects
    index: Entry | None      # the vary index under `primary`, if there is one
    entry: Entry | None      # the copy the request may be answered from, if there is one
    keyed: frozenset[str]    # request headers `primary` covers (lower case)

    @property
    def covered(self) -> frozenset[str]:
        """Request headers that are the same for every request with this copy's key."""
        return self.keyed if self.index is None else self.keyed | frozenset(self.index.vary)


class CacheStage:
    """See the module's text. `callable(service)` says whether any upstream of the service may be
    called now (its breaker lets an attempt through): when none may, a copy answers without a refresh."""

    def __init__(self, store: Store, forward: Forward, settings: CacheSettings, clock: Clock,
                 emit: signals.Subscriber, callable: Callable[[Any], bool] = lambda service: True) -> None:
        self._store = store
        self._forward = forward
        self._callable = callable
        self._settings = settings
        self._clock = clock
        self._emit = emit
        self._coalescer = Coalescer()
        self._refreshes: dict[str, _Refresh] = {}  # cache key -> the refresh in flight for it

    @property
    def store(self) -> Store:
        return self._store

    @property
    def refreshing(self) -> int:
        """Copies being refreshed in the background right now."""
        return len(self._refreshes)

    def rule_for(self, exchange: Exchange) -> CacheRule:
        return exchange.route.cache if exchange.route is not None else exchange.service.cache

    async def __call__(self, exchange: Exchange) -> Answer:
        rule = self.rule_for(exchange)
        service = exchange.service.name
        if not rule.enabled or is_conditional(exchange.headers) or request_bypass_reason(
                exchange.method, exchange.headers, keyed_by_credential=rule.key_by_credential,
                has_body=bool(exchange.body) or exchange.body_stream is not None):
            self._emit(signals.CacheLookup(service, "bypass"))
            exchange.may_hedge = True  # no copy can stand in for a late upstream
            answer = await self._forward(exchange)
            answer.cache = "BYPASS"
            answer.cache_status = f"{NAME}; fwd=bypass"
            return answer
        credential = _credential(exchange) if rule.key_by_credential else None
        primary = cache_key(service, exchange.method, exchange.path, exchange.query, exchange.headers,
                            vary=rule.vary, credential=credential)
        trace = exchange.trace if exchange.trace is not None and exchange.trace.wall_ns else None
        looked_at = self._clock.monotonic() if trace is not None else 0.0  # timed only for an exported span
        copy = await self._lookup(exchange, primary, KEYED_HEADERS.union(name.lower() for name in rule.vary))
        if trace is not None:
            trace.lookup = (looked_at, self._clock.monotonic())
        entry = copy.entry
        now = self._clock.time()
        if entry is not None and entry.is_fresh(now):
            self._emit(signals.CacheLookup(service, "hit", entry.age(now)))
            return self._from_entry(entry, now, "HIT", f"{NAME}; hit; ttl={int(entry.fresh_until - now)}")
        usable = entry is not None and entry.is_usable_stale(now)
        if usable and rule.stale_if_slow is not None:
            assert entry is not None
            return await self._revalidate(exchange, copy, rule, entry)
        exchange.may_hedge = not usable
        fetch = self._fetcher(rule)
        try:
            try:
                # HEAD shares GET's cache key but never its in-flight call: a HEAD answer has no body.
                answer, shared = await self._coalescer.run(f"{exchange.method} {copy.key}",
                                                           lambda: fetch(exchange, copy, rule))
            except CoalescedCallCancelled:
                # The caller we were waiting on went away; ask upstream ourselves.
                answer, shared = await self._fetch(exchange, copy, rule), False
            if shared:
                if answer.stream is not None or not answer.shareable:
                    # One streamed body cannot feed two callers, and what may not be stored (Set-Cookie,
                    # private, no-store, a Vary this key does not cover) may not be handed to another caller.
                    answer, shared = await self._fetch(exchange, copy, rule), False
                else:
                    self._emit(signals.Coalesced(service))
        except UpstreamsFailed as failure:
            if entry is not None and entry.is_usable_stale(self._clock.time()):
                return self._serve_stale(exchange, entry, copy.key, _stale_reason(failure), failure)
            self._emit(signals.CacheLookup(service, "miss"))
            raise
        self._emit(signals.CacheLookup(service, "miss"))
        if shared:
            # Followers get their own copy of the answer object; the body bytes are shared.
            answer = Answer(status=answer.status, headers=answer.headers, body=answer.body, upstream=answer.upstream,
                            reason=answer.reason, cache=answer.cache, cache_status=answer.cache_status,
                            fallback=answer.fallback, shareable=True)
        return answer

    async def _lookup(self, exchange: Exchange, primary: str, keyed: frozenset[str]) -> _Copy:
        """The copy this request may be answered from: under its key, or the variant a vary index there selects."""
        entry = await self._store.get(primary)
        if entry is None or not entry.is_index:
            return _Copy(primary, primary, None, _usable(entry, keyed), keyed)
        copy = _Copy(primary, variant_key(primary, entry.vary, exchange.headers), entry, None, keyed)
        if copy.key in entry.variants:
            copy.entry = _usable(await self._store.get(copy.key), copy.covered)
        return copy

    def _fetcher(self, rule: CacheRule) -> Callable[[Exchange, _Copy, CacheRule], Awaitable[Answer]]:
        return self._fetch_clustered if rule.coalesce == "cluster" and hasattr(self._store, "lock") else self._fetch

    async def _revalidate(self, exchange: Exchange, copy: _Copy, rule: CacheRule, entry: Entry) -> Answer:
        """A copy past its ttl: refresh it (once per key at a time) and wait at most `stale_if_slow` for that."""
        key = copy.key
        if key in self._refreshes:
            return self._serve_stale(exchange, entry, key, "revalidating")  # somebody is already refreshing it
        if not self._callable(exchange.service):
            # Every breaker is open (or its upstream resting): a refresh would be turned away at once.
            return self._serve_stale(exchange, entry, key, "breaker_open", detail="all_breakers_open")
        refresh = self._refresh(exchange, copy, rule)
        if rule.stale_if_slow == 0:
            return self._serve_stale(exchange, entry, key, "revalidating")
        # Real time on purpose: this races the refresh's network calls, as their own timeouts do.
        gave_up = refresh.exchange.first_round_failed
        assert gave_up is not None
        done, _ = await asyncio.wait({refresh.task, gave_up}, timeout=rule.stale_if_slow,
                                     return_when=asyncio.FIRST_COMPLETED)
        exchange.attempts.extend(refresh.exchange.attempts)  # what the refresh did so far, for this request's log
        if not done:
            return self._serve_stale(exchange, entry, key, "slow")
        if refresh.task not in done:
            # Every upstream failed its first try: the copy answers now, not after the retries'
            # backoff; they go on in the background and store what they get.
            failure = gave_up.result()
            assert isinstance(failure, UpstreamsFailed)
            return self._serve_stale(exchange, entry, key, _stale_reason(failure), failure)
        refresh.claimed = True
        try:
            answer = refresh.task.result()
        except UpstreamsFailed as failure:
            if entry.is_usable_stale(self._clock.time()):
                return self._serve_stale(exchange, entry, key, _stale_reason(failure), failure)
            self._emit(signals.CacheLookup(exchange.service.name, "miss"))
            raise
        finally:
            # The failure, raised here, has this frame in its traceback: were the task that holds the
            # failure still in the frame, the whole request would wait in a cycle for the collector.
            del refresh, done
        self._emit(signals.CacheLookup(exchange.service.name, "miss"))
        return answer

    def _refresh(self, exchange: Exchange, copy: _Copy, rule: CacheRule) -> "_Refresh":
        """Fetch a new copy in a task of its own, which outlives the request that started it."""
        # A GET, whatever asked: it is the GET copy that is refreshed (a HEAD answer is never stored).
        own = dataclasses.replace(exchange, method="GET", attempts=[], may_hedge=False,
                                  first_round_failed=asyncio.get_running_loop().create_future())
        key = copy.key
        refresh = _Refresh(own, asyncio.get_running_loop().create_task(self._fetcher(rule)(own, copy, rule)))
        self._refreshes[key] = refresh

        def finished(task: asyncio.Task[Answer]) -> None:
            if self._refreshes.get(key) is refresh:
                del self._refreshes[key]
            if task.cancelled():
                return
            error = task.exception()
            if error is not None:
                if not isinstance(error, UpstreamsFailed):  # a bug, not a vendor: say so where bugs are said
                    task.get_loop().call_exception_handler({"message": "a cache refresh failed", "exception": error,
                                                            "task": task})
                return  # a failed refresh leaves the copy serving; its attempts were already reported
            if not refresh.claimed and task.result().stream is not None:
                task.result().stream.release()  # nobody is left to read a streamed answer

        refresh.task.add_done_callback(finished)
        return refresh

    async def _fetch(self, exchange: Exchange, copy: _Copy, rule: CacheRule) -> Answer:
        answer = await self._forward(exchange)
        answer.cache = "MISS"
        body_len = None if answer.stream is not None else len(answer.body)
        headers = CIMultiDict(answer.headers)
        reason = None if exchange.method == "GET" else "method"  # a HEAD answer has no body to keep
        reason = reason or response_storable(answer.status, headers, body_len,
                                             cache_statuses=rule.statuses, max_body_bytes=self._settings.max_body_bytes)
        # The same rules decide whether waiting callers may share this answer; they all have this copy's
        # key, so they may differ in any request header the key does not cover.
        answer.shareable = (reason is None or (reason in ("method", "status", "too-large") and _public(answer))) \
            and vary_covered(headers, copy.covered)
        if reason is None and answer.upstream is not None:
            now = self._clock.time()
            stale = min(rule.stale, self._settings.max_stale)
            entry = Entry(status=answer.status, headers=list(answer.headers), body=answer.body, stored_at=now,
                          fresh_until=now + rule.ttl, stale_until=now + rule.ttl + stale, upstream=answer.upstream)
            vary = tuple(sorted(vary_names(headers) - copy.keyed))
            if vary:
                await self._store_variant(exchange, copy.primary, vary, entry)
            else:
                await self._store.set(copy.primary, entry)  # replaces a vary index if the upstream stopped varying
            answer.cache_status = f"{NAME}; fwd=miss; stored"
        else:
            answer.cache_status = f"{NAME}; fwd=miss"
        return answer

    async def _store_variant(self, exchange: Exchange, primary: str, vary: tuple[str, ...], entry: Entry) -> None:
        """Store an answer that varies on `vary` as the variant this request selects, listed in the index."""
        key = variant_key(primary, vary, exchange.headers)
        await self._store.set(key, entry)
        index = await self._store.get(primary)  # read again: another variant may have been stored meanwhile
        kept = index.variants if index is not None and index.vary == vary else ()
        variants = tuple(k for k in kept if k != key) + (key,)
        for dropped in variants[:-MAX_VARIANTS]:
            await self._store.delete(dropped)
        stale_until = max(entry.stale_until, index.stale_until) if kept and index is not None else entry.stale_until
        await self._store.set(primary, vary_index(vary, variants[-MAX_VARIANTS:], entry.stored_at, stale_until))

    async def _fetch_clustered(self, exchange: Exchange, copy: _Copy, rule: CacheRule) -> Answer:
        """One upstream call across every replica sharing Redis: a short lock per key.

        The replica that takes the lock fetches and stores; the others watch for the copy it
        writes. If the holder fails or Redis cannot tell, they fetch for themselves.
        """
        store: Any = self._store
        key = copy.key
        token = uuid.uuid4().hex
        lock_ttl = max(0.1, min(exchange.deadline_at - self._clock.monotonic(), _CLUSTER_LOCK_MAX))
        held = await store.lock(key, token, lock_ttl)
        if held:
            # Double-check: the previous holder may have stored a copy between our lookup and the lock.
            entry = await self._fresh_shared(store, copy)
            if entry is not None:
                await store.unlock(key, token)
                return self._cluster_answer(entry)
        if held is False:
            entry = await self._await_cluster_copy(store, copy, exchange.deadline_at)
            if entry is not None:
                self._emit(signals.Coalesced(exchange.service.name))
                return self._cluster_answer(entry)
        try:
            return await self._fetch(exchange, copy, rule)
        finally:
            if held:
                await store.unlock(key, token)

    async def _fresh_shared(self, store: Any, copy: _Copy) -> Entry | None:
        """The copy in Redis (not the local tier) if it is fresh (and an answer this request may have)."""
        entry = _usable(await store.get_shared(copy.key), copy.covered)
        return entry if entry is not None and entry.is_fresh(self._clock.time()) else None

    def _cluster_answer(self, entry: Entry) -> Answer:
        return self._from_entry(entry, self._clock.time(), "MISS", f"{NAME}; fwd=miss; detail=coalesced-cluster")

    async def _await_cluster_copy(self, store: Any, copy: _Copy, deadline_at: float) -> Entry | None:
        while self._clock.monotonic() < deadline_at:
            await asyncio.sleep(_CLUSTER_POLL)  # polling Redis, not a backoff: real time on purpose
            entry = await self._fresh_shared(store, copy)
            if entry is not None:
                return entry
            if not await store.locked(copy.key):  # released (or Redis gone) without a fresh copy
                return await self._fresh_shared(store, copy)
        return None

    def _from_entry(self, entry: Entry, now: float, state: str, cache_status: str, *, fallback: bool = False) -> Answer:
        return Answer(status=entry.status, headers=entry.headers, body=entry.body, upstream=entry.upstream,
                      cache=state, age=entry.age(now), cache_status=cache_status, fallback=fallback)

    def _serve_stale(self, exchange: Exchange, entry: Entry, key: str, reason: str,
                     failure: UpstreamsFailed | None = None, detail: str | None = None) -> Answer:
        """The copy, as `X-Cache: STALE`, counted and logged with why (see `signals.StaleServed`)."""
        service = exchange.service.name
        now = self._clock.time()
        age = entry.age(now)
        detail = failure.error if failure is not None else detail or reason
        self._emit(signals.CacheLookup(service, "stale", age))
        self._emit(signals.StaleServed(service, exchange.path, age, entry.upstream, reason, exchange.request_id,
                                      detail, key, exchange.trace, self._clock.monotonic()))
        status = (failure.last_status or failure.status) if failure is not None else None
        cache_status = f"{NAME}; fwd=stale" + (f"; fwd-status={status}" if status else "") + f"; detail={detail}"
        return self._from_entry(entry, now, "STALE", cache_status, fallback=True)

    async def close(self) -> None:
        refreshing = [refresh.task for refresh in self._refreshes.values()]
        for task in refreshing:
            task.cancel()
        await asyncio.gather(*refreshing, return_exceptions=True)
        await self._store.close()


class _Refresh:
    """A copy's refresh in flight: its own exchange, its task, and whether a caller took its answer."""

    __slots__ = ("exchange", "task", "claimed")

    def __init__(self, exchange: Exchange, task: asyncio.Task[Answer]) -> None:
        self.exchange = exchange
        self.task = task
        self.claimed = False


def _usable(entry: Entry | None, covered: frozenset[str]) -> Entry | None:
    """`entry` if it is an answer that varies on no request header but those its key covers."""
    if entry is None or entry.is_index or not vary_covered(entry.headers, covered):
        return None
    return entry


def _stale_reason(failure: UpstreamsFailed) -> str:
    """The `reason` label of a stale answer that stood in for a failure."""
    if failure.status == 503:
        return "breaker_open"  # nothing was sent: every upstream was skipped
    return "timeout" if failure.timed_out else "error"

