"""Tries on one upstream: the first one, then retries by policy, backoff, Retry-After, budget, deadline.

Retries stay on one upstream; *when* an upstream is retried is the fallback stage's choice (by
default only once every other upstream has had its try). This stage makes the tries: the first
(with API-key rotation: a refused key is followed by the next key at once, outside the policy)
and each retry. A retry is made only when the request is safe to send twice, its body can be
replayed, the outcome is one the policy names, the budget allows it and the wait leaves time
before the deadline. The backoff counts from the end of the upstream's previous try, so time
spent on other upstreams meanwhile is not waited again. A `Retry-After` longer than the policy's
`max_delay` is not waited out here: the upstream rests (attempt stage) and the request goes on
without it.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from proxy import signals
from proxy.chain.attempt import Abandon, AttemptResult, AttemptStage
from proxy.chain.exchange import Exchange
from proxy.clock import Clock
from proxy.config.model import Upstream
from proxy.resilience.outcome import SKIPPED
from proxy.resilience.retry_policy import RetryBudget, parse_retry_after, retry_delay, should_retry

_NO_LIMIT = float("inf")


@dataclass(slots=True)
class Tries:
    """What one request has done on one upstream so far."""

    upstream: Upstream
    made: int = 0                    # attempts made, key rotations included
    retries: int = 0
    rotations: int = 0
    last: AttemptResult | None = None
    ended_at: float = 0.0            # monotonic end of the last attempt

    @property
    def result(self) -> AttemptResult:
        assert self.last is not None, "no try was made"
        return self.last


class RetryStage:
    def __init__(self, attempt: AttemptStage, budgets: dict[str, RetryBudget], clock: Clock,
                 emit: signals.Subscriber, rng: random.Random | None = None) -> None:
        self._attempt = attempt
        self._budgets = budgets
        self._clock = clock
        self._emit = emit
        self._rng = rng or random.Random()

    def budget(self, upstream: Upstream) -> RetryBudget | None:
        return self._budgets.get(upstream.name)

    async def first(self, upstream: Upstream, exchange: Exchange, abandon: Abandon | None = None) -> Tries:
        """The request's first try on `upstream` (it counts as one request in the retry budget)."""
        budget = self._budgets.get(upstream.name)
        if budget is not None:
            budget.record_request()
        tries = Tries(upstream)
        await self._try(tries, exchange, abandon)
        return tries

    async def again(self, tries: Tries, exchange: Exchange) -> bool:
        """Retry the upstream once, after its backoff, when everything allows it; False when not retried."""
        upstream = tries.upstream
        result = tries.result
        policy = upstream.retry
        outcome = result.outcome
        if outcome.answered or outcome in SKIPPED:
            return False
        if tries.retries >= policy.retries or not exchange.idempotent or not exchange.replayable:
            return False
        if not should_retry(policy, outcome, result.status):
            return False
        retry_after = None
        if result.status in (429, 503) and result.reply is not None:
            retry_after = parse_retry_after(result.reply.retry_after, self._clock.time())
            if retry_after is not None and retry_after > policy.max_delay:
                return False  # a longer rest than this policy waits: the upstream rests, the request goes on
        delay = retry_delay(policy, tries.retries + 1, self._rng, retry_after, _NO_LIMIT)
        assert delay is not None
        now = self._clock.monotonic()
        wait = max(0.0, tries.ended_at + delay - now)
        if wait >= exchange.deadline_at - now:
            return False  # no time left for another try here: let fallback or stale answer
        opens_in = self._attempt.wait_hint(upstream)
        if opens_in is None or opens_in > wait:
            return False  # its breaker (or a rest) will still turn the retry away: not worth the wait
        budget = self._budgets.get(upstream.name)
        if budget is not None and not budget.try_spend():
            self._emit(signals.RetryBudgetExhausted(upstream.service, upstream.name, exchange.request_id))
            return False
        result.discard()
        tries.retries += 1
        self._emit(signals.RetryScheduled(upstream.service, upstream.name, tries.made + 1, wait, exchange.request_id))
        await self._backoff(upstream, wait)
        await self._try(tries, exchange)
        return True

    async def _backoff(self, upstream: Upstream, seconds: float) -> None:
        """Wait `seconds`, or until the upstream's breaker opens (or it starts a rest) meanwhile:
        then the retry is turned away anyway, at once, and the request goes on without waiting."""
        if seconds <= 0:
            await self._clock.sleep(0.0)  # nothing to wait for (a stepped clock still notes the retry's wait)
            return
        shut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not shut.done():
                shut.set_result(None)

        forget = self._attempt.on_shut(upstream, wake)
        try:
            await self._clock.sleep(seconds, until=shut)
        finally:
            forget()

    async def _try(self, tries: Tries, exchange: Exchange, abandon: Abandon | None = None) -> None:
        upstream = tries.upstream
        while True:
            result = await self._attempt(upstream, exchange, tries.made + 1, abandon)
            tries.made += 1
            tries.last = result
            tries.ended_at = self._clock.monotonic()
            if result.rotated and tries.rotations < len(upstream.keys) and exchange.replayable:
                # A refused key is not the upstream failing: the next key goes at once, outside the policy.
                tries.rotations += 1
                result.discard()
                continue
            return
