"""Fixtures shared by every test module."""

from __future__ import annotations

import os
import uuid

import pytest

from proxy.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when a test (or a backoff sleep) moves it."""
    return FakeClock()


@pytest.fixture
def redis_url() -> str:
    """The real Redis the tests talk to (.ci/run makes sure one answers)."""
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so tests never see each other's keys."""
    return f"rp-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def fake_upstream():
    """Start scripted fake upstreams on 127.0.0.1: `a = await fake_upstream("a")`."""
    from tests.fakes import FakeUpstream

    started: list[FakeUpstream] = []

    async def start(name: str = "fake") -> FakeUpstream:
        upstream = FakeUpstream(name)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


@pytest.fixture
async def proxy_factory():
    """Start the proxy on 127.0.0.1 from routes.yaml text: `proxy = await proxy_factory(text)`."""
    from tests.fakes import start_proxy, stop_proxy

    running = []

    async def start(text: str, **kwargs):
        proxy = await start_proxy(text, **kwargs)
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        await stop_proxy(proxy)


@pytest.fixture
def throwaway_redis():
    """A redis-server of this test's own (skipped where redis-server is not installed)."""
    import shutil

    from tests.fakes import REDIS_SERVER, ThrowawayRedis, free_port

    if not shutil.which(REDIS_SERVER):
        pytest.skip("redis-server is not installed")
    server = ThrowawayRedis(free_port())
    server.start()
    yield server
    server.stop()
