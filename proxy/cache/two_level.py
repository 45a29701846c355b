"""Hot entries kept in process in front of a shared store, so a HIT rarely costs a Redis round trip."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.cache.entry import Entry
from proxy.cache.memory import MemoryStore
from proxy.clock import Clock

if TYPE_CHECKING:
    from proxy.cache.store import Store


class TwoLevelStore:
    """`remote` (Redis) behind a small `local` MemoryStore.

    A local copy answers for at most `local_ttl` seconds before the remote is asked again, so a
    purge or a newer copy written by another replica is seen within `local_ttl`. Copies keep
    their original `stored_at`, so their age is always real. While the remote is down, local
    copies keep answering within their own stale window.
    """

    def __init__(self, remote: Store, local: MemoryStore, *, local_ttl: float = 1.0, clock: Clock) -> None:
        if local_ttl < 0:
            raise ValueError("local_ttl must not be negative")
        self._remote = remote
        self._local = local
        self._local_ttl = local_ttl
        self._clock = clock
        self.name = remote.name

    @property
    def connected(self) -> bool:
        return self._remote.connected

    @property
    def redis_client(self) -> Any:
        return getattr(self._remote, "redis_client", None)

    async def get(self, key: str) -> Entry | None:
        local = self._local.lookup(key)
        if local is not None and local[1] < self._local_ttl:
            return local[0]
        entry = await self._remote.get(key)
        if entry is not None:
            self._local.put(key, entry)
            return entry
        if not self._remote.connected:
            return None if local is None else local[0]
        self._local.discard(key)  # the remote answered: gone there (purged, expired) means gone
        return None

    def peek(self, key: str, now_wall: float) -> Entry | None:
        """The local copy while it may answer without asking the remote (younger than `local_ttl`), else None."""
        local = self._local.lookup(key)
        if local is not None and local[1] < self._local_ttl:
            return local[0]
        return None

    async def get_shared(self, key: str) -> Entry | None:
        """Ask the remote, skipping the local tier (to see a copy another replica just wrote)."""
        entry = await self._remote.get(key)
        if entry is not None:
            self._local.put(key, entry)
        return entry

    async def lock(self, key: str, token: str, ttl: float) -> bool | None:
        return await self._remote.lock(key, token, ttl)  # type: ignore[attr-defined]

    async def unlock(self, key: str, token: str) -> None:
        await self._remote.unlock(key, token)  # type: ignore[attr-defined]

    async def locked(self, key: str) -> bool | None:
        return await self._remote.locked(key)  # type: ignore[attr-defined]

    async def set(self, key: str, entry: Entry) -> None:
        self._local.put(key, entry)
        await self._remote.set(key, entry)

    async def delete(self, key: str) -> None:
        self._local.discard(key)
        await self._remote.delete(key)

    async def purge(self, service: str) -> int:
        local = await self._local.purge(service)
        remote = await self._remote.purge(service)
        return max(local, remote)

    async def ping(self) -> bool:
        return await self._remote.ping()

    async def close(self) -> None:
        await self._local.close()
        await self._remote.close()

    def describe(self) -> dict[str, Any]:
        description = dict(self._remote.describe())
        description["local"] = self._local.describe()
        return description
