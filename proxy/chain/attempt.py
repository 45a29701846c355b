"""One try at one upstream: breaker gate → quota → timeout → HTTP call → classified outcome.

This is the innermost, per-attempt stage. It asks the breaker for a permit and the rate
limit for a token, picks the upstream's current API key, bounds the call by the upstream's
timeout and what is left of the request's deadline, reads the result code inside the answer
(`result_codes`), normalises the answer (`transform`), feeds the outcome back to the breaker
and emits an `AttemptFinished` event (the external call log). A key the upstream refuses is
marked spent so the next attempt uses the next one; a `Retry-After` on a 429 or 503 rests the
key (when the key was refused) or the upstream, for every request; a spent daily quota rests
the key until the vendor's reset. An attempt that loses a hedge race is cancelled and recorded
as `hedge_lost`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from proxy import signals
from proxy.adapters.quota import KeyRing, SharedTokenBucket, TokenBucket, fingerprint
from proxy.adapters.transform import TransformError, decode_document, normalise
from proxy.adapters.vendor_codes import Meaning, Verdict, blamed_parameter
from proxy.chain.exchange import AttemptRecord, Exchange
from proxy.chain.rewrite import MaskedUrl, NoPathForUpstream, build_url, request_headers
from proxy.clock import Clock
from proxy.config.model import ServerSettings, Upstream
from proxy.resilience.breaker import Breaker
from proxy.resilience.hedging import LatencyWindow
from proxy.resilience.outcome import Outcome, from_status, is_breaker_failure
from proxy.resilience.retry_policy import parse_retry_after
from proxy.upstream.interface import AttemptError, Reply, Transport, UpstreamRequest

_UNREAD = object()  # an answer's body not decoded yet

# Shared breakers: whether this replica may send a half-open probe (the fleet lets one replica probe).
ProbeLease = Callable[[Upstream], Awaitable[bool]]
# Words in a 403 answer that say the key (not the request) is the problem.
_KEY_WORDS = ("quota", "limit", "key", "auth", "token", "credential", "subscription", "exceeded", "expired")


@dataclass(slots=True)
class AttemptResult:
    outcome: Outcome
    reply: Reply | None = None
    detail: str | None = None
    rotated: bool = False  # a key was refused and another one is ready: try again at once
    wait: float | None = None  # skipped: seconds until the upstream may be tried again, if known
    final: bool = False  # trying this upstream again cannot help (its host name does not exist)

    @property
    def status(self) -> int | None:
        return self.reply.status if self.reply is not None else None

    def discard(self) -> None:
        """Free the connection of a reply that will not be passed on."""
        if self.reply is not None:
            self.reply.release()


def _refuses_key(reply: Reply) -> bool:
    if reply.status in (401, 429):
        return True
    if reply.status == 403:
        text = reply.body[:4096].decode("utf-8", "replace").lower()
        return any(word in text for word in _KEY_WORDS)
    return False


class Abandon:
    """Handed to an attempt that may be given up: whoever cancels it because another attempt
    answered first sets `lost_to` before cancelling, so the attempt is recorded as lost, not lost track of."""

    __slots__ = ("lost_to",)

    def __init__(self) -> None:
        self.lost_to: str | None = None


class AttemptStage:
    """breaker → rate limit → key → timeout → transport → transform, for one attempt."""

    def __init__(self, transport: Transport, breakers: dict[str, Breaker], clock: Clock,
                 emit: signals.Subscriber, *, limiters: dict[str, TokenBucket | SharedTokenBucket] | None = None,
                 keyrings: dict[str, KeyRing] | None = None, latencies: dict[str, LatencyWindow] | None = None,
                 strip_headers: frozenset[str] = ServerSettings().strip_headers,
                 probe_lease: ProbeLease | None = None) -> None:
        self._transport = transport
        self._strip_headers = strip_headers
        self._probe_lease = probe_lease  # shared breakers: one replica of the fleet sends the half-open probe
        self._breakers = breakers
        self._clock = clock
        self._emit = emit
        self._limiters = limiters if limiters is not None else {}
        self._keyrings = keyrings if keyrings is not None else {}
        self._latencies = latencies if latencies is not None else {}

    def wait_hint(self, upstream: Upstream) -> float | None:
        """Seconds until the upstream's breaker lets an attempt through (0: now; None: nobody can tell)."""
        return self._breakers[upstream.name].wait_hint()

    def on_shut(self, upstream: Upstream, listener: Callable[[], None]) -> Callable[[], None]:
        """`listener` is called when the upstream's breaker opens or it starts a rest (see `Breaker.on_shut`)."""
        return self._breakers[upstream.name].on_shut(listener)

    def _skip(self, upstream: Upstream, exchange: Exchange, outcome: Outcome, detail: str,
              wait: float | None) -> AttemptResult:
        self._emit(signals.UpstreamSkipped(upstream.service, upstream.name, outcome.value, exchange.request_id))
        exchange.attempts.append(AttemptRecord(upstream.name, outcome.value, None, detail))
        return AttemptResult(outcome, detail=detail, wait=wait)

    async def __call__(self, upstream: Upstream, exchange: Exchange, number: int,
                       abandon: Abandon | None = None) -> AttemptResult:
        values = {**exchange.params, "upstream": upstream.name}
        ring = self._keyrings.get(upstream.name)
        key_index = -1
        if ring is not None:
            current = ring.current()
            if current is None:
                return self._skip(upstream, exchange, Outcome.KEYS_SPENT, "every API key is resting", ring.wait_hint())
            key_index, values["key"] = current
        try:
            url = build_url(upstream, exchange, values)
            headers = request_headers(upstream, exchange, values, self._strip_headers)
        except (NoPathForUpstream, KeyError):
            return self._skip(upstream, exchange, Outcome.NO_PATH, "the route gives no path for this upstream", None)
        breaker = self._breakers[upstream.name]
        permit = breaker.allow()
        if permit is None:
            if breaker.resting:
                return self._skip(upstream, exchange, Outcome.RESTING,
                                  "resting (Retry-After, or its only API key refused)", breaker.wait_hint())
            return self._skip(upstream, exchange, Outcome.BREAKER_OPEN, f"circuit {breaker.state.value}",
                              breaker.wait_hint())
        if permit.probe and self._probe_lease is not None and not await self._probe_lease(upstream):
            permit.release()
            return self._skip(upstream, exchange, Outcome.BREAKER_OPEN, "circuit HALF_OPEN: another replica probes",
                              breaker.wait_hint())
        limiter = self._limiters.get(upstream.name)
        if limiter is not None and not await limiter.take_shared():
            permit.release()
            return self._skip(upstream, exchange, Outcome.RATE_LIMITED, "over the upstream's rate limit",
                              limiter.wait_hint())
        clock = self._clock
        started = clock.monotonic()
        timeout = min(upstream.timeout, exchange.deadline_at - started)
        refused = False
        try:
            request = UpstreamRequest(upstream.name, exchange.method, url, headers, exchange.body, exchange.body_stream)
            reply = await self._transport.send(request, timeout)
        except AttemptError as exc:
            result = AttemptResult(exc.outcome, detail=exc.detail, final=exc.final)
            refused = exc.refused
        except asyncio.CancelledError:
            if abandon is None or abandon.lost_to is None:
                permit.release()  # the caller went away: this says nothing about the upstream
                raise
            # Cancelled by the hedge race this attempt lost: an outcome to record, not a cancellation.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            duration = clock.monotonic() - started
            permit.abandoned(duration)
            latency = self._latencies.get(upstream.name)
            if latency is not None:
                # It would have taken at least this long: counted, the p95 cannot drift down to the
                # few answers that beat the hedge and make every request a hedge.
                latency.add(duration)
            lost = AttemptResult(Outcome.HEDGE_LOST,
                                 detail=f"no answer after {duration * 1000:.0f}ms; {abandon.lost_to} answered first")
            self._record(upstream, exchange, url, number, duration, lost)
            return lost
        except BaseException:  # a bug: never leak a half-open probe slot
            permit.release()
            raise
        else:
            result = self._classify(upstream, exchange, values, reply, ring, key_index, breaker)
        duration = clock.monotonic() - started
        if result.outcome.answered:
            latency = self._latencies.get(upstream.name)
            if latency is not None:
                latency.add(duration)
        if is_breaker_failure(result.outcome, trip_on_429=upstream.breaker.trip_on_429):
            permit.failure(duration, refused=refused)
        else:
            permit.success(duration)
        self._record(upstream, exchange, url, number, duration, result)
        return result

    def _record(self, upstream: Upstream, exchange: Exchange, url: Any, number: int, duration: float,
                result: AttemptResult) -> None:
        exchange.attempts.append(AttemptRecord(upstream.name, result.outcome.value, result.status, result.detail))
        self._emit(signals.AttemptFinished(
            service=upstream.service, provider=upstream.name, outcome=result.outcome.value, status=result.status,
            duration=duration, attempt=number, method=exchange.method, url=MaskedUrl(url, upstream),
            request_id=exchange.request_id, error=result.detail, trace=exchange.trace,
            ended=self._clock.monotonic() if exchange.trace is not None and exchange.trace.wall_ns else None))

    def _classify(self, upstream: Upstream, exchange: Exchange, values: dict[str, str], reply: Reply,
                  ring: KeyRing | None, key_index: int, breaker: Breaker) -> AttemptResult:
        """What an answer means: its status, the result code in its body, and whether it normalises."""
        document: Any = _UNREAD
        verdict = None
        if upstream.result_codes is not None and reply.stream is None:
            document = _decoded(reply)
            if not isinstance(document, TransformError):
                verdict = upstream.result_codes.verdict(document, reply.status, hide=_secrets(upstream))
        if verdict is not None and verdict.meaning.refuses_key:
            return self._refused(upstream, ring, key_index, reply, breaker, verdict)
        if ring is not None and _refuses_key(reply):
            return self._spend_key(upstream, ring, key_index, reply)
        self._rest(breaker, reply)
        if verdict is not None and verdict.meaning is Meaning.CALLER_ERROR:
            sent = _parameters(upstream, exchange)
            return AttemptResult(Outcome.CALLER_ERROR, reply, f"{verdict}: {blamed_parameter(verdict.message, sent)}")
        if verdict is not None and verdict.meaning is Meaning.VENDOR_ERROR:
            return AttemptResult(Outcome.VENDOR_ERROR, reply, str(verdict))
        detail = str(verdict) if verdict is not None and verdict.meaning is Meaning.EMPTY else None
        outcome = from_status(reply.status)
        if outcome is not Outcome.SUCCESS or upstream.transform is None or reply.stream is not None:
            return AttemptResult(outcome, reply, detail)
        if document is _UNREAD:
            document = _decoded(reply)
        if isinstance(document, TransformError):
            return AttemptResult(Outcome.TRANSFORM, reply, str(document))
        try:
            reply.body, reply.headers = normalise(upstream.transform, values, document, reply.headers)
        except TransformError as exc:
            return AttemptResult(Outcome.TRANSFORM, reply, str(exc))
        return AttemptResult(Outcome.SUCCESS, reply, detail)

    def _refused(self, upstream: Upstream, ring: KeyRing | None, index: int, reply: Reply, breaker: Breaker,
                 verdict: Verdict) -> AttemptResult:
        """A key refused by a result code: it rests (until the daily reset for a spent quota) and the
        next key goes; an upstream with no key list rests itself, its one key being refused."""
        now = self._clock.time()
        codes = upstream.result_codes
        retry_after = parse_retry_after(reply.retry_after, now)
        if verdict.meaning is Meaning.QUOTA and codes is not None and codes.daily_reset is not None:
            until = codes.daily_reset.next_after(now)
        else:
            until = now + (retry_after if retry_after is not None else upstream.key_cooldown)
        if ring is None:
            breaker.rest(until)
            return AttemptResult(Outcome.KEY_REFUSED, reply, f"the key was refused: {verdict}")
        return self._spend_key(upstream, ring, index, reply, until=until, reason=str(verdict))

    def _rest(self, breaker: Breaker, reply: Reply) -> None:
        """A 429 or 503 saying when to come back rests the upstream until then, for every request."""
        if reply.status not in (429, 503) or reply.retry_after is None:
            return
        now = self._clock.time()
        retry_after = parse_retry_after(reply.retry_after, now)
        if retry_after:
            breaker.rest(now + retry_after)

    def _spend_key(self, upstream: Upstream, ring: KeyRing, index: int, reply: Reply, *,
                   until: float | None = None, reason: str | None = None) -> AttemptResult:
        if until is None:
            until = ring.spend(index, parse_retry_after(reply.retry_after, self._clock.time()))
        else:
            until = ring.rest(index, until, reason)
        left = ring.current()
        key = fingerprint(upstream.keys[index])
        self._emit(signals.KeySpent(upstream.service, upstream.name, key, reply.status, until,
                                   0 if left is None else len(upstream.keys) - left[0], reason=reason))
        detail = f"key {key} refused ({reason or reply.status})"
        return AttemptResult(Outcome.KEY_REFUSED, reply, detail, rotated=left is not None)


def _decoded(reply: Reply) -> Any:
    """The answer's document, or the TransformError saying why it has none."""
    try:
        return decode_document(reply.body, reply.headers)
    except TransformError as exc:
        return exc


def _secrets(upstream: Upstream) -> list[str]:
    """The upstream's API keys and the query values it reads from the environment."""
    return [*upstream.keys, *(t.text for name, t in upstream.query if name in upstream.secret_query and not t.names)]


def _parameters(upstream: Upstream, exchange: Exchange) -> list[tuple[str, str]]:
    """Each vendor query parameter this request filled from its own, with the placeholder it came from."""
    route_query = exchange.route.queries.get(upstream.name, ()) if exchange.route is not None else ()
    return [(name, placeholder) for name, template in upstream.query + route_query
            for placeholder in template.names if placeholder in exchange.params]
