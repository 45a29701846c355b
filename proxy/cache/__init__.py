"""The response cache: entries, keys, storage rules, stores and request coalescing."""

from proxy.cache.coalesce import CoalescedCallCancelled, Coalescer
from proxy.cache.entry import Entry, decode_entry, encode_entry
from proxy.cache.keys import KEYED_HEADERS, cache_key, normalise_accept_encoding, normalise_path, variant_key
from proxy.cache.rules import (
    has_credentials,
    parse_cache_control,
    request_bypass_reason,
    response_storable,
    vary_covered,
    vary_names,
)
from proxy.cache.store import MemoryStore, RedisStore, Store, TwoLevelStore

__all__ = [
    "KEYED_HEADERS",
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
    "variant_key",
    "vary_covered",
    "vary_names",
]
