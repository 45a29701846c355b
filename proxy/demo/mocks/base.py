"""Loopback servers: the one family the demo mocks, the test fakes and the bench's providers build on.

`LoopbackServer` is a real aiohttp server on 127.0.0.1 for one handler (start on a free or given
port, go down and come back on the same port, stop). `MockServer` adds the fault switches and
call counting every mock provider shares; `tests/fakes.FakeUpstream` adds a per-test script;
`bench/servers.py` runs its baselines and fake providers on it. A mock provider:

    fx = ExchangeRateApiMock()
    await fx.start()                  # port 0: the bound port is `fx.port`
    fx.fail(503, times=2)             # the next two calls answer 503
    fx.rate_limit(retry_after=1)      # then 429 + Retry-After until heal()
    fx.hang(2.0)                      # answer only after 2 s
    await fx.go_down()                # stop listening: connection refused
    await fx.come_up()                # listen again on the same port
    fx.calls, fx.seen[-1].path_qs     # every request that reached the server

Every fault is bounded in time, so nothing can hang a test for ever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# The longest any scripted hang may last.
MAX_HANG = 60.0


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request that reached a mock."""

    method: str
    path: str
    path_qs: str
    query: dict[str, str]


@dataclass(slots=True)
class Fault:
    """A scripted misbehaviour: `kind` is "status" (answer `status`) or "hang" (delay, then answer)."""

    kind: str
    status: int = 503
    seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None  # None: until heal()


class LoopbackServer:
    """A real HTTP server on `host` (127.0.0.1) for one handler: `handle`, or the one given.

    Subclasses override `handle`; class attributes set the server's options once for a family
    (`auto_decompress`, `handler_cancellation`, `backlog`, `shutdown_timeout`).
    """

    auto_decompress = True       # False: the handler sees bodies exactly as they came on the wire
    handler_cancellation = False  # True: a handler is cancelled when its client goes away
    backlog = 128
    shutdown_timeout = 0.1

    def __init__(self, handler: Handler | None = None, *, name: str = "loopback", host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.port = 0
        self._handler = handler
        self._runner: web.ServerRunner | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The answer to one request (the handler given to the constructor, unless overridden)."""
        if self._handler is None:
            raise NotImplementedError("give a handler or override handle()")
        return await self._handler(request)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def up(self) -> bool:
        """Whether the server is listening."""
        return self._runner is not None

    async def start(self, port: int | None = None) -> "LoopbackServer":
        """Listen on `port` (default: the port it had before, or a free one the first time)."""
        if self._runner is not None:
            return self
        server = web.Server(self.handle, auto_decompress=self.auto_decompress,
                            handler_cancellation=self.handler_cancellation)
        runner = web.ServerRunner(server, access_log=None, shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port if port is None else port, backlog=self.backlog)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def go_down(self) -> None:
        """Stop listening and drop open connections: new connections are refused. The port is kept."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def come_up(self) -> None:
        """Listen again on the same port as before."""
        if not self.port:
            raise RuntimeError(f"{self.name} was never started, so it has no port to come back on")
        await self.start(self.port)

    async def stop(self) -> None:
        await self.go_down()

    async def __aenter__(self) -> "LoopbackServer":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


class MockServer(LoopbackServer):
    """The fault switches and call counting every mock provider shares.

    Subclasses implement `answer(request)` with the vendor's own paths and JSON shapes.
    """

    shutdown_timeout = 0.2
    #: A short description printed by the demo.
    kind = "mock provider"
    #: The path the vendor's base URL carries (`https://api.odcloud.kr/api`: "/api").
    base_path = ""

    def __init__(self, name: str, *, host: str = "127.0.0.1") -> None:
        super().__init__(name=name, host=host)
        self.seen: list[SeenRequest] = []
        self._fault: Fault | None = None

    @property
    def base_url(self) -> str:
        """What an upstream `url:` points at: the server and the vendor's base path."""
        return self.url + self.base_path

    # --- faults ----------------------------------------------------------------------------

    def fail(self, status: int = 503, *, times: int | None = None) -> None:
        """Answer `status` (a 5xx) to the next `times` calls, or until `heal()`."""
        if not 500 <= status <= 599:
            raise ValueError(f"fail() takes a 5xx status, got {status}; use rate_limit() for 429")
        self._fault = Fault("status", status=status, times=times)

    def rate_limit(self, retry_after: int = 1, *, times: int | None = None) -> None:
        """Answer 429 with `Retry-After: <retry_after>` to the next `times` calls, or until `heal()`."""
        self._fault = Fault("status", status=429, headers={"Retry-After": str(retry_after)}, times=times)

    def hang(self, seconds: float = 30.0, *, times: int | None = None) -> None:
        """Wait `seconds` (at most MAX_HANG) before answering normally."""
        if not 0 <= seconds <= MAX_HANG:
            raise ValueError(f"hang() takes 0..{MAX_HANG:g} seconds, got {seconds}")
        self._fault = Fault("hang", seconds=seconds, times=times)

    def heal(self) -> None:
        """Clear any scripted fault (does not bring a server that went down back up)."""
        self._fault = None

    @property
    def fault(self) -> Fault | None:
        return self._fault

    # --- counting --------------------------------------------------------------------------

    @property
    def calls(self) -> int:
        """Requests that reached this server (faulted ones included)."""
        return len(self.seen)

    def calls_to(self, path: str) -> int:
        """Requests whose path started with `path`."""
        return sum(1 for seen in self.seen if seen.path.startswith(path))

    def reset_calls(self) -> None:
        self.seen.clear()

    # --- serving ---------------------------------------------------------------------------

    def _take_fault(self) -> Fault | None:
        fault = self._fault
        if fault is None:
            return None
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                self._fault = None
        return fault

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.seen.append(SeenRequest(request.method, request.path, request.path_qs, dict(request.query)))
        fault = self._take_fault()
        if fault is not None and fault.kind == "status":
            return web.json_response({"error": f"{self.name} is scripted to answer {fault.status}"},
                                     status=fault.status, headers=fault.headers)
        if fault is not None and fault.kind == "hang":
            await asyncio.sleep(fault.seconds)
        if request.method not in ("GET", "HEAD"):
            return web.json_response({"error": "method not allowed"}, status=405, headers={"Allow": "GET, HEAD"})
        return await self.answer(request)

    async def answer(self, request: web.BaseRequest) -> web.StreamResponse:
        """The vendor's answer to a request that no fault intercepted."""
        raise NotImplementedError
