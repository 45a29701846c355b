"""MemoryStore: an LRU bounded by bytes, with expiry at stale_until and purge by service."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from proxy.cache.entry import Entry, decode_entry, encode_entry
from proxy.cache.keys import cache_key
from proxy.cache.memory import MemoryStore, slot_bytes
from proxy.clock import FakeClock


def entry(clock: FakeClock, body_len: int = 100, stale: float = 3600, upstream: str = "a") -> Entry:
    now = clock.time()
    return Entry(200, [], b"x" * body_len, now, now + 60, now + stale, upstream)


def cost(clock: FakeClock, body_len: int = 100) -> int:
    """What one entry under a short key (`fx:a` ... `fx:live-old`: the same allocation) costs the store."""
    return slot_bytes("fx:a", entry(clock, body_len))


async def test_get_returns_what_set_stored(clock):
    store = MemoryStore(10_000, clock)
    e = entry(clock)
    await store.set("fx:1", e)
    assert await store.get("fx:1") == e
    assert await store.get("fx:2") is None


async def test_set_replaces_and_accounts_bytes_once(clock):
    store = MemoryStore(10_000, clock)
    await store.set("fx:1", entry(clock, 100))
    await store.set("fx:1", entry(clock, 300, upstream="b"))
    assert (await store.get("fx:1")).upstream == "b"
    assert store.bytes == slot_bytes("fx:1", entry(clock, 300, upstream="b"))
    assert len(store) == 1


def small_answer(clock: FakeClock, n: int) -> tuple[str, Entry]:
    """A small JSON answer as the proxy stores it: its header strings decoded from the wire, its own key."""
    wire = [(b"Content-Type", b"application/json"), (b"Date", b"Wed, 04 Dec 2024 10:00:00 GMT"),
            (b"Server", b"nginx"), (b"X-Request-Id", b"req-%d" % n), (b"Cache-Control", b"max-age=60")]
    headers = [(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")) for name, value in wire]
    now = clock.time()
    key = cache_key("fx", "GET", f"/fx/latest/X{n:06d}", (), {"Accept-Encoding": "gzip"})
    return key, Entry(200, list(headers), b'{"base": "X%06d", "rate": 1.25}' % n, now, now + 60, now + 3600, "fx_primary")


@pytest.mark.parametrize("source", ["made-here", "read-from-redis"])
def test_what_small_entries_are_accounted_at_is_what_they_really_take(clock, source):
    store = MemoryStore(1 << 40, clock)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(2000):
            key, answer = small_answer(clock, n)
            store.put(key, answer if source == "made-here" else decode_entry(encode_entry(answer)))
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # tracemalloc sees what was asked for; the allocator hands out 16-byte blocks, so a little more is held
    assert traced <= store.bytes <= traced * 1.25, (traced / len(store), store.bytes / len(store))


async def test_delete_forgets_one_key_and_its_bytes(clock):
    store = MemoryStore(10_000, clock)
    await store.set("fx:1", entry(clock))
    await store.set("fx:2", entry(clock))
    await store.delete("fx:1")
    await store.delete("fx:nothing")
    assert await store.get("fx:1") is None and await store.get("fx:2") is not None
    assert store.bytes == cost(clock)


async def test_least_recently_used_entry_is_evicted_when_bytes_run_out(clock):
    size = cost(clock)
    store = MemoryStore(size * 3, clock)
    for name in ("fx:a", "fx:b", "fx:c"):
        await store.set(name, entry(clock))
    await store.get("fx:a")  # a is now more recent than b
    await store.set("fx:d", entry(clock))
    assert await store.get("fx:b") is None
    for name in ("fx:a", "fx:c", "fx:d"):
        assert await store.get(name) is not None
    assert store.bytes <= size * 3


async def test_a_big_entry_evicts_as_many_old_ones_as_needed(clock):
    small = entry(clock, 100)
    store = MemoryStore(cost(clock) * 4, clock)
    for i in range(4):
        await store.set(f"fx:{i}", small)
    await store.set("fx:big", entry(clock, cost(clock) * 2))
    assert [await store.get(f"fx:{i}") is not None for i in range(4)] == [False, False, False, True]
    assert await store.get("fx:big") is not None


async def test_entry_larger_than_max_bytes_is_not_stored(clock):
    store = MemoryStore(cost(clock, 10) + 500, clock)
    await store.set("fx:small", entry(clock, 10))
    await store.set("fx:huge", entry(clock, 1000))
    assert await store.get("fx:huge") is None
    assert await store.get("fx:small") is not None


async def test_oversized_new_copy_removes_the_outdated_one(clock):
    store = MemoryStore(cost(clock, 10) + 500, clock)
    await store.set("fx:1", entry(clock, 10))
    await store.set("fx:1", entry(clock, 1000))
    assert await store.get("fx:1") is None
    assert store.bytes == 0


async def test_entry_is_gone_once_stale_until_passes(clock):
    store = MemoryStore(10_000, clock)
    await store.set("fx:1", entry(clock, stale=10))
    clock.advance(9.9)
    assert await store.get("fx:1") is not None
    clock.advance(0.1)
    assert await store.get("fx:1") is None
    assert len(store) == 0 and store.bytes == 0


async def test_expired_entries_are_evicted_before_live_ones(clock):
    size = cost(clock)
    store = MemoryStore(size * 3, clock)
    await store.set("fx:live-old", entry(clock, stale=3600))
    await store.set("fx:short1", entry(clock, stale=5))
    await store.set("fx:short2", entry(clock, stale=5))
    clock.advance(10)
    await store.set("fx:new", entry(clock))
    assert await store.get("fx:live-old") is not None  # the least recently used, but alive
    assert len(store) == 2


async def test_already_expired_entry_is_not_stored(clock):
    store = MemoryStore(10_000, clock)
    await store.set("fx:1", entry(clock, stale=0))
    assert len(store) == 0


async def test_purge_removes_only_that_services_entries(clock):
    store = MemoryStore(100_000, clock)
    for name in ("fx:1", "fx:2", "weather:1", "fx:eu:1"):
        await store.set(name, entry(clock))
    assert await store.purge("fx") == 2
    assert await store.get("fx:1") is None and await store.get("fx:2") is None
    assert await store.get("weather:1") is not None
    assert await store.get("fx:eu:1") is not None


async def test_describe_counts_entries_and_bytes(clock):
    store = MemoryStore(100_000, clock)
    await store.set("fx:1", entry(clock))
    assert store.describe() == {"backend": "memory", "connected": True, "entries": 1, "bytes": cost(clock)}
