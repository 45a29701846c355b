"""Wiring: the one place where the chain is assembled from a Config.

    resolve (target → service, route, key) → HIT (stage 0: a fresh in-process copy, no chain objects)
    → derived → cache (stale-if-slow) → coalesce → fallback over upstreams, hedging a late one
        → (retry → breaker and rest → timeout → HTTP call)

Per-request stages sit above per-attempt stages (Envoy's order). A `Runtime` holds one
assembled chain plus the objects that outlive a request (breakers, budgets, the store,
the HTTP sessions); a reload builds a new Runtime and swaps it in whole.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from proxy import signals
from proxy.adapters.quota import KeyRing, SharedTokenBucket, TokenBucket
from proxy.cache import MemoryStore, RedisStore, Store, TwoLevelStore
from proxy.chain.attempt import AttemptStage, ProbeLease
from proxy.chain.cache_stage import CacheStage
from proxy.chain.derive import DerivedStage
from proxy.chain.fallback import FallbackStage
from proxy.chain.resolve import Resolver
from proxy.chain.retries import RetryStage
from proxy.clock import Clock
from proxy.config.model import Config, Upstream
from proxy.fleet.connection import open_client, target_of
from proxy.resilience.breaker import Breaker
from proxy.resilience.hedging import LatencyWindow
from proxy.resilience.retry_policy import RetryBudget
from proxy.upstream.interface import Transport
from proxy.upstream.transport import HttpTransport


def build_store(config: Config, clock: Clock, emit: signals.Subscriber) -> Store:
    """The configured cache backend; Redis gets a small in-process tier in front of it."""
    settings = config.cache
    if settings.backend == "redis":
        remote = RedisStore(target_of(settings), prefix=settings.prefix, clock=clock, emit=emit,
                            op_timeout=settings.op_timeout, connect=open_client)
        local = MemoryStore(min(settings.max_bytes, 16 * 1024 * 1024), clock)
        return TwoLevelStore(remote, local, local_ttl=settings.local_ttl, clock=clock)
    return MemoryStore(settings.max_bytes, clock)


# Stage 0 answers a downstream request from its rendered bytes, so it lives with the front ends
# (proxy/downstream/hit.py): the process hands its factory in, and it is built here with the rest.
HitFactory = Callable[["Runtime"], Callable[[Any], Any]]


class Runtime:
    """One assembled chain and its long-lived parts.

    `resolve(raw_target)` is the route table's reading of a target (memoised for this table);
    `hit(request)` is stage 0 when a `hit` factory is given (else None: every request takes
    `chain`); `chain(exchange)` is the rest of the chain, outermost stage first.
    """

    def __init__(self, config: Config, *, clock: Clock, bus: signals.EventBus, store: Store | None = None,
                 transport: Transport | None = None, breakers: dict[str, Breaker] | None = None,
                 budgets: dict[str, RetryBudget] | None = None, latencies: dict[str, LatencyWindow] | None = None,
                 rng: random.Random | None = None, previous: "Runtime | None" = None,
                 hit: HitFactory | None = None, probe_lease: ProbeLease | None = None) -> None:
        # probe_lease: whether this replica sends a shared breaker's half-open probe (the fleet decides).
        self.config = config
        self.clock = clock
        self.active = 0  # requests running on this table; a reload retires it once they are done
        self.resolve = Resolver(config)
        self.bus = bus
        self.transport: Transport = transport or HttpTransport(config.server, client=config.upstream_client)
        self.breakers = breakers if breakers is not None else {}
        self.budgets = budgets if budgets is not None else {}
        self.latencies = latencies if latencies is not None else {}  # recent answer times: when to hedge
        for upstream in config.upstreams():
            self.breakers.setdefault(upstream.name, self._new_breaker(upstream))
            self.latencies.setdefault(upstream.name, LatencyWindow())
            if config.retry_budget.enabled:
                self.budgets.setdefault(upstream.name, RetryBudget(
                    clock, ratio=config.retry_budget.ratio, min_per_second=config.retry_budget.min_per_second,
                    window=config.retry_budget.window))
        self.store = store or build_store(config, clock, bus.emit)
        self.limiters = self._kept(previous, "rate_limit", self._new_limiter)
        self.keyrings = self._kept(previous, "keys", lambda u: KeyRing(u.keys, clock, u.key_cooldown))
        attempt = AttemptStage(self.transport, self.breakers, clock, bus.emit, limiters=self.limiters,
                               keyrings=self.keyrings, latencies=self.latencies,
                               strip_headers=config.server.strip_headers, probe_lease=probe_lease)
        retry = RetryStage(attempt, self.budgets, clock, bus.emit, rng)
        self.fallback = FallbackStage(retry, clock, breakers=self.breakers, latencies=self.latencies, emit=bus.emit)
        self.cache = CacheStage(self.store, self.fallback, config.cache, clock, bus.emit, callable=self._callable)
        self.chain = DerivedStage(self.cache)
        self.hit = hit(self) if hit is not None else None  # last: it reads the store and the resolver

    def _kept(self, previous: "Runtime | None", field: str, build: Any) -> dict[str, Any]:
        """Per-upstream quota state, kept across a reload when the upstream's setting is unchanged."""
        states: dict[str, Any] = {}
        for upstream in self.config.upstreams():
            setting = getattr(upstream, field)
            if not setting:
                continue
            before = previous.upstream(upstream.name) if previous is not None else None
            old_states = getattr(previous, "limiters" if field == "rate_limit" else "keyrings", {}) if previous else {}
            if before is not None and getattr(before, field) == setting and upstream.name in old_states:
                states[upstream.name] = old_states[upstream.name]
            else:
                states[upstream.name] = build(upstream)
        return states

    def _new_limiter(self, upstream: Upstream) -> TokenBucket | SharedTokenBucket:
        client = getattr(self.store, "redis_client", None)
        assert upstream.rate_limit is not None
        if client is not None:
            key = f"{self.config.cache.prefix}ratelimit:{upstream.name}"
            return SharedTokenBucket(upstream.rate_limit, self.clock, client, key, self.config.cache.op_timeout)
        return TokenBucket(upstream.rate_limit, self.clock)

    def _new_breaker(self, upstream: Upstream) -> Breaker:
        return Breaker(upstream.service, upstream.name, upstream.breaker, self.clock, self.bus.emit)

    def _callable(self, service: Any) -> bool:
        """Whether any upstream of `service` may be called now (its breaker lets an attempt through)."""
        return any(self.breakers[upstream.name].would_allow() for upstream in service.upstreams)

    def upstream(self, name: str) -> Upstream | None:
        for upstream in self.config.upstreams():
            if upstream.name == name:
                return upstream
        return None

    async def close(self) -> None:
        await self.fallback.close()
        await self.cache.close()
        await self.transport.close()
