"""How a replica reaches the shared Redis: one node, a Sentinel-watched master, or a Cluster.

Every part that keeps state in Redis (the cache, coalescing locks, quota buckets, the outbox,
shared rests and breakers) opens its client here, so the three shapes and TLS are handled once:

- `url` alone: one node (`redis://`, `rediss://` or `unix://`), as before;
- `cluster: true`: redis-py's `RedisCluster`, discovering the masters from the node in `url`;
- `sentinel`: the master the Sentinels name for `service`, looked up again after a failover.

Keys the proxy writes stay Cluster-friendly: one key per cache entry, lock, bucket and rest;
multi-key scripts touch keys sharing one hash tag (`{...}`), so they land in one slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from proxy.config.model import SentinelSettings, TlsSettings


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where the shared Redis is: `url`, and how to read it (Cluster seed, Sentinel, TLS files)."""

    url: str
    cluster: bool = False
    sentinel: SentinelSettings | None = None
    tls: TlsSettings | None = None

    @property
    def shape(self) -> str:
        """`cluster`, `sentinel` or `single`, as /health and the docs name it."""
        return "cluster" if self.cluster else "sentinel" if self.sentinel is not None else "single"


def target_of(settings: Any) -> RedisTarget:
    """The RedisTarget of a `CacheSettings` (or a bare URL, as older callers and tests pass)."""
    if isinstance(settings, RedisTarget):
        return settings
    if isinstance(settings, str):
        return RedisTarget(settings)
    return RedisTarget(settings.url, cluster=settings.cluster, sentinel=settings.sentinel, tls=settings.tls)


def _tls_options(target: RedisTarget) -> dict[str, Any]:
    tls = target.tls
    if tls is None:
        return {}
    options: dict[str, Any] = {}
    if tls.ca_file:
        options["ssl_ca_certs"] = tls.ca_file
    if tls.cert_file:
        options["ssl_certfile"] = tls.cert_file
    if tls.key_file:
        options["ssl_keyfile"] = tls.key_file
    return options


def open_client(target: RedisTarget | str, *, socket_timeout: float | None, connect_timeout: float,
                max_connections: int | None = None, **options: Any) -> Any:
    """A redis.asyncio client for `target` (Redis, RedisCluster or a Sentinel master client).

    `options` go to every connection (retry, health_check_interval, decode_responses, ...).
    """
    target = target_of(target)
    options = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout,
               "decode_responses": False, **_tls_options(target), **options}
    if target.sentinel is not None:
        sentinel = target.sentinel
        asking: dict[str, Any] = {"socket_timeout": max(connect_timeout, 0.2),
                                  "socket_connect_timeout": max(connect_timeout, 0.2)}
        if sentinel.sentinel_password:
            asking["password"] = sentinel.sentinel_password  # Sentinels with `requirepass` of their own
        guard = Sentinel(list(sentinel.hosts), sentinel_kwargs=asking)
        if target.tls is not None or target.url.startswith("rediss://"):
            options["ssl"] = True
        if max_connections is not None:
            options["max_connections"] = max_connections
        return guard.master_for(sentinel.service, db=sentinel.db, password=sentinel.password or None, **options)
    if target.cluster:
        # The caller's deadline bounds redirects and retries after a lost node.
        return RedisCluster.from_url(target.url, max_connections=max_connections or 100, **options)
    if max_connections is not None:
        options["max_connections"] = max_connections
    return aioredis.Redis.from_url(target.url, **options)
