"""RedisStore and TwoLevelStore against a real Redis, and against Redis failing in every way."""

from __future__ import annotations

import asyncio
import pickle
import shutil
import time

import msgspec
import pytest
import redis.asyncio as aioredis

from proxy.cache.entry import Entry, encode_entry
from proxy.cache.memory import MemoryStore
from proxy.cache.redis_store import RedisStore
from proxy.cache.two_level import TwoLevelStore
from proxy.clock import FakeClock
from proxy.signals import CacheBackendState, CacheError
from tests.fakes import refused_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
KEY = "fx:" + "a" * 64
OTHER_KEY = "fx:" + "b" * 64


def make_entry(clock: FakeClock, *, fresh: float = 60, stale: float = 3600, body: bytes = b'{"rate": 1.1}',
               upstream: str = "fx_primary") -> Entry:
    now = clock.time()
    return Entry(200, [("Content-Type", "application/json")], body, now, now + fresh, now + stale, upstream)


def backend_states(events: list) -> list[CacheBackendState]:
    return [e for e in events if isinstance(e, CacheBackendState)]


def errors(events: list, operation: str | None = None) -> list[CacheError]:
    return [e for e in events if isinstance(e, CacheError) and operation in (None, e.operation)]


@pytest.fixture
def events() -> list:
    return []


