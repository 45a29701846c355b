"""Where cached entries live: the `Store` interface and its three implementations.

`MemoryStore` is the embedded default, `RedisStore` shares copies between replicas and fails
open, `TwoLevelStore` keeps hot entries in process in front of Redis.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy.cache.entry import Entry


class Store(Protocol):
    """A cache backend. No method raises because the backend is unwell: a cache never fails a request."""

    name: str

    @property
    def connected(self) -> bool:
        """False while the backend is known to be unreachable."""

    async def get(self, key: str) -> Entry | None:
        """The entry under `key`, or None (missing, past `stale_until`, unreadable, backend down)."""

    async def set(self, key: str, entry: Entry) -> None:
        """Store `entry`; it expires at `entry.stale_until`."""

    async def delete(self, key: str) -> None:
        """Forget the entry under `key`, if there is one."""

    async def purge(self, service: str) -> int:
        """Delete every entry of `service`; how many were deleted."""

    async def ping(self) -> bool:
        """Check the backend now (start-up, health); True when it answers."""

    async def close(self) -> None:
        """Release connections."""

    def describe(self) -> dict[str, Any]:
        """`backend`, `connected`, `entries` and `bytes` (None where the backend cannot tell)."""


def service_of(key: str) -> str:
    """The service a cache key belongs to (`cache_key` puts it before the last colon)."""
    return key.rpartition(":")[0]


from proxy.cache.memory import MemoryStore  # noqa: E402  (re-exported: the store family in one place)
from proxy.cache.redis_store import RedisStore  # noqa: E402
from proxy.cache.two_level import TwoLevelStore  # noqa: E402

__all__ = ["MemoryStore", "RedisStore", "Store", "TwoLevelStore", "service_of"]
