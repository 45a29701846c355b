"""Entries in Redis, shared by every replica; fails open.

One Redis key per entry (`prefix + cache key`, Cluster friendly) holding a msgpack envelope, with
the key's TTL at the entry's `stale_until`. Every call is bounded by `op_timeout`. When Redis
fails, calls answer "nothing cached" and the store stays away from Redis for `backoff` seconds,
so a dead Redis costs requests nothing; then one call probes it again.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from proxy.cache.entry import Entry, decode_entry, encode_entry
from proxy.clock import Clock
from proxy.resilience.deadlines import Deadlines, for_running_loop
from proxy.signals import CacheBackendState, CacheError, discard

T = TypeVar("T")
BACKEND = "redis"
# Cache calls in flight to Redis per process (so at most that many of its connections). A call
# holds one for a round trip (well under a millisecond in a pod's network), so 64 carry tens
# of thousands of calls a second.
MAX_CONNECTIONS = 64
_FIRST_CONNECT = 1.0  # seconds the start-up ping may take

# Opens the client: connect(where, *, socket_timeout, connect_timeout, max_connections, **options). The
# default reaches one node by URL; proxy.fleet.connection.open_client also reaches a Cluster or a Sentinel's master.
Connect = Callable[..., Any]


def open_node(url: str, *, socket_timeout: float | None, connect_timeout: float, max_connections: int | None = None,
              **options: Any) -> Any:
    """A client of the one Redis node at `url`."""
    return aioredis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                                   max_connections=max_connections, decode_responses=False, **options)


def _is_cluster(client: Any) -> bool:
    """Whether `client` spreads keys over several masters (SCAN works per node there)."""
    return isinstance(client, RedisCluster)


class _Unavailable:
    """What `_call` returns when Redis was not asked or did not answer."""


_UNAVAILABLE = _Unavailable()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "TimeoutError: no answer in time"
    return f"{type(exc).__name__}: {exc}"


# Compare-and-delete, so a replica never releases a lock another replica took after ours expired.
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class RedisStore:
    """A `Store` in Redis that never fails a request (see the module docstring).

    `url` is where `connect` opens the client: a URL for the default `open_node`, or the
    `RedisTarget` that `proxy.fleet.connection.open_client` reads (a Cluster, a Sentinel, TLS).
    """

    name = BACKEND

    def __init__(
        self,
        url: Any,
        *,
        prefix: str = "rp:",
        clock: Clock,
        emit: Callable[[Any], None] = discard,
        op_timeout: float = 0.05,
        backoff: float = 5.0,
        scan_count: int = 500,
        health_check_interval: int = 30,
        max_connections: int = MAX_CONNECTIONS,
        connect: Connect = open_node,
    ) -> None:
        if op_timeout <= 0 or backoff < 0 or scan_count <= 0 or max_connections <= 0:
            raise ValueError("op_timeout, scan_count and max_connections must be positive, backoff not negative")
        self._prefix = prefix
        self._clock = clock
        self._emit = emit
        self._op_timeout = op_timeout
        self._backoff = backoff
        self._scan_count = scan_count
        # The deadline in _call is the budget; the socket timeouts are only a backstop. One
        # quick retry lets a pooled connection that died with a Redis restart be replaced at once.
        # At most `max_connections` calls are in flight; more wait for a slot, within the budget.
        # redis-py's pool refuses a call past its own limit instead (MaxConnectionsError), which we
        # would take for Redis failing and serve without it for `backoff` seconds; its waiting
        # pool costs a lock round per call (a fifth of the calls per second). The pool's limit
        # stays above ours for the others on this client (the rate-limit buckets).
        self._slots = asyncio.Semaphore(max_connections)
        self._deadlines: Deadlines | None = None  # the commands' time limits (one timer, not one per call)
        self._max_calls = max_connections
        self._client = connect(
            url,
            max_connections=2 * max_connections,
            socket_timeout=op_timeout * 2,
            connect_timeout=max(op_timeout * 2, _FIRST_CONNECT),  # the budget in _call is what bounds a call
            health_check_interval=health_check_interval,
            retry=Retry(NoBackoff(), 1),
        )
        self._connected: bool | None = None  # unknown until the first call
        self._down_until = float("-inf")
        self._probing = False

    @property
    def connected(self) -> bool:
        return self._connected is True

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def redis_client(self) -> Any:
        """The redis.asyncio client, for other shared state (rate-limit buckets) on the same Redis."""
        return self._client

    async def get(self, key: str) -> Entry | None:
        data = await self._call("get", lambda: self._client.get(self._prefix + key))
        if data is _UNAVAILABLE or data is None:
            return None
        entry = decode_entry(data)
        if entry is None:
            self._emit(CacheError(backend=BACKEND, operation="decode", error=f"unreadable entry under {key!r}"))
            await self._call("delete", lambda: self._client.unlink(self._prefix + key))
            return None
        if self._clock.time() >= entry.stale_until:  # the key TTL is rounded up to whole seconds
            return None
        return entry

    async def set(self, key: str, entry: Entry) -> None:
        ttl = math.ceil(entry.stale_until - self._clock.time())
        if ttl <= 0:
            return
        data = encode_entry(entry)
        await self._call("set", lambda: self._client.set(self._prefix + key, data, ex=ttl))

    async def delete(self, key: str) -> None:
        await self._call("delete", lambda: self._client.unlink(self._prefix + key))

    async def purge(self, service: str) -> int:
        """Delete the service's keys with SCAN + UNLINK in batches, on every master of a Cluster;
        each call is bounded on its own.

        The pattern matches `service:` followed by exactly one 64-hex digest, so purging `fx`
        never touches a service named `fx:eu`.
        """
        pattern = _glob_escape(self._prefix + service + ":") + "?" * 64
        if not _is_cluster(self._client):
            return await self._purge_node(pattern, None)
        nodes = await self._call("purge", self._primaries)
        if nodes is _UNAVAILABLE:
            return 0
        deleted = 0
        for node in nodes:
            deleted += await self._purge_node(pattern, node)
        return deleted

    async def _primaries(self) -> list[Any]:
        await self._client.initialize()  # the masters as the Cluster names them now
        return list(self._client.get_primaries())

    async def _purge_node(self, pattern: str, node: Any) -> int:
        """SCAN one node (`node` None: the only one) and UNLINK what matches."""
        where = {} if node is None else {"target_nodes": node}
        deleted = 0
        cursor: int | bytes = 0
        while True:
            scanned = await self._call(
                "purge",
                lambda: self._client.scan(cursor=cursor, match=pattern, count=self._scan_count, **where),
            )
            if scanned is _UNAVAILABLE:
                return deleted
            cursor, keys = scanned
            if isinstance(cursor, dict):  # a Cluster answers per node
                cursor = next(iter(cursor.values()), 0)
            if keys:
                # On a Cluster, redis-py splits a multi-key UNLINK by slot.
                removed = await self._call("purge", lambda: self._client.unlink(*keys))
                if removed is _UNAVAILABLE:
                    return deleted
                deleted += int(removed)
            if int(cursor) == 0:
                return deleted

    async def ping(self) -> bool:
        # The first call may pay a TLS handshake, a Cluster's discovery or a Sentinel lookup:
        # at start it gets a second, so a slow first connection does not mean Redis is down.
        budget = _FIRST_CONNECT if self._connected is None else None
        if budget is not None and _is_cluster(self._client):
            # Every master at once, so no request pays for a connection to one of them later.
            ping = lambda: self._client.ping(target_nodes="primaries")  # noqa: E731
        else:
            ping = self._client.ping
        return await self._call("ping", ping, budget=budget) is not _UNAVAILABLE

    # --- cluster-wide coalescing: a short lock per cache key ------------------------------

    def _lock_key(self, key: str) -> str:
        return f"{self._prefix}lock:{key}"

    async def lock(self, key: str, token: str, ttl: float) -> bool | None:
        """Try to become the one replica fetching `key`: True, False (another holds it), None (Redis down)."""
        taken = await self._call("lock", lambda: self._client.set(
            self._lock_key(key), token, nx=True, px=max(1, int(ttl * 1000))))
        return None if taken is _UNAVAILABLE else bool(taken)

    async def unlock(self, key: str, token: str) -> None:
        """Release the lock if it is still ours (it may have expired and been taken by another)."""
        await self._call("unlock", lambda: self._client.eval(_UNLOCK, 1, self._lock_key(key), token))

    async def locked(self, key: str) -> bool | None:
        held = await self._call("locked", lambda: self._client.exists(self._lock_key(key)))
        return None if held is _UNAVAILABLE else bool(held)

    async def close(self) -> None:
        await self._client.aclose()

    def describe(self) -> dict[str, Any]:
        return {"backend": BACKEND, "connected": self.connected, "entries": None, "bytes": None}

    async def _call(self, operation: str, command: Callable[[], Awaitable[T]],
                    budget: float | None = None) -> T | _Unavailable:
        """Run one Redis command within `op_timeout`, or not at all while Redis is down."""
        probe = self._connected is False
        if probe:
            if self._probing or self._clock.monotonic() < self._down_until:
                return _UNAVAILABLE
            self._probing = True  # one call probes; the others keep answering at once
        slotted = False
        deadlines = self._deadlines = for_running_loop(self._deadlines)
        try:
            async with deadlines.after(max(budget or 0.0, self._op_timeout)), self._slots:
                slotted = True
                result = await command()
        except ResponseError as exc:
            # Redis answered (e.g. WRONGTYPE): the backend is fine, this operation is not.
            self._emit(CacheError(backend=BACKEND, operation=operation, error=_describe_error(exc)))
            self._up()
            return _UNAVAILABLE
        except Exception as exc:  # connection, timeout, protocol: fail open
            if not slotted:
                # The budget went by while every slot was taken: this process is busy, Redis did not
                # fail. This call does without the cache; the others go on using it.
                self._emit(CacheError(backend=BACKEND, operation=operation,
                                      error=f"busy: all {self._max_calls} Redis slots taken for the whole budget"))
                return _UNAVAILABLE
            self._down(operation, exc)
            return _UNAVAILABLE
        finally:
            if probe:
                self._probing = False
        self._up()
        return result

    def _up(self) -> None:
        if self._connected is not True:
            self._connected = True
            self._emit(CacheBackendState(backend=BACKEND, connected=True))

    def _down(self, operation: str, exc: Exception) -> None:
        error = _describe_error(exc)
        self._down_until = self._clock.monotonic() + self._backoff
        self._emit(CacheError(backend=BACKEND, operation=operation, error=error))
        if self._connected is not False:
            self._connected = False
            self._emit(CacheBackendState(backend=BACKEND, connected=False, error=error))
