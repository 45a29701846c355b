"""Load generators: `wrk` when installed, a lean Python one otherwise, and an open-loop one for faults.

    python -m bench.loadgen closed --url URL -c 50 -d 5     keep-alive connections, each sending the next
                                                            request when the last answer is read
    python -m bench.loadgen open --base URL --path P ... --rate 200 -d 12
                                                            requests at fixed times, whatever the answers
                                                            take; latency counts from the planned send time

Each prints one JSON object on stdout. All targets are loopback URLs given by the harness.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import subprocess
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import orjson


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


# --- wrk --------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not found:
        raise ValueError(f"bad wrk latency {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/sec, request count, latency percentiles and errors from `wrk --latency` output."""
    result: dict[str, Any] = {"non_2xx": 0, "socket_errors": 0}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not rps:
        raise ValueError(f"no Requests/sec in wrk output:\n{output}")
    result["rps"] = float(rps.group(1))
    count = re.search(r"(\d+) requests in ([\d.]+\w+)", output)
    result["requests"] = int(count.group(1)) if count else None
    for q, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.M):
        result[f"p{q}_ms"] = _ms(value)
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non:
        result["non_2xx"] = int(non.group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if errors:
        result["socket_errors"] = sum(int(g) for g in errors.groups())
    return result


def wrk_command(url: str, connections: int, duration: float, threads: int = 1) -> list[str]:
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "10s", url]


# --- the Python closed-loop generator ----------------------------------------------------------

class _Connection(asyncio.Protocol):
    """One keep-alive connection sending the same GET again as soon as an answer is complete."""

    def __init__(self, run: "_ClosedRun") -> None:
        self._run = run
        self._buffer = bytearray()
        self._sent = 0.0
        self._transport: asyncio.Transport | None = None
        self.finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        self._sent = time.perf_counter()
        assert self._transport is not None
        self._transport.write(self._run.request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buffer[:end]).lower()
        found = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
        if found:
            total = end + 4 + int(found.group(1))
            if len(self._buffer) < total:
                return
        else:  # chunked: complete at the last-chunk marker
            marker = self._buffer.find(b"0\r\n\r\n", end + 4)
            if marker < 0:
                return
            total = marker + 5
        del self._buffer[:total]
        self._run.record(int(head[9:12]), (time.perf_counter() - self._sent) * 1000.0)
        if time.perf_counter() < self._run.deadline:
            self._send()
        else:
            self.finished = True
            assert self._transport is not None
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self._run.errors += 1
        self._run.closed(self)


class _ClosedRun:
    def __init__(self, host: str, port: int, path: str, connections: int, duration: float) -> None:
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        self.host, self.port, self.connections = host, port, connections
        self.deadline = time.perf_counter() + duration
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors = 0
        self._open = 0
        self._done: asyncio.Future[None] | None = None

    def record(self, status: int, latency_ms: float) -> None:
        self.statuses[status] += 1
        self.latencies.append(latency_ms)

    def closed(self, connection: _Connection) -> None:
        self._open -= 1
        if self._open == 0 and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def run(self, duration: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        started = time.perf_counter()
        for _ in range(self.connections):
            try:
                await loop.create_connection(lambda: _Connection(self), self.host, self.port)
                self._open += 1
            except OSError:
                self.errors += 1
        if self._open:
            try:
                await asyncio.wait_for(asyncio.shield(self._done), duration + 15)
            except TimeoutError:
                pass
        elapsed = time.perf_counter() - started
        count = len(self.latencies)
        return {"rps": count / elapsed if elapsed > 0 else 0.0, "requests": count,
                "p50_ms": percentile(self.latencies, 50), "p90_ms": percentile(self.latencies, 90),
                "p99_ms": percentile(self.latencies, 99),
                "non_2xx": sum(n for s, n in self.statuses.items() if not 200 <= s < 400),
                "socket_errors": self.errors}


async def closed_loop(url: str, connections: int, duration: float) -> dict[str, Any]:
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    run = _ClosedRun(parts.hostname or "127.0.0.1", parts.port or 80, path, connections, duration)
    return await run.run(duration)


# --- the open-loop generator (fault scenarios) -------------------------------------------------

# The harness warms caches with the same headers: Accept-Encoding is part of the proxy's cache key.
_HEADERS = {"Accept-Encoding": "identity"}


async def open_loop(base: str, paths: list[str], rate: float, duration: float, timeout: float) -> dict[str, Any]:
    """Send `rate` requests a second for `duration` seconds, cycling through `paths`.

    Returns one record per request: [planned offset s, status (0 = no answer), latency ms]. Latency
    is measured from the planned send time, so a stalled proxy cannot hide its queue.
    """
    import aiohttp

    loop = asyncio.get_running_loop()
    records: list[list[float]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        async def one(offset: float, planned: float, path: str) -> None:
            status = 0
            try:
                async with session.get(base + path, headers=_HEADERS, timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
                    await reply.read()
                    status = reply.status
            except (aiohttp.ClientError, TimeoutError, OSError):
                status = 0
            records.append([round(offset, 4), status, round((time.perf_counter() - planned) * 1000.0, 3)])

        total = max(1, int(rate * duration))
        start = time.perf_counter() + 0.05  # uvloop's loop.time() only has millisecond resolution
        offsets: dict[asyncio.Task[None], float] = {}
        for i in range(total):
            planned = start + i / rate
            wait = planned - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            offsets[loop.create_task(one(i / rate, planned, paths[i % len(paths)]))] = i / rate
        _, pending = await asyncio.wait(offsets, timeout=timeout + 2)
        for task in pending:  # bounded: what is still open after the client timeout counts as no answer
            task.cancel()
            records.append([round(offsets[task], 4), 0, timeout * 1000.0])
    return {"sent": total, "records": records}


def _run(main: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    kinds = parser.add_subparsers(dest="kind", required=True)
    closed = kinds.add_parser("closed")
    closed.add_argument("--url", required=True)
    closed.add_argument("-c", "--connections", type=int, default=50)
    closed.add_argument("-d", "--duration", type=float, default=5.0)
    opened = kinds.add_parser("open")
    opened.add_argument("--base", required=True)
    opened.add_argument("--path", action="append", required=True)
    opened.add_argument("--rate", type=float, default=200.0)
    opened.add_argument("-d", "--duration", type=float, default=12.0)
    opened.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.kind == "closed":
        result = _run(closed_loop(args.url, args.connections, args.duration))
    else:
        result = _run(open_loop(args.base, args.path, args.rate, args.duration, args.timeout))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    return 0


def run_wrk(url: str, connections: int, duration: float, prefix: list[str]) -> dict[str, Any]:
    """Run wrk (pinned with `prefix`, e.g. taskset) and parse its report."""
    done = subprocess.run(prefix + wrk_command(url, connections, duration), capture_output=True, text=True,
                          timeout=duration + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)


if __name__ == "__main__":
    sys.exit(main())
