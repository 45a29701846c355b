"""Provider quotas: token-bucket rate limits, API-key rotation and daily resets (pure, on an injected clock).

A rate-limited upstream is skipped like an open breaker, so the proxy falls back or serves
a stale copy instead of burning a vendor's quota and collecting 429s. With the Redis cache
backend the bucket lives in Redis, so replicas share one quota. A key whose daily quota is
spent rests until the vendor's `DailyReset`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

from proxy.clock import Clock


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`rate` requests per `per` seconds, with bursts of up to `burst` (default: rate)."""

    rate: float
    per: float
    burst: float

    @property
    def per_second(self) -> float:
        return self.rate / self.per


class TokenBucket:
    """An in-process token bucket: `take()` is True when a request may go out now."""

    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self._limit = limit
        self._clock = clock
        self._tokens = limit.burst
        self._at = clock.monotonic()

    def take(self) -> bool:
        now = self._clock.monotonic()
        self._tokens = min(self._limit.burst, self._tokens + (now - self._at) * self._limit.per_second)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    async def take_shared(self) -> bool:
        return self.take()

    def wait_hint(self) -> float:
        """Seconds until the next token (0 when one is there)."""
        now = self._clock.monotonic()
        tokens = min(self._limit.burst, self._tokens + (now - self._at) * self._limit.per_second)
        return max(0.0, (1.0 - tokens) / self._limit.per_second)

    def snapshot(self) -> dict[str, Any]:
        """Tokens there now (refilled to this moment, none taken), for the status page."""
        now = self._clock.monotonic()
        tokens = min(self._limit.burst, self._tokens + (now - self._at) * self._limit.per_second)
        return {"tokens": round(tokens, 2), "burst": self._limit.burst, "perSecond": self._limit.per_second,
                "shared": False}


# One round trip: refill by elapsed time, take a token if there is one, keep the key alive.
_BUCKET = """
local tokens = tonumber(redis.call('hget', KEYS[1], 't'))
local at = tonumber(redis.call('hget', KEYS[1], 'a'))
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tokens == nil then tokens = burst; at = now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local ok = 0
if tokens >= 1 then tokens = tokens - 1; ok = 1 end
redis.call('hset', KEYS[1], 't', tostring(tokens), 'a', tostring(now))
redis.call('expire', KEYS[1], tonumber(ARGV[4]))
return ok
"""


class SharedTokenBucket:
    """A token bucket in Redis shared by replicas; the local bucket answers while Redis cannot."""

    def __init__(self, limit: RateLimit, clock: Clock, client: Any, key: str, op_timeout: float) -> None:
        self._limit = limit
        self._clock = clock
        self._client = client
        self._key = key
        self._op_timeout = op_timeout
        self._local = TokenBucket(limit, clock)
        self._expire = max(2, math.ceil(limit.burst / limit.per_second) + 1)

    def take(self) -> bool:
        return self._local.take()

    def wait_hint(self) -> float:
        """Seconds until the next token, as this replica's own bucket sees it."""
        return self._local.wait_hint()

    def snapshot(self) -> dict[str, Any]:
        """This replica's own bucket (the shared one is in Redis, read by no status call)."""
        return {**self._local.snapshot(), "shared": True}

    async def take_shared(self) -> bool:
        try:
            async with asyncio.timeout(self._op_timeout):
                allowed = await self._client.eval(_BUCKET, 1, self._key, repr(self._clock.time()),
                                                  repr(self._limit.per_second), repr(self._limit.burst), self._expire)
            return bool(allowed)
        except Exception:  # Redis down or slow: keep the quota per replica rather than not at all
            return self._local.take()


_DAILY_RESET = re.compile(r"^\s*([01]\d|2[0-3]):([0-5]\d)\s*(?:(Z)|([+-])(0\d|1[0-4]):([0-5]\d))\s*$")


@dataclass(frozen=True, slots=True)
class DailyReset:
    """When a vendor's daily quota comes back: a time of day at a fixed UTC offset (no DST)."""

    minute: int  # minutes after local midnight
    offset: int  # minutes east of UTC

    @classmethod
    def parse(cls, value: object) -> "DailyReset":
        """`00:00+09:00` (midnight Korea time), `HH:MMZ` for UTC."""
        found = _DAILY_RESET.match(value) if isinstance(value, str) else None
        if found is None:
            raise ValueError(f"bad daily reset {value!r}: use a time of day with its UTC offset, such as 00:00+09:00")
        hours, minutes, utc, sign, offset_hours, offset_minutes = found.groups()
        offset = 0 if utc else (int(offset_hours) * 60 + int(offset_minutes)) * (-1 if sign == "-" else 1)
        return cls(int(hours) * 60 + int(minutes), offset)

    def next_after(self, now: float) -> float:
        """The first reset strictly after `now` (wall epoch seconds)."""
        local = now + self.offset * 60
        reset = math.floor(local / 86400) * 86400 + self.minute * 60
        if reset <= local:
            reset += 86400
        return reset - self.offset * 60

    def __str__(self) -> str:
        hours, minutes = divmod(abs(self.offset), 60)
        return f"{self.minute // 60:02d}:{self.minute % 60:02d}{'-' if self.offset < 0 else '+'}{hours:02d}:{minutes:02d}"


def fingerprint(value: str) -> str:
    """A short, non-reversible name for a key, safe for logs and health output."""
    return hashlib.sha256(value.encode()).hexdigest()[:8]


class KeyRing:
    """An upstream's API keys: the first one not spent is used; spent keys come back when their time is up."""

    def __init__(self, keys: tuple[str, ...], clock: Clock, cooldown: float) -> None:
        self._keys = keys
        self._clock = clock
        self._cooldown = cooldown
        self._spent_until = [0.0] * len(keys)
        self._reasons: list[str | None] = [None] * len(keys)

    def current(self) -> tuple[int, str] | None:
        now = self._clock.time()
        for index, key in enumerate(self._keys):
            if self._spent_until[index] <= now:
                return index, key
        return None

    def wait_hint(self) -> float:
        """Seconds until a key is ready again (0 when one is)."""
        now = self._clock.time()
        return max(0.0, min(self._spent_until, default=0.0) - now)

    def spend(self, index: int, retry_after: float | None, reason: str | None = None) -> float:
        """Mark a key spent (quota or auth refused) for `retry_after` seconds, else the cooldown;
        returns until when (wall epoch)."""
        return self.rest(index, self._clock.time() + (retry_after if retry_after is not None else self._cooldown),
                         reason)

    def rest(self, index: int, until: float, reason: str | None = None) -> float:
        """Mark a key spent until `until` (wall epoch), with why; returns until when it rests."""
        if until >= self._spent_until[index]:
            self._spent_until[index] = until
            self._reasons[index] = reason
        return self._spent_until[index]

    def rest_until(self, key_fingerprint: str, until: float) -> bool:
        """Rest the key with this fingerprint until `until` (another replica saw it refused); False
        when no key has that fingerprint or it already rests as long."""
        for index, key in enumerate(self._keys):
            if fingerprint(key) == key_fingerprint and until > self._spent_until[index]:
                self._spent_until[index] = until
                self._reasons[index] = None  # another replica saw why; this one only knows until when
                return True
        return False

    def snapshot(self) -> list[dict[str, Any]]:
        now = self._clock.time()
        return [{"fingerprint": fingerprint(key), "spent": until > now, "spentUntil": until if until > now else None,
                 "reason": reason if until > now else None}
                for key, until, reason in zip(self._keys, self._spent_until, self._reasons)]
