"""Fallback over a service's upstreams, in order, within the request's deadline.

Every upstream gets its first try, in list order, before any is retried (fallback before retry):
a timeout, reset, refused connection or 5xx moves to the next upstream at once, so no caller pays
two timeouts on one hanging upstream while another may answer. Retries come after, round by round
over the upstreams that failed, each on its own upstream and after its own backoff. A round in
which two or more upstreams all answered 5xx is the last: that is an outage (or a request that
breaks every vendor alike), not one upstream's blip, and another round would only multiply the
calls to failing vendors and keep the caller waiting for the same error.
`fallback_before_retry: false` keeps the seed's order instead: each upstream's retries, then the next.

When a safe request with no copy to fall back on is late on an upstream (`hedge_after`), the same
request also goes to the next upstream that may be called, and the first answer wins; the other
attempt is cancelled and counts against its upstream as too slow.

The first upstream to answer (2xx/3xx, or a 4xx, which is the caller's problem and passed
through as it is) wins. Requests that are not safe to repeat move on only when the
previous upstream certainly never received them. When nothing answers, `UpstreamsFailed`
says why with the status the contract gives: 504 deadline, 503 every upstream skipped (with
the seconds until one may be tried again), 400 when a vendor's result code said the request
itself is wrong (`caller_error`), else 502.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Callable

from proxy import signals
from proxy.chain.attempt import Abandon, AttemptResult
from proxy.chain.exchange import Answer, AttemptRecord, Exchange
from proxy.chain.retries import RetryStage, Tries
from proxy.clock import Clock
from proxy.config.model import Upstream
from proxy.resilience.breaker import Breaker, State
from proxy.resilience.hedging import LatencyWindow
from proxy.resilience.outcome import SKIPPED, Outcome

_SKIP_VALUES = frozenset(o.value for o in SKIPPED)
# Hedged: the methods that read without changing anything, so two copies in flight are harmless.
_HEDGEABLE = frozenset({"GET", "HEAD", "OPTIONS"})


class UpstreamsFailed(Exception):
    """No upstream produced an answer to pass on."""

    def __init__(self, status: int, error: str, service: str, attempts: list[AttemptRecord],
                 last_status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.service = service
        self.attempts = list(attempts)
        self.last_status = last_status  # the last upstream HTTP status seen, for Cache-Status fwd-status
        self.retry_after = retry_after  # 503: seconds until the first upstream may be tried again, if known

    def body(self, request_id: str) -> dict[str, Any]:
        return {"error": self.error, "service": self.service,
                "attempts": [a.as_json() for a in self.attempts], "request_id": request_id}

    @property
    def timed_out(self) -> bool:
        """The deadline passed, or every upstream that was tried timed out."""
        if self.status == 504:
            return True
        tried = [a.outcome for a in self.attempts if a.outcome not in _SKIP_VALUES]
        return bool(tried) and all(o in (Outcome.TIMEOUT.value, Outcome.HEDGE_LOST.value, Outcome.DEADLINE.value)
                                   for o in tried)


def _all_said_5xx(round_: list[Tries]) -> bool:
    """Two or more upstreams were tried in this round and every one answered with a 5xx."""
    return len(round_) >= 2 and all(tries.result.outcome is Outcome.HTTP_5XX for tries in round_)


class RequestBodyTooLarge(Exception):
    """A streamed request body went past `server.max_request_body` while being forwarded."""


class _Walk:
    """One request's way through its service's upstreams."""

    __slots__ = ("sent", "last_status", "deadline_hit", "stopped", "waits")

    def __init__(self) -> None:
        self.sent: list[Tries] = []            # upstreams that were sent the request: candidates for retries
        self.last_status: int | None = None
        self.deadline_hit = False
        self.stopped = False                   # nothing more may be sent anywhere (body gone, not idempotent)
        self.waits: list[float | None] = []    # skipped upstreams: seconds until each may be tried again


async def _ends_within(task: asyncio.Task[Tries], seconds: float) -> bool:
    """Wait until `task` ends or `seconds` pass (real time on purpose: this races a network call, as
    the attempt's own timeout does); True when it ended. Every late-able request comes through
    here, so it is asyncio.wait's work without its sets and waiters: a future, a callback, a timer."""
    loop = task.get_loop()
    woken = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    task.add_done_callback(wake)
    timer = loop.call_later(seconds, wake)
    try:
        await woken
    finally:
        timer.cancel()
        task.remove_done_callback(wake)
    return task.done()


class _Racer:
    """One side of a hedge race: the upstream, its try's task, and how to tell it that it lost."""

    __slots__ = ("upstream", "task", "abandon")

    def __init__(self, upstream: Upstream, start: Callable[[Abandon], asyncio.Task[Tries]]) -> None:
        self.upstream = upstream
        self.abandon = Abandon()
        self.task = start(self.abandon)

    def tries(self) -> Tries:
        """The try's record: a lost one, or one still finishing in the background, reads as lost."""
        if self.task.done() and not self.task.cancelled():
            return self.task.result()
        return Tries(self.upstream, made=1, last=AttemptResult(Outcome.HEDGE_LOST, detail="another upstream answered first"))


class FallbackStage:
    def __init__(self, retry: RetryStage, clock: Clock, *, breakers: dict[str, Breaker] | None = None,
                 latencies: dict[str, LatencyWindow] | None = None,
                 emit: signals.Subscriber = signals.discard) -> None:
        self._retry = retry
        self._clock = clock
        self._breakers = breakers if breakers is not None else {}
        self._latencies = latencies if latencies is not None else {}
        self._emit = emit
        self._background: set[asyncio.Task[Tries]] = set()  # lost tries left to finish (see `_first_answer`)
        self._detached: dict[str, int] = {}  # upstream name -> how many of those are its

    async def __call__(self, exchange: Exchange) -> Answer:
        service = exchange.service
        upstreams = service.upstreams
        walk = _Walk()
        done: set[str] = set()
        for index, upstream in enumerate(upstreams):
            if upstream.name in done:
                continue  # already tried as the hedge of the one before
            if walk.stopped:
                break
            if exchange.deadline_at - self._clock.monotonic() <= 0:
                walk.deadline_hit = True
                exchange.attempts.append(AttemptRecord(upstream.name, Outcome.DEADLINE.value, None, "no time left"))
                continue
            first = len(walk.sent)
            answer = None
            for tries in await self._first(exchange, upstreams, index, done):
                answer = answer or self._settle(exchange, walk, tries, upstreams[0])
            if answer is not None:
                return answer
            if not service.fallback_first:
                answer = await self._retries(exchange, walk, walk.sent[first:], upstreams[0])
                if answer is not None:
                    return answer
        gave_up = exchange.first_round_failed
        if gave_up is not None and not gave_up.done():
            gave_up.set_result(self._failure(exchange, walk))  # what it would raise were no retry left
        if service.fallback_first:
            answer = await self._retries(exchange, walk, list(walk.sent), upstreams[0])
            if answer is not None:
                return answer
        raise self._failure(exchange, walk)

    # --- first tries, hedged when late ------------------------------------------------------

    async def _first(self, exchange: Exchange, upstreams: tuple[Upstream, ...], index: int,
                     done: set[str]) -> list[Tries]:
        upstream = upstreams[index]
        done.add(upstream.name)
        delay = self._hedge_delay(exchange, upstreams, index)
        if delay is None:
            return [await self._retry.first(upstream, exchange)]
        return await self._race(exchange, upstreams, index, done, delay)

    def _hedge_delay(self, exchange: Exchange, upstreams: tuple[Upstream, ...], index: int) -> float | None:
        """How long to wait for `upstreams[index]` before hedging, or None: never hedge this try."""
        upstream = upstreams[index]
        if upstream.hedge is None or not exchange.may_hedge or exchange.method not in _HEDGEABLE \
                or exchange.body or not exchange.replayable or index == len(upstreams) - 1:
            return None
        breaker = self._breakers.get(upstream.name)
        if breaker is not None and (breaker.state is not State.CLOSED or breaker.resting):
            return None  # a probe must get its whole answer: that is how the breaker learns the upstream is back
        latency = self._latencies.get(upstream.name)
        delay = upstream.hedge.delay(latency.p95 if latency is not None else None)
        if delay >= min(upstream.timeout, exchange.deadline_at - self._clock.monotonic()):
            return None  # the attempt ends first anyway, and the next upstream follows
        return delay

    def _hedge_target(self, upstreams: tuple[Upstream, ...], index: int, done: set[str]) -> Upstream | None:
        """The next upstream after `index` that may be called right now."""
        for upstream in upstreams[index + 1:]:
            breaker = self._breakers.get(upstream.name)
            if upstream.name not in done and (breaker is None or breaker.would_allow()):
                return upstream
        return None

    async def _race(self, exchange: Exchange, upstreams: tuple[Upstream, ...], index: int, done: set[str],
                    delay: float) -> list[Tries]:
        """The first try on `upstreams[index]`, and a hedge to the next upstream if it is late."""
        upstream = upstreams[index]
        loop = asyncio.get_running_loop()
        original = _Racer(upstream, lambda abandon: loop.create_task(self._retry.first(upstream, exchange, abandon)))
        racers = [original]
        try:
            if await _ends_within(original.task, delay):
                return [original.task.result()]
            target = self._hedge_target(upstreams, index, done)
            budget = self._retry.budget(upstream)
            if target is None or (budget is not None and not budget.allows()):
                return [await original.task]
            done.add(target.name)
            hedge = _Racer(target, lambda abandon: loop.create_task(self._retry.first(target, exchange, abandon)))
            racers.append(hedge)
            winner = await self._first_answer(racers)
            if budget is not None and winner is not hedge:
                # A hedge that answers first did what a fallback does; one that did not was load on
                # top of the original's work, and that is what the retry budget bounds.
                budget.spend()
            self._emit(signals.HedgeRaced(exchange.service.name, upstream.name, target.name,
                                         "none" if winner is None else "original" if winner is original else "hedge",
                                         exchange.request_id))
            return [racer.tries() for racer in racers]
        finally:
            running = [racer.task for racer in racers if not racer.task.done() and racer.task not in self._background]
            for task in running:
                task.cancel()  # the caller went away: nothing is lost, nothing recorded
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _first_answer(self, racers: list["_Racer"]) -> "_Racer | None":
        """Wait until one try has an answer to pass on (then give up the other) or every try has ended.

        A try given up is cancelled and recorded as lost (`hedge_lost`), except on an upstream whose
        answer times are not known yet: that one is left to answer (or time out) in the background,
        so its latency and health are learnt instead of guessed from a race against the first hedge
        — up to the upstream's `fail_threshold` tries at a time; past that, its silence says enough.
        """
        pending = {racer.task for racer in racers}
        winner = None
        while pending and winner is None:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for racer in racers:  # in order, so a tie goes to the original
                if racer.task in pending or racer.task.cancelled():
                    continue
                result = racer.task.result().result
                if winner is None and result.outcome.answered:
                    winner = racer
                elif racer is not winner:
                    result.discard()
        if winner is None:
            return None
        cancelled = []
        for racer in racers:
            if racer.task not in pending:
                continue
            if self._learning(racer.upstream):
                self._detach(racer.task, racer.upstream.name)
                continue
            racer.abandon.lost_to = winner.upstream.name
            racer.task.cancel()
            cancelled.append(racer.task)
        await asyncio.gather(*cancelled, return_exceptions=True)
        return winner

    def _learning(self, upstream: Upstream) -> bool:
        """Whether a lost try on `upstream` is left to finish: nothing is known of its answer times yet,
        and fewer than its breaker's `fail_threshold` such tries are still out."""
        latency = self._latencies.get(upstream.name)
        if latency is None or latency.p95 is not None:
            return False
        return self._detached.get(upstream.name, 0) < upstream.breaker.fail_threshold

    def _detach(self, task: asyncio.Task[Tries], name: str) -> None:
        """Let a lost try finish on its own; whatever it brings back is recorded and dropped."""
        self._detached[name] = self._detached.get(name, 0) + 1
        self._background.add(task)

        def finished(done: asyncio.Task[Tries]) -> None:
            self._background.discard(done)
            self._detached[name] -= 1
            if not done.cancelled() and done.exception() is None:
                done.result().result.discard()

        task.add_done_callback(finished)

    async def close(self) -> None:
        """Cancel the lost tries still finishing in the background."""
        detached = list(self._background)
        for task in detached:
            task.cancel()
        await asyncio.gather(*detached, return_exceptions=True)

    # --- results, retries, the final failure ---------------------------------------------------

    def _settle(self, exchange: Exchange, walk: _Walk, tries: Tries, primary: Upstream) -> Answer | None:
        """An answer to pass on, or None after noting what the try means for the rest of the walk."""
        result = tries.result
        if exchange.body_too_large:
            result.discard()
            raise RequestBodyTooLarge()
        if result.outcome.answered and result.reply is not None:
            reply = result.reply
            return Answer(status=reply.status, reason=reply.reason, headers=reply.headers, body=reply.body,
                          upstream=tries.upstream.name, stream=reply.stream, fallback=tries.upstream is not primary)
        if result.status is not None:
            walk.last_status = result.status
        result.discard()
        if result.outcome in SKIPPED:
            walk.waits.append(result.wait)
            return None
        if result.outcome is Outcome.CONNECT:
            # Never reached the upstream: nothing to undo, so the walk goes on whatever the method; a retry
            # (`retry_on: connect`, after its backoff) comes when no other upstream answered, unless the
            # host name does not exist or the breaker shut meanwhile (a refused connection trips it).
            if not result.final and tries not in walk.sent:
                walk.sent.append(tries)
            return None
        if tries not in walk.sent:
            walk.sent.append(tries)
        if not exchange.replayable:
            walk.stopped = True  # the body was streamed to this upstream and is gone
        elif not exchange.idempotent and result.outcome is not Outcome.KEY_REFUSED:
            walk.stopped = True  # it may have been processed: sending it elsewhere could do it twice
        return None

    async def _retries(self, exchange: Exchange, walk: _Walk, candidates: list[Tries],
                       primary: Upstream) -> Answer | None:
        """Round after round, one more try on each upstream that may be retried, until one answers
        or every upstream of a round said 5xx."""
        while candidates and not walk.stopped and not _all_said_5xx(candidates):
            retried = []
            for tries in candidates:
                if walk.stopped or exchange.deadline_at - self._clock.monotonic() <= 0:
                    return None
                if not await self._retry.again(tries, exchange):
                    continue
                retried.append(tries)
                answer = self._settle(exchange, walk, tries, primary)
                if answer is not None:
                    return answer
            candidates = retried
        return None

    def _failure(self, exchange: Exchange, walk: _Walk) -> UpstreamsFailed:
        service = exchange.service
        if walk.deadline_hit or exchange.deadline_at - self._clock.monotonic() <= 0:
            return UpstreamsFailed(504, "deadline_exceeded", service.name, exchange.attempts, walk.last_status)
        if exchange.attempts and all(a.outcome in _SKIP_VALUES for a in exchange.attempts) \
                and any(a.outcome != Outcome.NO_PATH.value for a in exchange.attempts):
            # Nothing was sent: every upstream was skipped (breaker open, resting, rate limited, keys resting).
            only_breakers = all(a.outcome in (Outcome.BREAKER_OPEN.value, Outcome.NO_PATH.value)
                                for a in exchange.attempts)
            error = "all_breakers_open" if only_breakers else "all_upstreams_unavailable"
            known = [wait for wait in walk.waits if wait is not None]
            retry_after = max(1.0, math.ceil(min(known))) if known else None
            return UpstreamsFailed(503, error, service.name, exchange.attempts, walk.last_status, retry_after)
        if any(a.outcome == Outcome.CALLER_ERROR.value for a in exchange.attempts):
            # A vendor said the request itself is wrong (a result code) and no other upstream answered it.
            return UpstreamsFailed(400, "invalid_request", service.name, exchange.attempts, walk.last_status)
        return UpstreamsFailed(502, "all_upstreams_failed", service.name, exchange.attempts, walk.last_status)
