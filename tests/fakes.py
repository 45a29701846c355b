"""Fake upstreams: real aiohttp servers on 127.0.0.1 whose behaviour a test scripts.

    upstream = await FakeUpstream("a").start()
    upstream.script(Fail(503, times=2), Ok(body=b"rates"))   # then the default (Ok) forever
    ... upstream.calls ... upstream.seen[-1].path_qs ...

Every behaviour is bounded in time, so a test can never hang on a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field, replace
from typing import Any

import yaml
from aiohttp import web
from multidict import CIMultiDict

from proxy.config.parse import parse_config
from proxy.demo.mocks.base import LoopbackServer
from proxy.ops.process import ProxyProcess


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Ok:
    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    times: int = 1


@dataclass
class Fail:
    """An HTTP error status (5xx, 429, 4xx) with optional headers such as Retry-After."""
    status: int = 503
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"error": "upstream says no"}'


@dataclass
class Delay:
    """Answer only after `seconds` (slow headers)."""
    seconds: float
    then: Any = field(default_factory=Ok)
    times: int = 1


@dataclass
class Advance:
    """Move a FakeClock on as the request is answered: the answer took `seconds` of stepped time."""
    clock: Any
    seconds: float
    then: Any = field(default_factory=Ok)
    times: int = 1


@dataclass
class SlowBody:
    """Send headers and the first bytes, then stall for `seconds` before the rest."""
    seconds: float
    times: int = 1


@dataclass
class Reset:
    """Drop the connection without answering."""
    times: int = 1


@dataclass
class Garbage:
    """Answer with bytes that are not HTTP."""
    times: int = 1


@dataclass
class Huge:
    """A body of `size` bytes, streamed in chunks with no Content-Length (chunked) or with one."""
    size: int
    chunked: bool = True
    times: int = 1
    stall_after: int | None = None  # drop the connection after this many body bytes


@dataclass
class Gzip:
    """A gzip-encoded JSON body; `raw` is what went on the wire."""
    text: bytes = b'{"base": "USD", "rates": {"KRW": 1400.5}}'
    times: int = 1

    @property
    def raw(self) -> bytes:
        return gzip.compress(self.text, mtime=0)


class FakeUpstream(LoopbackServer):
    """A scripted HTTP server on 127.0.0.1: `await FakeUpstream("a").start()`."""

    auto_decompress = False  # a test sees the body exactly as the proxy sent it

    def __init__(self, name: str = "fake") -> None:
        super().__init__(name=name)
        self.seen: list[Seen] = []
        self._script: list[Any] = []
        self.default: Any = Ok(body=f'{{"from": "{name}"}}'.encode())

    @property
    def calls(self) -> int:
        return len(self.seen)

    def script(self, *steps: Any) -> "FakeUpstream":
        """Queue behaviours; each runs `times` times, then the default behaviour answers."""
        for step in steps:
            self._script.extend([step] * getattr(step, "times", 1))
        return self

    def _next(self) -> Any:
        return self._script.pop(0) if self._script else self.default

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body))
        return await self._perform(self._next(), request)

    async def _perform(self, step: Any, request: web.BaseRequest) -> web.StreamResponse:
        if isinstance(step, Ok):
            return web.Response(status=step.status, body=step.body, headers=step.headers)
        if isinstance(step, Fail):
            return web.Response(status=step.status, body=step.body, headers=step.headers)
        if isinstance(step, Delay):
            await asyncio.sleep(step.seconds)
            return await self._perform(step.then, request)
        if isinstance(step, Advance):
            step.clock.advance(step.seconds)
            return await self._perform(step.then, request)
        if isinstance(step, Gzip):
            return web.Response(body=step.raw, headers={"Content-Encoding": "gzip", "Content-Type": "application/json",
                                                        "Vary": "Accept-Encoding"})
        if isinstance(step, SlowBody):
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = 20
            await response.prepare(request)
            await response.write(b'{"partial": ')
            await asyncio.sleep(step.seconds)
            await response.write(b'true}   ')
            return response
        if isinstance(step, Huge):
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            if not step.chunked:
                response.content_length = step.size
            await response.prepare(request)
            chunk = b"x" * 65536
            left = step.size
            while left > 0:
                if step.stall_after is not None and step.size - left >= step.stall_after:
                    if request.transport is not None:
                        request.transport.abort()
                    raise asyncio.CancelledError()
                await response.write(chunk[:left])
                left -= len(chunk[:left])
            await response.write_eof()
            return response
        if isinstance(step, (Reset, Garbage)):
            transport = request.transport
            if transport is not None:
                if isinstance(step, Garbage):
                    transport.write(b"THIS IS NOT HTTP\r\n\x00\x01\x02\r\n\r\n")
                    transport.close()
                else:
                    transport.abort()
            raise asyncio.CancelledError()
        raise AssertionError(f"unknown fake behaviour {step!r}")


def free_port() -> int:
    """A loopback port free right now, for a listener the test starts on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_REFUSING: list[socket.socket] = []


