"""A cached response and its msgpack envelope.

The envelope is decoded into a typed struct, so whatever sits under a cache key in a shared
Redis is data to validate, never code: nothing here unpickles or evaluates anything.

An answer whose `Vary` names request headers the key does not cover is kept as variants, each
under a key of its own (`keys.variant_key`), and a *vary index* under the request's key says
which headers select the variant and which variants are kept (RFC 9111 §4.1). An index is
never an answer: it is never fresh, and `CacheStage` never serves it.
"""

from __future__ import annotations

import math
import re
from sys import getsizeof

import msgspec

ENVELOPE_VERSION = 1  # an answer; unchanged since the first release, so every replica reads it
INDEX_VERSION = 2     # a vary index: replicas older than it find an unreadable entry (a miss), never an answer
_BLOCK = 16  # pymalloc hands out 16-byte blocks (and malloc adds about as much to larger ones)
_FORBIDDEN_IN_HEADERS = ("\r", "\n", "\0")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+\Z")
_CACHE_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*:[0-9a-f]{64}\Z")


class Entry(msgspec.Struct, frozen=True, array_like=False, weakref=True):
    """One stored response. Times are wall-clock epoch seconds, so every replica reads the same age."""

    status: int
    headers: list[tuple[str, str]]  # end-to-end headers to replay, in order, duplicates kept
    body: bytes
    stored_at: float
    fresh_until: float
    stale_until: float
    upstream: str  # the upstream that produced the copy (`X-Upstream` on HIT/STALE)
    vary: tuple[str, ...] = ()      # on a vary index: the request headers (lower case) that select a variant
    variants: tuple[str, ...] = ()  # on a vary index: the keys of the variants kept, oldest first

    @property
    def is_index(self) -> bool:
        """A vary index (see the module docstring), not an answer."""
        return bool(self.vary)

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
        """Bytes the entry holds in memory, as CPython allocates them: the struct and its times, the
        header list, its pairs and their strings, the body, the upstream's name (shared with the
        route table when the copy was made here: a little over) and an index's names and keys.
        `tests/cache/test_cache_memory.py` holds it to what tracemalloc measures."""
        total = _STRUCT_BYTES + held_bytes(getsizeof(self.headers)) + held_bytes(getsizeof(self.body)) \
            + held_bytes(getsizeof(self.upstream))
        for name, value in self.headers:
            total += _PAIR_BYTES + held_bytes(getsizeof(name)) + held_bytes(getsizeof(value))
        if self.vary:
            total += sum(held_bytes(getsizeof(part)) for part in (self.vary, self.variants, *self.vary, *self.variants))
        return total


def held_bytes(size: int) -> int:
    """What an object of `size` bytes (`sys.getsizeof`) takes from the allocator."""
    return (size + _BLOCK - 1) // _BLOCK * _BLOCK


_STRUCT_BYTES = held_bytes(getsizeof(Entry(200, [], b"", 0.0, 0.0, 0.0, ""))) + 3 * held_bytes(getsizeof(0.0))
_PAIR_BYTES = held_bytes(getsizeof(("", "")))


def vary_index(vary: tuple[str, ...], variants: tuple[str, ...], stored_at: float, stale_until: float) -> Entry:
    """A vary index: the variants under it are selected by the request headers `vary` names."""
    return Entry(status=200, headers=[], body=b"", stored_at=stored_at, fresh_until=stored_at,
                 stale_until=stale_until, upstream="", vary=vary, variants=variants)


class _Envelope(msgspec.Struct, frozen=True, omit_defaults=True):
    """The stored form: a msgpack map whose field names are part of the Redis format.

    An answer has exactly the fields of version 1; a vary index (version 2) adds `vary` and `variants`.
    """

    v: int
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stored_at: float
    fresh_until: float
    stale_until: float
    upstream: str
    vary: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Envelope)


def encode_entry(entry: Entry) -> bytes:
    """The bytes stored under a cache key."""
    return _encoder.encode(
        _Envelope(
            v=INDEX_VERSION if entry.is_index else ENVELOPE_VERSION,
            status=entry.status,
            headers=entry.headers,
            body=entry.body,
            stored_at=entry.stored_at,
            fresh_until=entry.fresh_until,
            stale_until=entry.stale_until,
            upstream=entry.upstream,
            vary=entry.vary,
            variants=entry.variants,
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
    if not 100 <= envelope.status <= 599:
        return None
    index = bool(envelope.vary)
    if envelope.v != (INDEX_VERSION if index else ENVELOPE_VERSION) or bool(envelope.variants) != index:
        return None
    if not all(map(math.isfinite, (envelope.stored_at, envelope.fresh_until, envelope.stale_until))):
        return None
    if not all(map(_HEADER_NAME.match, envelope.vary)) or not all(map(_CACHE_KEY.match, envelope.variants)):
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
        vary=envelope.vary,
        variants=envelope.variants,
    )
