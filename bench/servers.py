"""The servers the harness measures against, each run as its own process on 127.0.0.1.

    python -m bench.servers hello --port P                 the Python ceiling: aiohttp answering a fixed body
    python -m bench.servers minproxy --port P --upstream URL   the minimal aiohttp proxy: one shared session
    python -m bench.servers upstreams name=port ...        fake providers whose fault is switched at run time

A fake provider answers the same JSON body as `hello`; a path ending in `/slow` waits 20 ms first,
timed by a `PreciseTimer` (see there why not by asyncio.sleep).
Its control endpoints (never counted as calls) sit on the same port:
    POST /__bench/mode/<ok|hang|fail30|429|down>    GET /__bench/calls

In mode `429` the provider rate-limits like a vendor whose quota is spent: a call outside a window
answers 429 with `Retry-After: 5` and opens a 5 s window; a call inside it is a *violation*
(counted) and answers 429 with the seconds that are left.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import heapq
import itertools
import math
import os
import sys
import time

import orjson
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from proxy.demo.mocks.base import Handler, LoopbackServer

BODY = orjson.dumps({"result": "success", "base_code": "USD", "time_last_update_unix": 1732579201,
                     "rates": {"USD": 1, "EUR": 0.9512, "GBP": 0.7963, "JPY": 154.21, "KRW": 1398.77,
                               "CNY": 7.2441, "AUD": 1.5402, "CAD": 1.4011, "CHF": 0.8837, "SGD": 1.3444}})
SLOW_DELAY = 0.020
RETRY_AFTER = 5  # seconds a 429 asks for
HANG_FOR = 20.0  # bounded: a hung request is answered eventually, long after every proxy gave up
MODES = ("ok", "hang", "fail30", "429", "down")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "content-length"})


def _run(main: object) -> None:
    try:
        import uvloop
    except ImportError:  # the proxy uses uvloop when present; so do the baselines, for a fair ceiling
        asyncio.run(main)  # type: ignore[arg-type]
    else:
        uvloop.run(main)  # type: ignore[arg-type]


class BenchServer(LoopbackServer):
    """A loopback server as the bench runs them: a deep backlog, bodies untouched."""

    auto_decompress = False
    backlog = 1024


class ProviderServer(BenchServer):
    """A fake provider's server: a hung request's handler ends when the proxy gives up and closes the connection."""

    handler_cancellation = True


async def _serve(handler: Handler, port: int) -> None:
    server = await BenchServer(handler).start(port)  # referenced while it serves
    assert server.up
    await asyncio.Event().wait()


async def hello(port: int) -> None:
    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")

    await _serve(handle, port)


async def minproxy(port: int, upstream: str) -> None:
    """Forward every request to `upstream` with one shared ClientSession: nothing else."""
    session = ClientSession(connector=TCPConnector(limit=256), auto_decompress=False,
                            timeout=ClientTimeout(total=30))

    async def handle(request: web.BaseRequest) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read() if request.body_exists else None
        async with session.request(request.method, upstream + request.raw_path, headers=headers, data=body,
                                   allow_redirects=False) as reply:
            data = await reply.read()
            out = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP_BY_HOP}
            return web.Response(status=reply.status, body=data, headers=out)

    await _serve(handle, port)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC, _TFD_TIMER_ABSTIME = 1, 1
_TFD_NONBLOCK, _TFD_CLOEXEC = os.O_NONBLOCK, getattr(os, "O_CLOEXEC", 0)


class PreciseTimer:
    """Sleeps that end when they should, whenever the request was read: the fake's `/slow` delay.

    Under uvloop a timer counts whole milliseconds from a loop time read once per loop turn, so
    `asyncio.sleep(0.020)` took 19.5 to 21.1 ms (p10-p99) when the requests came in through a
    proxy, spread over a millisecond or so, against 20.1 to 20.8 ms when wrk sent them directly:
    an error as large as the latency the bench measures, and not the same for every case. Here
    one Linux timerfd (CLOCK_MONOTONIC, the clock of time.monotonic, in nanoseconds) is armed for
    the earliest wake-up and read by the loop like a socket. Without timerfd (not Linux), the
    sleeps are asyncio's.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._due: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._settime = libc.timerfd_settime
            fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd >= 0:
            self._fd = fd
            self._loop.add_reader(fd, self._fire)

    @property
    def precise(self) -> bool:
        return self._fd >= 0

    async def sleep(self, delay: float) -> None:
        if self._fd < 0:
            await asyncio.sleep(delay)
            return
        when = time.monotonic() + delay
        done: asyncio.Future[None] = self._loop.create_future()
        heapq.heappush(self._due, (when, next(self._order), done))
        if self._due[0][2] is done:
            self._arm(when)
        await done

    def _arm(self, when: float) -> None:
        seconds = int(when)
        value = _Itimerspec(_Timespec(0, 0), _Timespec(seconds, max(1, int((when - seconds) * 1e9))))
        if self._settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(value), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def _fire(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            pass
        now = time.monotonic()
        due = self._due
        while due and due[0][0] <= now:
            _, _, done = heapq.heappop(due)
            if not done.done():  # a cancelled request's sleep is simply dropped
                done.set_result(None)
        if due:
            self._arm(due[0][0])

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class FakeProvider:
    """One fake provider: counts calls and answers according to its current mode."""

    def __init__(self, name: str, timer: PreciseTimer) -> None:
        self.name = name
        self.mode = "ok"
        self.calls = 0
        self.mode_calls = 0            # calls since the mode was last set: fail30 fails the same ones for every proxy
        self.violations = 0            # calls inside a Retry-After window this provider gave
        self._window_until = 0.0       # monotonic end of the current Retry-After window
        self._timer = timer

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/__bench/"):
            return self._control(request, path)
        self.calls += 1
        self.mode_calls += 1
        if request.body_exists:
            await request.read()
        mode = self.mode
        if mode == "hang":
            await asyncio.sleep(HANG_FOR)
        elif mode == "down" or (mode == "fail30" and self.mode_calls % 10 in (1, 4, 7)):
            return web.Response(status=503, body=b'{"error": "provider unavailable"}', content_type="application/json")
        elif mode == "429":
            now = time.monotonic()
            if now < self._window_until:
                self.violations += 1
                left = max(1, math.ceil(self._window_until - now))
            else:
                self._window_until = now + RETRY_AFTER
                left = RETRY_AFTER
            return web.Response(status=429, body=b'{"error": "quota exceeded"}', content_type="application/json",
                                headers={"Retry-After": str(left)})
        if path.endswith("/slow"):
            await self._timer.sleep(SLOW_DELAY)
        return web.Response(body=BODY, content_type="application/json")

    def _control(self, request: web.BaseRequest, path: str) -> web.Response:
        if path == "/__bench/calls":
            return web.json_response({"name": self.name, "calls": self.calls, "violations": self.violations,
                                      "mode": self.mode})
        if path.startswith("/__bench/mode/") and request.method == "POST":
            mode = path.rsplit("/", 1)[1]
            if mode not in MODES:
                return web.json_response({"error": f"unknown mode {mode}"}, status=400)
            self.mode = mode
            self.mode_calls = 0
            self._window_until = 0.0
            return web.json_response({"name": self.name, "mode": mode})
        return web.json_response({"error": "unknown control"}, status=404)


async def upstreams(listeners: list[tuple[str, int]]) -> None:
    timer = PreciseTimer()
    servers = [ProviderServer(FakeProvider(name, timer), name=name) for name, port in listeners]
    for server, (_, port) in zip(servers, listeners):
        await server.start(port)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    kinds = parser.add_subparsers(dest="kind", required=True)
    kinds.add_parser("hello").add_argument("--port", type=int, required=True)
    proxy = kinds.add_parser("minproxy")
    proxy.add_argument("--port", type=int, required=True)
    proxy.add_argument("--upstream", required=True)
    fakes = kinds.add_parser("upstreams")
    fakes.add_argument("listeners", nargs="+", help="name=port")
    args = parser.parse_args(argv)
    if args.kind == "hello":
        _run(hello(args.port))
    elif args.kind == "minproxy":
        _run(minproxy(args.port, args.upstream.rstrip("/")))
    else:
        pairs = [(item.split("=", 1)[0], int(item.split("=", 1)[1])) for item in args.listeners]
        _run(upstreams(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
