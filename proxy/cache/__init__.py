"""The response cache: entries, keys, storage rules, stores and request coalescing."""

from proxy.cache.coalesce import CoalescedCallCancelled, Coalescer
from proxy.cache.entry import Entry, decode_entry, encode_entry
from proxy.cache.keys import cache_key, normalise_accept_encoding, normalise_path
from proxy.cache.rules import (
    has_credentials,
    parse_cache_control,
    request_bypass_reason,
    response_storable,
)
from proxy.cache.store import MemoryStore, RedisStore, Store, TwoLevelStore

__all__ = [
    "CoalescedCallCancelled",
    "Coalescer",
    "Entry",
    "MemoryStore",
    "RedisStore",
    "Store",
    "TwoLevelStore",
    "cache_key",
    "decode_entry",
    "encode_entry",
    "has_credentials",
    "normalise_accept_encoding",
    "normalise_path",
    "parse_cache_control",
    "request_bypass_reason",
    "response_storable",
]
