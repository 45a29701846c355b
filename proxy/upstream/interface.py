"""The cut between the chain and the network (httpcore's `interfaces.py`).

The chain hands a transport an `UpstreamRequest` and gets a `Reply` back, or an `AttemptError`
saying why there is none. `HttpTransport` sends it over sockets; `tests/fake_transport.py`
answers from a script, so every stage above can be tested without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from multidict import CIMultiDict
from yarl import URL

from proxy.config.model import ServerSettings
from proxy.resilience.outcome import Outcome


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One attempt as the network sees it: which upstream's pool, and the HTTP request to send there."""

    upstream: str             # the pool key: the upstream's name in the route table
    method: str
    url: URL                  # absolute: its origin picks the connection, its path and query are the target
    headers: CIMultiDict[str]  # what goes on the wire besides Host and the body's framing
    body: bytes = b""
    body_stream: AsyncIterator[bytes] | None = None  # a body too large to buffer: sent once, never replayed


class BodyStream(Protocol):
    """The rest of an answer too large to buffer, read chunk by chunk (b"" at its end)."""

    content_length: int | None

    async def read(self) -> bytes: ...

    def release(self) -> None: ...


@dataclass(slots=True)
class Reply:
    """An upstream's HTTP answer: buffered (`body`) or, when too large, an open `stream`."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    stream: BodyStream | None = None
    retry_after: str | None = None

    def release(self) -> None:
        """Free the connection behind a streamed answer nobody will read."""
        if self.stream is not None:
            self.stream.release()
            self.stream = None


class AttemptError(Exception):
    """An attempt that produced no usable HTTP answer (`refused`: nothing listens on the upstream's port;
    `final`: trying this upstream again cannot help, e.g. its host name does not exist)."""

    def __init__(self, outcome: Outcome, detail: str, *, refused: bool = False, final: bool = False) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.refused = refused
        self.final = final


class Transport(Protocol):
    """What the chain needs from whatever carries its attempts."""

    async def send(self, request: UpstreamRequest, timeout: float) -> Reply:
        """One attempt, bounded by `timeout` seconds until the body is buffered; raises `AttemptError`."""
        ...

    def with_settings(self, settings: ServerSettings) -> "Transport":
        """The same connections under a reloaded table's `server:` settings."""
        ...

    async def close(self, keep: set[str] | None = None) -> None:
        """Close the connections (all, or those of upstreams not in `keep`)."""
        ...

    def pool_usage(self, name: str) -> dict[str, int | None]:
        """An upstream's connections: open, idle, busy, callers waiting, the limit (None: not known)."""
        ...

    def in_flight(self, name: str) -> int:
        """An upstream's attempts holding a connection or waiting for one."""
        ...
