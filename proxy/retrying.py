"""Retries on one upstream: policy, backoff with full jitter, Retry-After, budget, deadline.

Retries stay on one upstream; when they are spent (or not allowed) the fallback stage
moves on. A retry is made only when the request is safe to send twice, its body can be
replayed, the outcome is one the policy names, the budget allows it and the backoff
leaves time before the deadline.
"""

from __future__ import annotations

import random

from . import events
from .attempt import AttemptResult, AttemptStage
from .clock import Clock
from .config import Upstream
from .exchange import Exchange
from .outcome import SKIPPED
from .retry import RetryBudget, parse_retry_after, retry_delay, should_retry


class RetryStage:
    def __init__(self, attempt: AttemptStage, budgets: dict[str, RetryBudget], clock: Clock,
                 emit: events.Subscriber, rng: random.Random | None = None) -> None:
        self._attempt = attempt
        self._budgets = budgets
        self._clock = clock
        self._emit = emit
        self._rng = rng or random.Random()

    async def __call__(self, upstream: Upstream, exchange: Exchange) -> AttemptResult:
        budget = self._budgets.get(upstream.name)
        if budget is not None:
            budget.record_request()
        policy = upstream.retry
        number = 1
        retries = 0
        rotations = 0
        while True:
            result = await self._attempt(upstream, exchange, number)
            number += 1
            outcome = result.outcome
            if result.rotated and rotations < len(upstream.keys) and exchange.replayable:
                # A refused key is not the upstream failing: the next key goes at once, outside the policy.
                rotations += 1
                result.discard()
                continue
            if outcome.answered or outcome in SKIPPED:
                return result
            if retries >= policy.retries or not exchange.idempotent or not exchange.replayable:
                return result
            if not should_retry(policy, outcome, result.status):
                return result
            retry_after = None
            if result.status in (429, 503) and result.reply is not None:
                retry_after = parse_retry_after(result.reply.retry_after, self._clock.time())
            remaining = exchange.deadline_at - self._clock.monotonic()
            delay = retry_delay(policy, retries + 1, self._rng, retry_after, remaining)
            if delay is None:
                return result  # no time left for another try here: let fallback or stale answer
            if budget is not None and not budget.try_spend():
                self._emit(events.RetryBudgetExhausted(upstream.service, upstream.name, exchange.request_id))
                return result
            result.discard()
            retries += 1
            self._emit(events.RetryScheduled(upstream.service, upstream.name, number, delay, exchange.request_id))
            await self._clock.sleep(delay)
