"""Breakers shared by the fleet: when one replica opens an upstream, every replica skips it.

Opt-in per breaker (`breaker: {shared: true}`). Each replica's breaker still decides on its own
(proxy.resilience.breaker stays pure); this module writes its OPEN and CLOSED decisions to Redis
and makes the other replicas' breakers follow them. Per shared upstream Redis holds, under one
hash tag so every script touching both stays in one Cluster slot:

    {prefix}{breaker:NAME}        hash: `data` (the JSON below), `retry` (epoch ms; `forced`)
    {prefix}{breaker:NAME}:probe  the half-open probe lease: the probing replica's id, PX its time limit

and every change is published on `{prefix}breakers`. After the retry time every replica's
breaker turns HALF_OPEN; before its first probe a replica takes the lease (a script: free or
already ours → taken). Exactly one wins; the others hold the breaker open until the lease runs out
or the winner tells the outcome (its breaker closes: CLOSED is published; or opens again: a new
retry time is published). Admin reset and open act on the whole fleet through `act`.

While Redis is unreachable each replica uses its local breaker, as without `shared`: a probe
goes ahead without a lease, and the link's state is logged and shown in /health.
What arrives from Redis is data to validate, never code.
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any, Callable

import msgspec

from proxy import signals
from proxy.clock import Clock
from proxy.fleet.link import TIMEOUT, FleetLink
from proxy.resilience.breaker import State

# A state written must outlive its retry time by this much, so a replica that starts (or comes
# back) just after it still learns that the fleet is probing, not that all is well.
_AFTER_RETRY_MS = 60_000
_LEASE_SLACK = 1.0  # seconds a probe's lease outlives the probe's own time limit

_OPEN = """
redis.call('del', KEYS[1], KEYS[2])
redis.call('hset', KEYS[1], 'data', ARGV[1], 'retry', ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('pexpire', KEYS[1], ARGV[3]) end
return redis.call('publish', ARGV[4], ARGV[1])
"""
_CLOSE = "redis.call('del', KEYS[1], KEYS[2]) return redis.call('publish', ARGV[2], ARGV[1])"
# {1}: the lease is ours; {0, ms}: another replica holds it for ms more; {2, data}: the fleet's
# state says the breaker is still open (this replica missed a message): follow it instead.
_LEASE = """
local retry = redis.call('hget', KEYS[1], 'retry')
if retry == 'forced' or (retry and tonumber(retry) > tonumber(ARGV[3])) then
  return {2, redis.call('hget', KEYS[1], 'data')}
end
local holder = redis.call('get', KEYS[2])
if holder and holder ~= ARGV[1] then return {0, redis.call('pttl', KEYS[2])} end
redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {1}
"""


class BreakerMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One fleet decision about a breaker, as published and stored."""

    kind: str                # open | closed
    upstream: str
    source: str              # the replica that decided; it ignores its own messages
    retry_at: float | None = None  # kind open: wall-clock epoch seconds; None: forced open until reset


_decoder = msgspec.json.Decoder(BreakerMessage)
_encoder = msgspec.json.Encoder()


class SharedBreakers:
    """Writes this replica's shared-breaker decisions to Redis and follows the fleet's.

    Subscribe it to the event bus; `runtime` returns the current Runtime (breakers, route table).
    """

    sees_requests = False  # only breaker transitions

    def __init__(self, link: FleetLink, prefix: str, *, runtime: Callable[[], Any], clock: Clock,
                 emit: signals.Subscriber = signals.discard) -> None:
        self._link = link
        self._prefix = prefix
        self._channel = f"{prefix}breakers"
        self._runtime = runtime
        self._clock = clock
        self._emit = emit
        self.source = os.urandom(8).hex()
        self._following: set[str] = set()  # upstreams held open because the fleet said so
        self._queue: asyncio.Queue[BreakerMessage] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        link.on(self._channel, self.apply, self._catch_up)

    @property
    def connected(self) -> bool:
        """Whether this replica follows the fleet right now (False: local breakers only)."""
        return self._link.listening

    def _keys(self, upstream: str) -> tuple[str, str]:
        state = f"{self._prefix}{{breaker:{upstream}}}"
        return state, state + ":probe"

    def _shared(self, name: str) -> Any:
        breaker = self._runtime().breakers.get(name)
        return breaker if breaker is not None and breaker.policy.shared else None

    def count(self) -> int:
        """How many breakers of the current route table are shared."""
        return sum(1 for b in self._runtime().breakers.values() if b.policy.shared)

    # --- out: what this replica decided -----------------------------------------------------

    def __call__(self, event: Any) -> None:
        if type(event) is not signals.BreakerTransition or event.reason in ("fleet", "probe_elsewhere", "reset", "forced"):
            return  # followed, not decided here; an operator's reset or open is shared by `act`
        breaker = self._shared(event.provider)
        if breaker is None:
            return
        if event.new == "OPEN":
            self._following.discard(event.provider)
            self._enqueue(BreakerMessage("open", event.provider, self.source, event.retry_at))
        elif event.new == "CLOSED":
            self._following.discard(event.provider)
            self._enqueue(BreakerMessage("closed", event.provider, self.source))

    def _enqueue(self, message: BreakerMessage) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._queue.put_nowait(message)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_all())

    async def _write_all(self) -> None:
        # One writer, in order: an OPEN then CLOSED decided a moment apart must not arrive swapped.
        while not self._queue.empty():
            await self._write(self._queue.get_nowait())

    async def _write(self, message: BreakerMessage) -> bool:
        state, lease = self._keys(message.upstream)
        data = _encoder.encode(message)
        try:
            async with asyncio.timeout(TIMEOUT):
                if message.kind == "closed":
                    await self._link.client.eval(_CLOSE, 2, state, lease, data, self._channel)
                    return True
                breaker = self._shared(message.upstream)
                open_timeout = breaker.policy.open_timeout if breaker is not None else 0.0
                if message.retry_at is None:
                    retry, ttl_ms = "forced", 0
                else:
                    retry = str(math.floor(message.retry_at * 1000))
                    left = message.retry_at - self._clock.time()
                    ttl_ms = max(1, math.ceil((max(left, 0.0) + open_timeout) * 1000) + _AFTER_RETRY_MS)
                await self._link.client.eval(_OPEN, 2, state, lease, data, retry, ttl_ms, self._channel)
                return True
        except Exception as exc:  # Redis down: this replica's breaker decides alone meanwhile
            self._emit(signals.CacheError(backend="redis", operation="breaker_publish",
                                          error=f"{type(exc).__name__}: {exc}"))
            return False

    async def act(self, upstream: str, action: str) -> bool:
        """Share an operator's `reset` or `open` (already done on this replica's breaker) with every
        replica; False when Redis could not be told (it then holds on this replica only)."""
        if self._shared(upstream) is None:
            return False
        self._following.discard(upstream)
        message = BreakerMessage("closed" if action == "reset" else "open", upstream, self.source, None)
        # What was decided before the operator acted goes first.
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        else:
            await self._write_all()
        return await self._write(message)

    async def claim_probe(self, upstream: Any) -> bool:
        """Whether this replica may send the half-open probe to `upstream` now: it took the fleet's
        lease, or Redis cannot tell (each replica then probes for itself). Otherwise its breaker is
        held open until the lease ends or the fleet's state is followed."""
        breaker = self._shared(upstream.name)
        if breaker is None or not self._link.listening:
            return True  # not shared, or the fleet is out of reach: this replica's breaker decides
        state, lease = self._keys(upstream.name)
        lease_ms = math.ceil((upstream.timeout + _LEASE_SLACK) * 1000)
        now_ms = math.floor(self._clock.time() * 1000)
        try:
            async with asyncio.timeout(TIMEOUT):
                answer = await self._link.client.eval(_LEASE, 2, state, lease, self.source, lease_ms, now_ms)
        except Exception as exc:
            self._emit(signals.CacheError(backend="redis", operation="breaker_lease",
                                          error=f"{type(exc).__name__}: {exc}"))
            return True
        verdict = int(answer[0])
        if verdict == 1:
            return True
        if breaker.state is not State.HALF_OPEN:
            return False  # the fleet's word arrived while we asked (it may be newer than this answer)
        if verdict == 2 and self.apply(answer[1], catching_up=True):
            return False
        held_for = max(int(answer[1]) if verdict == 0 else 0, 1) / 1000
        self._following.add(upstream.name)
        breaker.follow_open(self._clock.time() + held_for, reason="probe_elsewhere")
        return False

    # --- in: what the fleet decided ----------------------------------------------------------

    def apply(self, data: Any, *, catching_up: bool = False) -> bool:
        """Follow one published (or stored) decision; False when it is not one to follow here."""
        if not isinstance(data, (bytes, bytearray)) or len(data) > 1024:
            return False
        try:
            message = _decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        if message.source == self.source and not catching_up:
            return False
        breaker = self._shared(message.upstream)
        if breaker is None:
            return False  # not a shared breaker of this route table
        if message.kind == "closed":
            self._following.discard(message.upstream)
            breaker.follow_close()
            return True
        if message.kind != "open" or (message.retry_at is not None and not math.isfinite(message.retry_at)):
            return False
        self._following.add(message.upstream)
        breaker.follow_open(message.retry_at)
        return True

    async def _catch_up(self) -> None:
        """Follow the stored state of every shared breaker (decided while this replica was away)."""
        names = [b.provider for b in self._runtime().breakers.values() if b.policy.shared]
        if not names:
            return
        async with asyncio.timeout(TIMEOUT):
            async with self._link.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hget(self._keys(name)[0], "data")
                values = await pipe.execute()
        for name, value in zip(names, values):
            if value is not None:
                self.apply(value, catching_up=True)
            elif name in self._following:  # the fleet closed it meanwhile (a reset, a probe that worked)
                self._following.discard(name)
                breaker = self._shared(name)
                if breaker is not None:
                    breaker.follow_close()

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
