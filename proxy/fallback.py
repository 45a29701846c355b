"""Fallback over a service's upstreams, in order, within the request's deadline.

The first upstream to answer (2xx/3xx, or a 4xx, which is the caller's problem and passed
through as it is) wins. Requests that are not safe to repeat move on only when the
previous upstream certainly never received them. When nothing answers, `UpstreamsFailed`
says why with the status the contract gives: 504 deadline, 503 every breaker open, 502.
"""

from __future__ import annotations

from typing import Any

from .clock import Clock
from .exchange import AttemptRecord, Answer, Exchange
from .outcome import SKIPPED, Outcome
from .retrying import RetryStage

# Outcomes after which the upstream certainly never received the request (nor its body).
_NEVER_SENT = SKIPPED | {Outcome.CONNECT}
_SKIP_VALUES = frozenset(o.value for o in SKIPPED)


class UpstreamsFailed(Exception):
    """No upstream produced an answer to pass on."""

    def __init__(self, status: int, error: str, service: str, attempts: list[AttemptRecord],
                 last_status: int | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.service = service
        self.attempts = list(attempts)
        self.last_status = last_status  # the last upstream HTTP status seen, for Cache-Status fwd-status

    def body(self, request_id: str) -> dict[str, Any]:
        return {"error": self.error, "service": self.service,
                "attempts": [a.as_json() for a in self.attempts], "request_id": request_id}


class RequestBodyTooLarge(Exception):
    """A streamed request body went past `server.max_request_body` while being forwarded."""


class FallbackStage:
    def __init__(self, retry: RetryStage, clock: Clock) -> None:
        self._retry = retry
        self._clock = clock

    async def __call__(self, exchange: Exchange) -> Answer:
        service = exchange.service
        last_status: int | None = None
        deadline_hit = False
        for index, upstream in enumerate(service.upstreams):
            if exchange.deadline_at - self._clock.monotonic() <= 0:
                deadline_hit = True
                exchange.attempts.append(AttemptRecord(upstream.name, Outcome.DEADLINE.value, None, "no time left"))
                continue
            result = await self._retry(upstream, exchange)
            if exchange.body_too_large:
                result.discard()
                raise RequestBodyTooLarge()
            if result.outcome.answered and result.reply is not None:
                reply = result.reply
                return Answer(status=reply.status, reason=reply.reason, headers=reply.headers, body=reply.body,
                              upstream=upstream.name, stream=reply.stream, fallback=index > 0)
            if result.status is not None:
                last_status = result.status
            result.discard()
            if result.outcome in _NEVER_SENT:
                continue
            if not exchange.replayable:
                break  # the body was streamed to this upstream and is gone
            if not exchange.idempotent and result.outcome is not Outcome.KEY_REFUSED:
                break  # it may have been processed: sending it elsewhere could do it twice
        if deadline_hit or exchange.deadline_at - self._clock.monotonic() <= 0:
            raise UpstreamsFailed(504, "deadline_exceeded", service.name, exchange.attempts, last_status)
        if exchange.attempts and all(a.outcome in _SKIP_VALUES for a in exchange.attempts) \
                and any(a.outcome != Outcome.NO_PATH.value for a in exchange.attempts):
            # Nothing was sent: every upstream was skipped (breaker open, rate limited, keys resting).
            only_breakers = all(a.outcome in (Outcome.BREAKER_OPEN.value, Outcome.NO_PATH.value) for a in exchange.attempts)
            error = "all_breakers_open" if only_breakers else "all_upstreams_unavailable"
            raise UpstreamsFailed(503, error, service.name, exchange.attempts, last_status)
        raise UpstreamsFailed(502, "all_upstreams_failed", service.name, exchange.attempts, last_status)
