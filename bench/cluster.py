"""The Redis-Cluster HIT cases: a throwaway 3-master Cluster next to the single-node Redis, same run.

`ours_cluster_hit` is `ours_redis_hit` with `cache.cluster: true` (hot copies still answer from
the in-process tier); the two `*_remote_hit` cases set `cache.local_ttl: 0`, so every HIT is a
round trip to Redis: what one node and a Cluster each cost per HIT that reaches them.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any, Callable

CASES = ("ours_redis_remote_hit", "ours_cluster_hit", "ours_cluster_remote_hit")
WHAT = {"ours_cluster_hit": "our proxy, cache.backend redis on a 3-master Cluster, HIT",
        "ours_redis_remote_hit": "our proxy, single-node Redis, local_ttl 0 (every HIT a Redis GET)",
        "ours_cluster_remote_hit": "our proxy, 3-master Cluster, local_ttl 0 (every HIT a Redis GET)"}


def start(procs: Any, port: Callable[[str], int], redis_server: str, redis_cli: str, cpu: str | None) -> str:
    """Start three cluster-enabled redis-servers (and their bus ports), join them; the seed URL."""
    ports = [port(f"cluster_{n}") for n in range(3)]
    for n, number in enumerate(ports):
        procs.start(f"cluster_{n}", [
            redis_server, "--port", str(number), "--cluster-port", str(port(f"cluster_bus_{n}")),
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--cluster-enabled", "yes",
            "--cluster-config-file", f"{procs.logdir}/nodes-{number}.conf", "--dir", str(procs.logdir)], cpu=cpu)
    deadline = time.monotonic() + 10
    while not all(_ask(redis_cli, p, "ping") == "PONG" for p in ports):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster's redis-servers did not start")
        time.sleep(0.05)
    subprocess.run([redis_cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
                    "--cluster-yes"], capture_output=True, timeout=30, check=True)
    while not all("cluster_state:ok" in _ask(redis_cli, p, "cluster", "info") for p in ports):
        if time.monotonic() > deadline + 20:
            raise RuntimeError("the cluster did not cover every slot")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{ports[0]}"


def _ask(redis_cli: str, port: int, *command: str) -> str:
    done = subprocess.run([redis_cli, "-h", "127.0.0.1", "-p", str(port), *command], capture_output=True, text=True,
                          timeout=5)
    return done.stdout.strip()


def caches(single_url: str | None, cluster_url: str | None, prefix: str) -> dict[str, dict[str, Any]]:
    """The `cache:` section of each case's proxy (cases whose Redis is missing are left out)."""
    out: dict[str, dict[str, Any]] = {}
    if single_url:
        out["ours_redis_remote"] = {"backend": "redis", "url": single_url, "prefix": prefix, "local_ttl": 0}
    if cluster_url:
        out["ours_cluster"] = {"backend": "redis", "url": cluster_url, "cluster": True, "prefix": prefix}
        out["ours_cluster_remote"] = {"backend": "redis", "url": cluster_url, "cluster": True, "prefix": prefix,
                                      "local_ttl": 0}
    return out