@pytest.fixture
async def raw(redis_url, redis_prefix):
    """A plain client for looking behind the store's back; removes this test's keys afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    async for name in client.scan_iter(match=redis_prefix + "*", count=500):
        await client.unlink(name)
    await client.aclose()


@pytest.fixture
async def make_store(redis_url, redis_prefix, clock, events, raw):
    """Builds RedisStores (closed at teardown, keys removed by `raw`); default: the real Redis, this test's prefix."""
    stores: list[RedisStore] = []

    def make(url: str = redis_url, **options) -> RedisStore:
        options.setdefault("prefix", redis_prefix)
        options.setdefault("clock", clock)
        options.setdefault("emit", events.append)
        options.setdefault("op_timeout", 1.0)  # generous against the shared Redis; failure tests set 0.05
        store = RedisStore(url, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


# --- round trips, TTLs, malformed values -----------------------------------------------------

async def test_round_trip_returns_an_equal_entry(make_store, raw, clock, events):
    store = make_store()
    entry = make_entry(clock)
    await store.set(KEY, entry)
    assert await store.get(KEY) == entry
    assert await store.get(OTHER_KEY) is None
    assert errors(events) == []
    assert store.describe() == {"backend": "redis", "connected": True, "entries": None, "bytes": None}


async def test_value_is_a_msgpack_envelope_under_prefix_plus_key(make_store, raw, redis_prefix, clock):
    store = make_store()
    await store.set(KEY, make_entry(clock))
    stored = msgspec.msgpack.decode(await raw.get(redis_prefix + KEY))
    assert stored["v"] == 1 and stored["upstream"] == "fx_primary" and stored["body"] == b'{"rate": 1.1}'


async def test_key_ttl_is_stale_until_minus_now_rounded_up(make_store, raw, redis_prefix, clock):
    store = make_store()
    await store.set(KEY, make_entry(clock, stale=120.4))
    assert await raw.ttl(redis_prefix + KEY) == 121
    assert 120_000 < await raw.pttl(redis_prefix + KEY) <= 121_000


async def test_entry_already_past_stale_until_is_not_written(make_store, raw, redis_prefix, clock):
    store = make_store()
    await store.set(KEY, make_entry(clock, fresh=0, stale=0))
    assert await raw.exists(redis_prefix + KEY) == 0


async def test_entry_past_stale_until_is_not_returned_while_the_key_ttl_rounds_up(make_store, raw, clock):
    store = make_store()
    await store.set(KEY, make_entry(clock, stale=10.5))
    clock.advance(10.6)
    assert await store.get(KEY) is None


async def test_garbage_value_reads_as_missing_is_reported_and_deleted(make_store, raw, redis_prefix, events):
    store = make_store()
    await raw.set(redis_prefix + KEY, b"\x00\xffnot an envelope")
    assert await store.get(KEY) is None
    assert [e.operation for e in errors(events)] == ["decode"]
    assert await raw.exists(redis_prefix + KEY) == 0
    assert store.connected  # a bad value is not a bad backend


class WritesMarker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


async def test_pickle_payload_is_never_executed(make_store, raw, redis_prefix, tmp_path):
    marker = tmp_path / "unpickled"
    store = make_store()
    await raw.set(redis_prefix + KEY, pickle.dumps(WritesMarker(str(marker))))
    assert await store.get(KEY) is None
    assert not marker.exists()


async def test_wrong_version_envelope_reads_as_missing(make_store, raw, redis_prefix, clock, events):
    store = make_store()
    fields = msgspec.structs.asdict(make_entry(clock))
    await raw.set(redis_prefix + KEY, msgspec.msgpack.encode({"v": 2, **fields}))
    assert await store.get(KEY) is None
    await raw.set(redis_prefix + KEY, msgspec.msgpack.encode({"v": 1, **fields}))
    assert await store.get(KEY) == make_entry(clock)  # the same envelope at version 1 reads fine


async def test_wrong_redis_type_under_a_key_reads_as_missing_without_going_down(make_store, raw, redis_prefix, events):
    store = make_store()
    await raw.rpush(redis_prefix + KEY, b"x")
    assert await store.get(KEY) is None
    assert [e.operation for e in errors(events)] == ["get"]
    assert store.connected
    assert [s.connected for s in backend_states(events)] == [True]


# --- purge and restarts ------------------------------------------------------------------------

async def test_purge_deletes_only_that_services_keys(make_store, raw, redis_prefix, clock):
    store = make_store()
    fx = [f"fx:{i:064x}" for i in range(3)]
    others = ["weather:" + "c" * 64, "fx:eu:" + "d" * 64, "fxx:" + "e" * 64]
    for key in fx + others:
        await store.set(key, make_entry(clock))
    assert await store.purge("fx") == 3
    for key in fx:
        assert await store.get(key) is None
    for key in others:
        assert await store.get(key) is not None
    assert await store.purge("fx") == 0


async def test_purge_works_through_many_scan_batches(make_store, raw, redis_prefix, clock):
    store = make_store(scan_count=20)
    data = encode_entry(make_entry(clock))
    async with raw.pipeline(transaction=False) as pipe:
        for i in range(250):
            pipe.set(f"{redis_prefix}fx:{i:064x}", data, ex=60)
        await pipe.execute()
    assert await store.purge("fx") == 250
    assert [k async for k in raw.scan_iter(match=redis_prefix + "*")] == []


async def test_a_new_store_on_the_same_prefix_reads_what_an_old_one_wrote(make_store, raw, clock):
    old = make_store()
    entry = make_entry(clock)
    await old.set(KEY, entry)
    await old.close()
    assert await make_store().get(KEY) == entry


async def test_a_store_on_another_prefix_does_not_see_the_entries(make_store, raw, redis_prefix, clock):
    await make_store().set(KEY, make_entry(clock))
    other = make_store(prefix=redis_prefix + "other:")
    assert await other.get(KEY) is None


# --- failing open -------------------------------------------------------------------------------

async def test_unreachable_redis_answers_nothing_fast_and_reports_down_once(make_store, clock, events):
    store = make_store(f"redis://127.0.0.1:{refused_port()}/0", op_timeout=0.05, backoff=5.0)
    for _ in range(20):
        started = time.perf_counter()
        assert await store.get(KEY) is None
        await store.set(KEY, make_entry(clock))
        assert await store.purge("fx") == 0
        assert time.perf_counter() - started < 0.5
    assert backend_states(events) == [CacheBackendState("redis", False, backend_states(events)[0].error)]
    assert backend_states(events)[0].error
    assert len(errors(events)) == 1  # only the call that tried; the rest never touched Redis
    assert not store.connected
    assert store.describe()["connected"] is False


class CountingListener:
    """A TCP port that accepts connections and either drops them at once or never answers."""

    def __init__(self, answer: bool) -> None:
        self.connections = 0
        self._drop = answer
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._drop:
            writer.close()
        else:
            self._writers.append(writer)  # a black hole: read nothing, answer nothing

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        self._server.close()
        await self._server.wait_closed()


async def test_down_store_does_not_touch_redis_during_backoff_then_probes_once(make_store, clock, events):
    listener = CountingListener(answer=True)
    port = await listener.start()
    try:
        store = make_store(f"redis://127.0.0.1:{port}/0", op_timeout=0.05, backoff=5.0)
        assert await store.get(KEY) is None
        tried = listener.connections
        assert tried >= 1
        for _ in range(10):
            assert await store.get(KEY) is None
            await store.set(KEY, make_entry(clock))
        clock.advance(4.9)
        assert await store.get(KEY) is None
        assert listener.connections == tried
        clock.advance(0.1)
        assert await store.get(KEY) is None
        assert listener.connections > tried  # the backoff elapsed: one call tried again
        assert len(errors(events)) == 2
        assert [s.connected for s in backend_states(events)] == [False]
    finally:
        await listener.stop()


async def test_redis_that_never_answers_costs_at_most_op_timeout(make_store, clock, events):
    listener = CountingListener(answer=False)
    port = await listener.start()
    try:
        store = make_store(f"redis://127.0.0.1:{port}/0", op_timeout=0.05)
        started = time.perf_counter()
        assert await store.get(KEY) is None
        assert time.perf_counter() - started < 0.5
        assert listener.connections == 1  # abandoned at op_timeout, not retried on a new connection
        assert [s.connected for s in backend_states(events)] == [False]
        assert "Timeout" in backend_states(events)[0].error
    finally:
        await listener.stop()


async def connections_received(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return int((await client.info("stats"))["total_connections_received"])
    finally:
        await client.aclose()


async def test_store_goes_down_with_redis_and_comes_back_after_the_backoff(make_store, throwaway_redis, clock, events):
    store = make_store(throwaway_redis.url, op_timeout=0.2, backoff=5.0)
    await store.set(KEY, make_entry(clock))
    assert await store.get(KEY) is not None
    assert [s.connected for s in backend_states(events)] == [True]

    throwaway_redis.stop()
    for _ in range(5):
        assert await store.get(KEY) is None
    assert [s.connected for s in backend_states(events)] == [True, False]

    throwaway_redis.start()
    before = await connections_received(throwaway_redis.url)
    for _ in range(5):
        assert await store.get(KEY) is None  # still backing off: Redis is not asked
    assert await connections_received(throwaway_redis.url) == before + 1  # only our own INFO call

    clock.advance(5.0)
    entry = make_entry(clock, body=b"after restart")
    await store.set(KEY, entry)
    assert await store.get(KEY) == entry
    assert [s.connected for s in backend_states(events)] == [True, False, True]


async def test_a_redis_restart_between_calls_is_survived_without_going_down(make_store, throwaway_redis, clock, events):
    store = make_store(throwaway_redis.url, op_timeout=0.5)
    await store.set(KEY, make_entry(clock))
    throwaway_redis.stop()
    throwaway_redis.start()
    entry = make_entry(clock, body=b"new")
    await store.set(KEY, entry)  # the pooled connection died with the old server
    assert await store.get(KEY) == entry
    assert [s.connected for s in backend_states(events)] == [True]


async def test_a_burst_past_the_client_default_pool_waits_for_a_slot_instead_of_going_down(
        make_store, raw, clock, events):
    # redis-py's plain pool refuses a call past 100 connections (MaxConnectionsError); the store took
    # that for Redis failing and served without it for its back-off after any burst of 100+ requests.
    store = make_store()
    entry = make_entry(clock)
    await store.set(KEY, entry)
    results = await asyncio.gather(*(store.get(KEY) for _ in range(150)))
    assert results == [entry] * 150
    assert errors(events) == [] and store.connected


async def test_the_store_keeps_at_most_max_connections_calls_in_flight_however_many_wait(
        make_store, throwaway_redis, clock, events):
    store = make_store(throwaway_redis.url, max_connections=4)
    entry = make_entry(clock)
    before = await connections_received(throwaway_redis.url)
    await asyncio.gather(*(store.set(f"fx:{n:064x}", entry) for n in range(40)))
    results = await asyncio.gather(*(store.get(f"fx:{n:064x}") for n in range(40)))
    assert results == [entry] * 40
    # our 4, plus the INFO call that counts them
    assert await connections_received(throwaway_redis.url) - before == 4 + 1
    assert errors(events) == [] and store.connected


async def test_a_call_that_waits_out_its_budget_for_a_slot_does_without_redis_without_taking_it_down(
        make_store, clock, events):
    store = make_store(op_timeout=0.05, max_connections=2)
    entry = make_entry(clock)
    await store.set(KEY, entry)
    async with store._slots, store._slots:  # every slot taken, as by a burst of slow calls
        assert await store.get(KEY) is None
    assert [e.error for e in errors(events, "get")] == ["busy: all 2 Redis slots taken for the whole budget"]
    assert [s.connected for s in backend_states(events)] == [True] and store.connected  # not down, no back-off
    assert await store.get(KEY) == entry


def test_max_connections_must_be_positive(clock):
    with pytest.raises(ValueError, match="max_connections"):
        RedisStore("redis://127.0.0.1:6379/0", clock=clock, max_connections=0)


async def test_ping_reports_whether_redis_answers(make_store, clock):
    assert await make_store().ping() is True
    assert await make_store(f"redis://127.0.0.1:{refused_port()}/0", op_timeout=0.05).ping() is False


# --- TwoLevelStore ---------------------------------------------------------------------------

@pytest.fixture
def two_level(make_store, clock):
    def make(remote: RedisStore | None = None, local_ttl: float = 1.0) -> TwoLevelStore:
        return TwoLevelStore(remote or make_store(), MemoryStore(1_000_000, clock), local_ttl=local_ttl, clock=clock)

    return make


async def test_two_level_set_writes_redis_and_local(two_level, make_store, raw, redis_prefix, clock):
    store = two_level()
    entry = make_entry(clock)
    await store.set(KEY, entry)
    assert await raw.exists(redis_prefix + KEY) == 1
    assert await make_store().get(KEY) == entry  # another replica reads it from Redis
    await raw.delete(redis_prefix + KEY)
    assert await store.get(KEY) == entry  # and this one from its local copy


async def test_two_level_get_within_local_ttl_does_not_ask_redis(make_store, raw, redis_prefix, clock):
    local = MemoryStore(1_000_000, clock)
    store = TwoLevelStore(make_store(), local, local_ttl=1.0, clock=clock)
    entry = make_entry(clock)
    await store.set(KEY, entry)
    await raw.delete(redis_prefix + KEY)  # behind its back
    clock.advance(0.9)
    assert await store.get(KEY) == entry
    clock.advance(0.1)
    assert await store.get(KEY) is None  # local_ttl passed: Redis was asked and the copy is gone
    assert len(local) == 0  # so the local copy was dropped too


async def test_two_level_sees_a_newer_copy_from_another_replica_after_local_ttl(two_level, make_store, clock):
    store = two_level(local_ttl=1.0)
    await store.set(KEY, make_entry(clock, body=b"old"))
    await make_store().set(KEY, make_entry(clock, body=b"new"))
    assert (await store.get(KEY)).body == b"old"
    clock.advance(1.0)
    assert (await store.get(KEY)).body == b"new"


async def test_two_level_copies_keep_their_real_age(two_level, make_store, clock):
    writer = make_store()
    entry = make_entry(clock)
    await writer.set(KEY, entry)
    clock.advance(30)
    store = two_level(local_ttl=1.0)
    first = await store.get(KEY)  # read from Redis into the local copy
    clock.advance(0.5)
    second = await store.get(KEY)  # served locally
    assert second.stored_at == entry.stored_at
    assert second.age(clock.time()) == pytest.approx(30.5)
    assert first.age(clock.time()) == second.age(clock.time())


async def test_two_level_delete_forgets_the_key_on_both_levels(two_level, make_store, raw, redis_prefix, clock):
    store = two_level()
    await store.set(KEY, make_entry(clock))
    await store.set(OTHER_KEY, make_entry(clock))
    await store.delete(KEY)
    assert await raw.exists(redis_prefix + KEY) == 0 and await raw.exists(redis_prefix + OTHER_KEY) == 1
    assert await store.get(KEY) is None  # not even the local copy
    assert await make_store().get(OTHER_KEY) is not None


async def test_two_level_purge_clears_both_levels(two_level, raw, redis_prefix, clock):
    store = two_level()
    await store.set(KEY, make_entry(clock))
    await store.set("weather:" + "c" * 64, make_entry(clock))
    assert await store.purge("fx") == 1
    assert await store.get(KEY) is None
    assert await raw.exists(redis_prefix + KEY) == 0
    assert await store.get("weather:" + "c" * 64) is not None


async def test_two_level_serves_local_copies_while_redis_is_down_within_their_stale_window(make_store, two_level, clock, events):
    remote = make_store(f"redis://127.0.0.1:{refused_port()}/0", op_timeout=0.05)
    store = two_level(remote, local_ttl=1.0)
    entry = make_entry(clock, fresh=10, stale=100)
    await store.set(KEY, entry)
    clock.advance(50)  # far past local_ttl, and past the remote's backoff too
    assert await store.get(KEY) == entry
    assert not store.connected
    clock.advance(50)
    assert await store.get(KEY) is None
    assert [s.connected for s in backend_states(events)] == [False]


async def test_two_level_describe_names_the_remote_and_the_local_level(two_level, clock):
    store = two_level()
    await store.set(KEY, make_entry(clock))
    described = store.describe()
    assert described["backend"] == "redis" and described["connected"] is True
    assert described["local"]["entries"] == 1
