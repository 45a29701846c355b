"""One try at one upstream: breaker gate → timeout → HTTP call → classified outcome.

This is the innermost, per-attempt stage. It asks the breaker for a permit, bounds the
call by the upstream's timeout and what is left of the request's deadline, feeds the
outcome back to the breaker and emits an `AttemptFinished` event (the external call log).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from yarl import URL

from . import events
from .breaker import Breaker
from .clock import Clock
from .config import Upstream
from .exchange import AttemptRecord, Exchange
from .outcome import Outcome, from_status, is_breaker_failure
from .transport import AttemptError, HttpTransport, Reply, masked_url


@dataclass(slots=True)
class AttemptResult:
    outcome: Outcome
    reply: Reply | None = None
    detail: str | None = None

    @property
    def status(self) -> int | None:
        return self.reply.status if self.reply is not None else None

    def discard(self) -> None:
        """Free the connection of a reply that will not be passed on."""
        if self.reply is not None:
            self.reply.release()


class AttemptStage:
    """breaker → timeout → transport, for one attempt."""

    def __init__(self, transport: HttpTransport, breakers: dict[str, Breaker], clock: Clock,
                 emit: events.Subscriber) -> None:
        self._transport = transport
        self._breakers = breakers
        self._clock = clock
        self._emit = emit

    async def __call__(self, upstream: Upstream, exchange: Exchange, url: URL, number: int) -> AttemptResult:
        breaker = self._breakers[upstream.name]
        permit = breaker.allow()
        if permit is None:
            self._emit(events.UpstreamSkipped(upstream.service, upstream.name, "breaker_open", exchange.request_id))
            result = AttemptResult(Outcome.BREAKER_OPEN, detail=f"circuit {breaker.state.value}")
            exchange.attempts.append(AttemptRecord(upstream.name, result.outcome.value, None, result.detail))
            return result
        clock = self._clock
        timeout = min(upstream.timeout, exchange.deadline_at - clock.monotonic())
        started = clock.monotonic()
        try:
            reply = await self._transport.send(upstream, exchange, url, timeout)
        except AttemptError as exc:
            result = AttemptResult(exc.outcome, detail=exc.detail)
        except asyncio.CancelledError:
            permit.release()
            raise
        except Exception as exc:  # a bug or an unexpected library error must not leak a probe slot
            permit.release()
            raise exc
        else:
            result = AttemptResult(from_status(reply.status), reply)
        duration = clock.monotonic() - started
        if is_breaker_failure(result.outcome, trip_on_429=upstream.breaker.trip_on_429):
            permit.failure(duration)
        else:
            permit.success(duration)
        exchange.attempts.append(AttemptRecord(upstream.name, result.outcome.value, result.status, result.detail))
        self._emit(events.AttemptFinished(
            service=upstream.service, provider=upstream.name, outcome=result.outcome.value, status=result.status,
            duration=duration, attempt=number, method=exchange.method, url=masked_url(url, upstream),
            request_id=exchange.request_id, error=result.detail))
        return result
