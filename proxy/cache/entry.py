"""A cached response and its msgpack envelope.

The envelope is decoded into a typed struct, so whatever sits under a cache key in a shared
Redis is data to validate, never code: nothing here unpickles or evaluates anything.
"""

from __future__ import annotations

import math

import msgspec

ENVELOPE_VERSION = 1
_ENTRY_OVERHEAD = 100  # struct, key and bookkeeping, roughly
_FORBIDDEN_IN_HEADERS = ("\r", "\n", "\0")


class Entry(msgspec.Struct, frozen=True, array_like=False, weakref=True):
    """One stored response. Times are wall-clock epoch seconds, so every replica reads the same age."""

    status: int
    headers: list[tuple[str, str]]  # end-to-end headers to replay, in order, duplicates kept
    body: bytes
    stored_at: float
    fresh_until: float
    stale_until: float
    upstream: str  # the upstream that produced the copy (`X-Upstream` on HIT/STALE)

    def age(self, now_wall: float) -> float:
        """Seconds since the copy was stored; never negative, even if clocks disagree."""
        return max(0.0, now_wall - self.stored_at)

    def is_fresh(self, now_wall: float) -> bool:
        """May be served as a HIT."""
        return now_wall < self.fresh_until

    def is_usable_stale(self, now_wall: float) -> bool:
        """May still be served as STALE when upstreams cannot answer."""
        return now_wall < self.stale_until

    @property
    def size(self) -> int:
        """Approximate bytes the entry costs in memory."""
        header_bytes = sum(len(name) + len(value) + 4 for name, value in self.headers)
        return len(self.body) + header_bytes + _ENTRY_OVERHEAD


class _Envelope(msgspec.Struct, frozen=True):
    """The stored form: a msgpack map whose field names are part of the Redis format."""

    v: int
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stored_at: float
    fresh_until: float
    stale_until: float
    upstream: str


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Envelope)


def encode_entry(entry: Entry) -> bytes:
    """The bytes stored under a cache key."""
    return _encoder.encode(
        _Envelope(
            v=ENVELOPE_VERSION,
            status=entry.status,
            headers=entry.headers,
            body=entry.body,
            stored_at=entry.stored_at,
            fresh_until=entry.fresh_until,
            stale_until=entry.stale_until,
            upstream=entry.upstream,
        )
    )


def decode_entry(data: bytes) -> Entry | None:
    """The entry in `data`, or None for anything that is not a valid envelope of this version.

    Never raises: garbage, truncated data, pickles, wrong types or versions all give None.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None
    try:
        envelope = _decoder.decode(data)
    except Exception:  # msgspec.DecodeError / ValidationError, or anything unexpected
        return None
    if envelope.v != ENVELOPE_VERSION or not 100 <= envelope.status <= 599:
        return None
    if not all(map(math.isfinite, (envelope.stored_at, envelope.fresh_until, envelope.stale_until))):
        return None
    # A header with CR/LF replayed to a caller would be response splitting.
    for name, value in envelope.headers:
        if not name or any(c in name or c in value for c in _FORBIDDEN_IN_HEADERS):
            return None
    return Entry(
        status=envelope.status,
        headers=envelope.headers,
        body=envelope.body,
        stored_at=envelope.stored_at,
        fresh_until=envelope.fresh_until,
        stale_until=envelope.stale_until,
        upstream=envelope.upstream,
    )
