"""An in-memory transport: scripted replies per upstream, every request recorded, no sockets.

The chain talks to it through the same `send(UpstreamRequest, timeout) -> Reply` as to
`HttpTransport`. A script is a list of steps per upstream, used in order (the last one
repeats); a step is a `reply(...)`, a fault (`TIMEOUT`, `RESET`, `REFUSED`, `UNREACHABLE`, `UNKNOWN_HOST`, `MALFORMED`),
or either behind `slow(seconds, ...)`, which waits on the injected clock: with an
autojumping `FakeClock` the wait costs nothing, and a wait at least as long as the attempt's
timeout ends as a timeout, as it would on the wire.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from dataclasses import dataclass, field
from typing import Any

from proxy.clock import Clock, FakeClock
from proxy.config.model import ServerSettings
from proxy.resilience.outcome import Outcome
from proxy.upstream.interface import AttemptError, Reply, UpstreamRequest


@dataclass(frozen=True)
class Fault:
    """A way an attempt fails without an HTTP answer, as the real transport reports it."""

    outcome: Outcome
    detail: str
    refused: bool = False
    final: bool = False


TIMEOUT = Fault(Outcome.TIMEOUT, "no complete answer in time")
RESET = Fault(Outcome.RESET, "Server disconnected")
REFUSED = Fault(Outcome.CONNECT, "Cannot connect to host [Connection refused]", refused=True)
MALFORMED = Fault(Outcome.MALFORMED, "invalid HTTP answer: garbage")
UNREACHABLE = Fault(Outcome.CONNECT, "Cannot connect to host [No route to host]")
UNKNOWN_HOST = Fault(Outcome.CONNECT, "no such host: Cannot connect to host [Name or service not known]", final=True)


@dataclass(frozen=True)
class Scripted:
    """One scripted answer (status, headers, body), or a streamed one when `chunks` is given."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    reason: str = ""
    chunks: tuple[bytes, ...] | None = None


@dataclass(frozen=True)
class Slow:
    """A step that takes `seconds` of the injected clock before it happens."""

    seconds: float
    then: "Scripted | Fault"


Step = Scripted | Fault | Slow


def reply(status: int = 200, body: bytes | str = b"", *, json: Any = None,
          headers: dict[str, str] | list[tuple[str, str]] | None = None, reason: str = "") -> Scripted:
    """A scripted answer; `json=` sets the body and its Content-Type."""
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if json is not None:
        body = jsonlib.dumps(json).encode()
        pairs.append(("Content-Type", "application/json"))
    data = body.encode() if isinstance(body, str) else body
    return Scripted(status, tuple(pairs), data, reason or _REASONS.get(status, ""))


def streamed(status: int, *chunks: bytes, headers: dict[str, str] | None = None) -> Scripted:
    """An answer too large to buffer: handed back as an open stream of `chunks`."""
    return Scripted(status, tuple((headers or {}).items()), b"", _REASONS.get(status, ""), tuple(chunks))


def slow(seconds: float, then: Scripted | Fault) -> Slow:
    """`then`, after `seconds` on the clock (a timeout instead when the attempt's timeout is shorter)."""
    return Slow(seconds, then)


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


class FakeStream:
    """A streamed answer's body; remembers whether it was released (its connection freed)."""

    def __init__(self, chunks: tuple[bytes, ...]) -> None:
        self._chunks = list(chunks)
        self.content_length: int | None = sum(len(c) for c in chunks)
        self.released = False

    async def read(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""

    def release(self) -> None:
        self.released = True


@dataclass
class FakeTransport:
    """Answers attempts from a script and records each `UpstreamRequest` it was sent.

    An upstream with no script refuses the connection (nothing listens there).
    """

    clock: Clock = field(default_factory=FakeClock)
    requests: list[UpstreamRequest] = field(default_factory=list)
    timeouts: list[float] = field(default_factory=list)  # the timeout each request was sent with
    streams: list[FakeStream] = field(default_factory=list)
    closed: bool = False
    _scripts: dict[str, list[Step]] = field(default_factory=dict)
    _used: dict[str, int] = field(default_factory=dict)

    def script(self, upstream: str, *steps: Step) -> "FakeTransport":
        """What `upstream` does, request after request (the last step repeats)."""
        if not steps:
            raise ValueError("a script needs at least one step")
        self._scripts[upstream] = list(steps)
        self._used[upstream] = 0
        return self

    def sent_to(self, upstream: str) -> list[UpstreamRequest]:
        """The requests `upstream` was sent, in order."""
        return [r for r in self.requests if r.upstream == upstream]

    def order(self) -> list[str]:
        """Which upstream each request went to, in order."""
        return [r.upstream for r in self.requests]

    async def send(self, request: UpstreamRequest, timeout: float) -> Reply:
        self.requests.append(request)
        self.timeouts.append(timeout)
        steps = self._scripts.get(request.upstream)
        if steps is None:
            raise AttemptError(REFUSED.outcome, REFUSED.detail, refused=True)
        index = self._used[request.upstream]
        self._used[request.upstream] = index + 1
        step = steps[min(index, len(steps) - 1)]
        if request.body_stream is not None:
            async for _ in request.body_stream:
                pass  # sent: a streamed body is gone once it went out
        if isinstance(step, Slow):
            if step.seconds >= timeout:
                await self.clock.sleep(max(timeout, 0.0))
                raise AttemptError(Outcome.TIMEOUT, f"no complete answer within {timeout:.3g}s")
            await self.clock.sleep(step.seconds)
            step = step.then
        if isinstance(step, Fault):
            raise AttemptError(step.outcome, step.detail, refused=step.refused, final=step.final)
        retry_after = next((v for k, v in step.headers if k.lower() == "retry-after"), None)
        if step.chunks is not None:
            stream = FakeStream(step.chunks)
            self.streams.append(stream)
            return Reply(step.status, step.reason, list(step.headers), b"", stream=stream, retry_after=retry_after)
        return Reply(step.status, step.reason, list(step.headers), step.body, retry_after=retry_after)

    def with_settings(self, settings: ServerSettings) -> "FakeTransport":
        return self

    async def close(self, keep: set[str] | None = None) -> None:
        self.closed = True

    def pool_usage(self, name: str) -> dict[str, int | None]:
        return {"open": None, "idle": None, "busy": None, "waiting": None, "limit": None}  # no connections here

    def in_flight(self, name: str) -> int:
        return 0


async def settle() -> None:
    """Let tasks the chain started in the background (refreshes, detached tries) run to their end."""
    for _ in range(20):
        await asyncio.sleep(0)
