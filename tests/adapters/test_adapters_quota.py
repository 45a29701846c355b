"""Provider quotas (proxy/adapters/quota.py) on a stepped clock: token buckets, key rings, fingerprints."""

from __future__ import annotations

import pytest

from proxy.adapters.quota import KeyRing, RateLimit, SharedTokenBucket, TokenBucket, fingerprint


def test_a_bucket_allows_its_burst_then_one_token_per_interval(clock):
    bucket = TokenBucket(RateLimit(rate=2, per=1.0, burst=3), clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_hint() == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.take() and not bucket.take()


def test_an_idle_bucket_refills_only_up_to_its_burst(clock):
    bucket = TokenBucket(RateLimit(rate=60, per=60.0, burst=2), clock)
    bucket.take()
    bucket.take()
    clock.advance(3600)
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_the_wait_hint_is_zero_while_a_token_is_there(clock):
    bucket = TokenBucket(RateLimit(rate=1, per=60.0, burst=1), clock)
    assert bucket.wait_hint() == 0.0
    bucket.take()
    assert bucket.wait_hint() == pytest.approx(60.0)


class _DownRedis:
    async def eval(self, *args):
        raise ConnectionError("redis is down")


async def test_a_shared_bucket_keeps_the_limit_per_replica_while_redis_is_down(clock):
    bucket = SharedTokenBucket(RateLimit(rate=2, per=60.0, burst=2), clock, _DownRedis(), "k", 0.1)
    assert [await bucket.take_shared() for _ in range(3)] == [True, True, False]


async def test_a_shared_bucket_counts_every_replica_in_redis(clock, redis_url, redis_prefix):
    import redis.asyncio as redis

    client = redis.from_url(redis_url)
    try:
        limit = RateLimit(rate=3, per=60.0, burst=3)
        replicas = [SharedTokenBucket(limit, clock, client, f"{redis_prefix}bucket", 1.0) for _ in range(2)]
        taken = [await replicas[i % 2].take_shared() for i in range(5)]
        assert taken == [True, True, True, False, False]
        await client.delete(f"{redis_prefix}bucket")
    finally:
        await client.aclose()


def test_a_ring_hands_out_the_first_key_not_resting(clock):
    ring = KeyRing(("a", "b", "c"), clock, cooldown=600)
    assert ring.current() == (0, "a")
    ring.spend(0, None)
    assert ring.current() == (1, "b")
    ring.spend(1, retry_after=30)
    assert ring.current() == (2, "c")
    clock.advance(30)
    assert ring.current() == (1, "b")  # its Retry-After was shorter than the cooldown
    clock.advance(570)
    assert ring.current() == (0, "a")


def test_with_every_key_resting_there_is_none_and_the_hint_is_the_first_return(clock):
    ring = KeyRing(("a", "b"), clock, cooldown=600)
    ring.spend(0, None)
    ring.spend(1, retry_after=45)
    assert ring.current() is None
    assert ring.wait_hint() == pytest.approx(45)


def test_a_shorter_rest_never_cuts_a_longer_one(clock):
    ring = KeyRing(("a",), clock, cooldown=600)
    until = ring.rest(0, clock.time() + 3600, "quota")
    assert ring.rest(0, clock.time() + 10) == until
    assert ring.snapshot()[0]["reason"] == "quota"


def test_another_replicas_rest_is_taken_by_fingerprint_and_never_shows_the_key(clock):
    ring = KeyRing(("secret-one", "secret-two"), clock, cooldown=600)
    assert ring.rest_until(fingerprint("secret-two"), clock.time() + 60)
    assert not ring.rest_until(fingerprint("unknown"), clock.time() + 60)
    assert not ring.rest_until(fingerprint("secret-two"), clock.time() + 30)  # already rests longer
    snapshot = ring.snapshot()
    assert [s["spent"] for s in snapshot] == [False, True]
    assert "secret" not in repr(snapshot)


def test_a_fingerprint_is_short_stable_and_not_the_key():
    assert fingerprint("k-1") == fingerprint("k-1") != fingerprint("k-2")
    assert len(fingerprint("k-1")) == 8 and "k-1" not in fingerprint("k-1")
