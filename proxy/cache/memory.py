"""The in-process cache: an LRU bounded by the bytes of its entries."""

from __future__ import annotations

from collections import OrderedDict
from sys import getsizeof
from typing import Any

from proxy.cache.entry import Entry, held_bytes
from proxy.clock import Clock

_SWEEP_INTERVAL = 1.0  # seconds between full sweeps for expired entries, only when over budget
# An OrderedDict item, its hash-table slot and linked-list node: 90-150 bytes on CPython 3.11 (measured,
# the more after deletions until the table is rebuilt).
_INDEX_BYTES = 128


class _Slot:
    __slots__ = ("entry", "size", "stored_mono")

    def __init__(self, entry: Entry, size: int, stored_mono: float) -> None:
        self.entry = entry
        self.size = size
        self.stored_mono = stored_mono


_SLOT_BYTES = _INDEX_BYTES + held_bytes(getsizeof(_Slot(None, 0, 0.0))) + held_bytes(getsizeof(0.0))  # type: ignore[arg-type]


def slot_bytes(key: str, entry: Entry) -> int:
    """What keeping `entry` under `key` costs: the entry, the key and the LRU's bookkeeping."""
    return entry.size + held_bytes(getsizeof(key)) + _SLOT_BYTES


class MemoryStore:
    """An LRU of entries bounded by `max_bytes` of what they really hold in memory (`slot_bytes`).

    Entries past `stale_until` are dropped when read and swept before live ones are evicted.
    An entry larger than `max_bytes` is not stored. `get` and `set` are O(1) (amortised).
    """

    name = "memory"
    connected = True

    def __init__(self, max_bytes: int, clock: Clock) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self._max_bytes = max_bytes
        self._clock = clock
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._bytes = 0
        self._last_sweep = float("-inf")

    def lookup(self, key: str) -> tuple[Entry, float] | None:
        """The entry and how many seconds ago (monotonic) it was stored here; marks it recently used."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        if self._clock.time() >= slot.entry.stale_until:
            self._drop(key)
            return None
        self._slots.move_to_end(key)
        return slot.entry, self._clock.monotonic() - slot.stored_mono

    def peek(self, key: str, now_wall: float) -> Entry | None:
        """Synchronous `get` for the fast path (`now_wall` is the caller's `clock.time()`)."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        if now_wall >= slot.entry.stale_until:
            self._drop(key)
            return None
        self._slots.move_to_end(key)
        return slot.entry

    def put(self, key: str, entry: Entry) -> None:
        """Synchronous `set`."""
        if key in self._slots:
            # Even when the new copy cannot be kept, the old one is outdated now.
            self._drop(key)
        size = slot_bytes(key, entry)
        if size > self._max_bytes or self._clock.time() >= entry.stale_until:
            return
        self._slots[key] = _Slot(entry, size, self._clock.monotonic())
        self._bytes += size
        if self._bytes > self._max_bytes:
            self._evict()

    def discard(self, key: str) -> None:
        """Forget `key` if present."""
        if key in self._slots:
            self._drop(key)

    async def get(self, key: str) -> Entry | None:
        found = self.lookup(key)
        return None if found is None else found[0]

    async def set(self, key: str, entry: Entry) -> None:
        self.put(key, entry)

    async def delete(self, key: str) -> None:
        self.discard(key)

    async def purge(self, service: str) -> int:
        doomed = [key for key in self._slots if key.rpartition(":")[0] == service]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._slots.clear()
        self._bytes = 0

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "connected": True, "entries": len(self._slots), "bytes": self._bytes}

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def bytes(self) -> int:
        return self._bytes

    def _drop(self, key: str) -> None:
        self._bytes -= self._slots.pop(key).size

    def _evict(self) -> None:
        now_mono = self._clock.monotonic()
        if now_mono - self._last_sweep >= _SWEEP_INTERVAL:
            self._last_sweep = now_mono
            now_wall = self._clock.time()
            for key in [k for k, slot in self._slots.items() if now_wall >= slot.entry.stale_until]:
                self._drop(key)
        while self._bytes > self._max_bytes:
            _, slot = self._slots.popitem(last=False)
            self._bytes -= slot.size