def refused_port() -> int:
    """A loopback port that refuses connections for the rest of the run.

    It stays bound and never listens: a port merely found free could be handed to the next
    listener bound to port 0 (the proxy's own, say), and a "dead" upstream would then answer.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _REFUSING.append(sock)
    return sock.getsockname()[1]


def route_table(services: dict[str, Any], **top: Any) -> str:
    """routes.yaml text for a test: listeners on port 0, memory cache unless told otherwise."""
    document: dict[str, Any] = {"version": 1, "server": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}}
    document.update(top)
    document["services"] = services
    return yaml.safe_dump(document, sort_keys=False)


class RunningProxy:
    """A ProxyProcess on 127.0.0.1 with an HTTP client pointed at it."""

    def __init__(self, process: ProxyProcess, client: Any) -> None:
        self.process = process
        self.client = client

    @property
    def url(self) -> str:
        host, port = self.process.addresses["main"]
        return f"http://{host}:{port}"

    @property
    def metrics_url(self) -> str:
        host, port = self.process.addresses["metrics"]
        return f"http://{host}:{port}"

    def breaker(self, name: str) -> Any:
        return self.process.runtime.breakers[name]

    async def get(self, path: str, **kwargs: Any) -> Any:
        return await self.client.get(self.url + path, **kwargs)

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self.client.request(method, self.url + path, **kwargs)


async def start_proxy(text: str, *, env: dict[str, str] | None = None, clock: Any = None,
                      filename: str = "routes.yaml", pieces: tuple[str, str] | None = None) -> RunningProxy:
    """`pieces`: (server.front, upstream_client) in place of the table's, to run a test over aiohttp's."""
    import aiohttp

    from proxy.clock import SYSTEM_CLOCK

    config = parse_config(text, filename, env or {})
    if pieces is not None:
        config = replace(config, server=replace(config.server, front=pieces[0]), upstream_client=pieces[1])
    process = ProxyProcess(config, clock=clock or SYSTEM_CLOCK, env=env or {})
    await process.start()
    client = aiohttp.ClientSession(auto_decompress=False, connector=aiohttp.TCPConnector(limit=0))
    return RunningProxy(process, client)


async def stop_proxy(proxy: RunningProxy) -> None:
    await proxy.client.close()
    await proxy.process.stop()


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class ThrowawayRedis:
    """A redis-server of a test's own on a free loopback port, to stop and start at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(5)
            self._process = None


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition text as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def metric(proxy: RunningProxy, name: str, **labels: str) -> float | None:
    """One sample scraped from the proxy's metrics port (None when the series is not exported)."""
    text = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
    return metric_samples(text).get((name, tuple(sorted(labels.items()))))


async def eventually(check: Any, *, within: float = 2.0, step: float = 0.01) -> Any:
    """Poll `check()` (sync or async) until it returns something true, at most `within` real seconds."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(step)
