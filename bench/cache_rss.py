"""The memory cache against `cache.max_bytes`: distinct small GETs through the proxy, RSS as it fills.

    python -m bench.cache_rss [--max-bytes 64MiB] [--requests 200000] [--connections 16] [--json FILE]

A fake provider (bench.servers) answers every path with the same small JSON body; the proxy
(`python -m proxy run`, its own process, LOG_LEVEL=warning) caches each distinct path for 24 h. Every
`--every` requests the proxy's RSS (VmRSS) is sampled next to what `/health/integrations/cache` says
the cache holds, so the table shows whether RSS stays within the budget plus the documented
overhead (docs/resilience.md, "Cache": the HIT shortcut's memo and the allocator) once eviction has begun.
`make bench-cache` runs it with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import PYTHON, Processes, free_port, proxy_config, rss_kib, wait_http
from proxy.config.values import parse_size

MIB = 1024 * 1024


async def _client(port: int, paths: Any, done: list[int]) -> None:
    """One keep-alive connection asking for the next path until there is none."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for path in paths:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{path}: {head.splitlines()[0]!r}")
            done[0] += 1
    finally:
        writer.close()


def _cache(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url + "/health/integrations/cache", timeout=5) as reply:
        return json.loads(reply.read())


async def _load(port: int, url: str, pid: int, requests: int, connections: int, every: int) -> list[dict[str, Any]]:
    paths = iter(f"/fx/latest/X{n:08d}" for n in range(requests))
    done = [0]
    samples: list[dict[str, Any]] = []
    clients = [asyncio.ensure_future(_client(port, paths, done)) for _ in range(connections)]
    next_sample = 0
    while not all(c.done() for c in clients):
        await asyncio.sleep(0.2)
        if done[0] >= next_sample or all(c.done() for c in clients):
            cache = await asyncio.to_thread(_cache, url)
            samples.append({"requests": done[0], "rss_mib": rss_kib(pid) / 1024, "entries": cache.get("entries"),
                            "cache_mib": (cache.get("bytes") or 0) / MIB})
            print(f"cache_rss: {samples[-1]}", flush=True)
            next_sample = done[0] + every
    for client in clients:
        client.result()  # a failed connection fails the run
    return samples


def run(max_bytes: int, requests: int, connections: int, every: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-cache-rss-") as tmp:
        processes = Processes(Path(tmp), pin=False)
        try:
            upstream_port, proxy_port = free_port(), free_port()
            upstream = processes.start("upstream", [PYTHON, "-m", "bench.servers", "upstreams", f"fx={upstream_port}"])
            wait_http(f"http://127.0.0.1:{upstream_port}/__bench/calls", upstream)
            config = Path(tmp) / "routes.yaml"
            config.write_text(proxy_config(
                {"fx": {"cache": {"ttl": "24h", "stale": "1d"}, "retry": "NONE",
                        "upstreams": [{"name": "fx_primary", "url": f"http://127.0.0.1:{upstream_port}"}]}},
                cache={"backend": "memory", "max_bytes": max_bytes, "max_stale": "1d"}))
            proxy = processes.start("proxy", [PYTHON, "-m", "proxy", "run", "--config", str(config),
                                              "--listen", f"127.0.0.1:{proxy_port}", "--metrics-listen", "127.0.0.1:0"],
                                    env={"LOG_LEVEL": "warning"})
            url = f"http://127.0.0.1:{proxy_port}"
            wait_http(url + "/health/ready", proxy)
            time.sleep(0.5)
            idle = rss_kib(proxy.pid) / 1024
            samples = asyncio.run(_load(proxy_port, url, proxy.pid, requests, connections, every))
        finally:
            processes.stop_all()
    last = samples[-1]
    return {"max_bytes_mib": max_bytes / MIB, "requests": requests, "idle_rss_mib": idle, "samples": samples,
            "final_rss_mib": last["rss_mib"], "growth_mib": last["rss_mib"] - idle,
            "over_budget_mib": last["rss_mib"] - idle - max_bytes / MIB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_rss", description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-bytes", default="64MiB", help="cache.max_bytes (default: the proxy's default)")
    parser.add_argument("--requests", type=int, default=200_000, help="distinct GETs to send")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--every", type=int, default=20_000, help="requests between samples")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = run(parse_size(args.max_bytes), args.requests, args.connections, args.every)
    print(f"\nmax_bytes {result['max_bytes_mib']:.0f} MiB, idle RSS {result['idle_rss_mib']:.1f} MiB\n")
    print("| requests | RSS MiB | growth MiB | cache says MiB | entries |")
    print("|---:|---:|---:|---:|---:|")
    for sample in result["samples"]:
        print(f"| {sample['requests']} | {sample['rss_mib']:.1f} | {sample['rss_mib'] - result['idle_rss_mib']:.1f} "
              f"| {sample['cache_mib']:.1f} | {sample['entries']} |")
    print(f"\nRSS growth past max_bytes: {result['over_budget_mib']:+.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
