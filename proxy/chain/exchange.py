"""The records that travel through the chain: one downstream request and what answers it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from multidict import CIMultiDictProxy

from proxy.config.model import Route, Service
from proxy.observability.tracing import Trace

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass(slots=True, unsafe_hash=True)
class AttemptRecord:
    """One line of the `attempts` list in error bodies and logs (one per attempt: not frozen for
    the same reason as `signals.PER_REQUEST`, and never changed once made)."""

    upstream: str
    outcome: str
    status: int | None = None
    detail: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"upstream": self.upstream, "outcome": self.outcome}
        if self.status is not None:
            out["status"] = self.status
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(slots=True)
class Exchange:
    """One downstream request as the chain sees it (Envoy's downstream request)."""

    request_id: str
    method: str
    service: Service
    route: Route | None
    params: dict[str, str]
    path: str                 # the request path as received (percent-encoded), no query
    rest: str                 # `path` minus the service prefix (encoded), "" or "/..."
    query: tuple[tuple[str, str], ...]
    headers: CIMultiDictProxy[str]
    deadline_at: float        # monotonic seconds
    body: bytes = b""         # buffered body (replayable)
    body_stream: AsyncIterator[bytes] | None = None  # a body too large to buffer: sent once, never replayed
    attempts: list[AttemptRecord] = field(default_factory=list)
    body_too_large: bool = False
    may_hedge: bool = False   # no copy could answer if the upstreams are slow: a late attempt may be hedged
    trace: Trace | None = None  # traceparent for the upstreams, trace id for the logs, span timing
    # A refresh behind a copy: resolved with the failure (an `UpstreamsFailed`, never raised) when
    # every upstream failed its first try, so the caller waiting on it takes the copy then, while
    # the retries go on in the background.
    first_round_failed: asyncio.Future[Exception] | None = None

    @property
    def replayable(self) -> bool:
        return self.body_stream is None

    @property
    def idempotent(self) -> bool:
        """Safe to send twice: retries and fallback after the upstream may have seen it."""
        return (self.method in IDEMPOTENT_METHODS or "Idempotency-Key" in self.headers
                or self.service.retry_non_idempotent)

    @property
    def route_name(self) -> str:
        return self.route.name if self.route else self.service.prefix


@dataclass(slots=True)
class Answer:
    """What the chain hands back to the server to write downstream."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    upstream: str | None
    reason: str | None = None
    cache: str = "MISS"              # HIT | MISS | STALE | BYPASS
    age: float | None = None
    cache_status: str | None = None  # RFC 9211 Cache-Status value
    stream: Any = None               # an open upstream response to stream (too large to buffer)
    fallback: bool = False           # produced by a non-primary upstream or a stale copy
    shareable: bool = True           # may be handed to other callers waiting on the same key
