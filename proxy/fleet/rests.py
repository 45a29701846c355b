"""Rests shared by every replica on one Redis: a `Retry-After` one replica was given holds for all.

When an upstream asks for a rest (a 429 or 503 with `Retry-After`) or refuses an API key, the
replica that was told writes `{prefix}rest:{upstream}` (or `{prefix}keyrest:{upstream}:{key
fingerprint}`) holding the rest and expiring with it, and publishes the same on `{prefix}rests`.
Every replica listens and applies what it hears to its own breaker or key ring, so the fleet sends
the vendor nothing inside the window. A replica that (re)connects reads the keys of its upstreams
first, so a rest that began while it was away still holds.

What arrives from Redis is data to validate, never code: a small JSON object of a fixed shape,
for an upstream of this replica's route table, or it is ignored. While Redis is unreachable each
replica rests its upstreams on its own, as it would without Redis; the listener reconnects by itself.
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any, Callable

import msgspec

from proxy import signals
from proxy.clock import Clock
from proxy.fleet.connection import RedisTarget
from proxy.fleet.link import TIMEOUT, FleetLink

_MAX_MESSAGE = 1024
# Write the rest where a replica that starts later finds it, and tell the ones listening now. The
# channel is an argument, not a key: a Cluster checks that a script's keys share one slot.
_PUBLISH = "redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return redis.call('publish', ARGV[3], ARGV[1])"


class RestMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One rest as it travels between replicas (and is stored for the ones that start later)."""

    kind: str              # rest (the upstream) | key (one of its API keys)
    upstream: str
    until: float           # wall-clock epoch seconds
    source: str            # the replica that was told; it ignores its own messages
    key: str = ""          # kind key: the key's fingerprint, never the key
    status: int = 0        # kind key: the status that refused it


_decoder = msgspec.json.Decoder(RestMessage)
_encoder = msgspec.json.Encoder()


class SharedRests:
    """Publishes this replica's rests and applies the fleet's (see the module docstring).

    Subscribe it to the event bus; `runtime` returns the current Runtime (its breakers, key rings
    and route table), which a reload replaces. `link` is the replica's FleetLink (or where to
    open one of its own).
    """

    sees_requests = False  # only rests and refused keys: the HIT fast path need not emit for it

    def __init__(self, link: FleetLink | RedisTarget | str, prefix: str, *, runtime: Callable[[], Any], clock: Clock,
                 emit: signals.Subscriber = signals.discard) -> None:
        self._own_link = not isinstance(link, FleetLink)
        self._link = link if isinstance(link, FleetLink) else FleetLink(link, emit=emit)
        self._prefix = prefix
        self._channel = f"{prefix}rests"
        self._runtime = runtime
        self._clock = clock
        self._emit = emit
        self.source = os.urandom(8).hex()
        self._sending: set[asyncio.Task[None]] = set()
        self._link.on(self._channel, self.apply, self._catch_up)

    @property
    def listening(self) -> bool:
        """Subscribed right now (for /health)."""
        return self._link.listening

    # --- out: what this replica was told ------------------------------------------------------

    def __call__(self, event: Any) -> None:
        if type(event) is signals.UpstreamRested and not event.shared:
            message = RestMessage("rest", event.provider, event.until, self.source)
            self._send(message, f"{self._prefix}rest:{event.provider}")
        elif type(event) is signals.KeySpent and not event.shared:
            message = RestMessage("key", event.provider, event.until, self.source, event.fingerprint, event.status)
            self._send(message, f"{self._prefix}keyrest:{event.provider}:{event.fingerprint}")

    def _send(self, message: RestMessage, key: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._publish(message, key))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _publish(self, message: RestMessage, key: str) -> None:
        ttl_ms = math.ceil((message.until - self._clock.time()) * 1000)
        if ttl_ms <= 0:
            return
        try:
            async with asyncio.timeout(TIMEOUT):
                await self._link.client.eval(_PUBLISH, 1, key, _encoder.encode(message), ttl_ms, self._channel)
        except Exception as exc:  # Redis down: this replica rests on its own, as without Redis
            self._emit(signals.CacheError(backend="redis", operation="rest_publish", error=f"{type(exc).__name__}: {exc}"))

    # --- in: what the fleet was told -------------------------------------------------------------

    def start(self) -> None:
        if self._own_link:
            self._link.start()

    async def stop(self) -> None:
        tasks = list(self._sending)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_link:
            await self._link.stop()

    async def _catch_up(self) -> None:
        """Apply the rests stored for this replica's upstreams (begun while it was not listening)."""
        runtime = self._runtime()
        names = [f"{self._prefix}rest:{u.name}" for u in runtime.config.upstreams()]
        for upstream in runtime.config.upstreams():
            ring = runtime.keyrings.get(upstream.name)
            if ring is not None:
                names += [f"{self._prefix}keyrest:{upstream.name}:{k['fingerprint']}" for k in ring.snapshot()]
        if not names:
            return
        # One GET per key in a pipeline: the keys may live on several masters of a Cluster.
        async with asyncio.timeout(TIMEOUT):
            async with self._link.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.get(name)
                values = await pipe.execute()
        for value in values:
            if value is not None:
                self.apply(value, catching_up=True)

    def apply(self, data: Any, *, catching_up: bool = False) -> bool:
        """Apply one published (or stored) rest; False when it is not one for this replica to apply."""
        if not isinstance(data, (bytes, bytearray)) or len(data) > _MAX_MESSAGE:
            return False
        try:
            message = _decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        if (message.source == self.source and not catching_up) or not math.isfinite(message.until) \
                or message.until <= self._clock.time():
            return False
        runtime = self._runtime()
        if runtime.upstream(message.upstream) is None:
            return False  # not an upstream of this route table
        if message.kind == "rest":
            breaker = runtime.breakers.get(message.upstream)
            if breaker is None:
                return False
            breaker.rest(message.until, shared=True)
            return True
        if message.kind == "key":
            ring = runtime.keyrings.get(message.upstream)
            if ring is None or not ring.rest_until(message.key, message.until):
                return False
            upstream = runtime.upstream(message.upstream)
            left = ring.current()
            self._emit(signals.KeySpent(upstream.service, upstream.name, message.key, message.status, message.until,
                                       0 if left is None else len(upstream.keys) - left[0], shared=True))
            return True
        return False
