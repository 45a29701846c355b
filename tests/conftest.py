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


# Modules marked `pytestmark = pytest.mark.http_pieces(...)` run over ours and aiohttp's HTTP pieces
# (docs/http-pieces.md): "front" alone, "client" alone, or both, one switched at a time.
_PIECES = {
    ("front",): [("lean", "http1"), ("aiohttp", "http1")],
    ("client",): [("lean", "http1"), ("lean", "aiohttp")],
    ("front", "client"): [("lean", "http1"), ("aiohttp", "http1"), ("lean", "aiohttp")],
}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "http_pieces(*which): run over ours and aiohttp's front end / client")


def pytest_generate_tests(metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("http_pieces")
    if marker is not None and "pieces" in metafunc.fixturenames:
        combos = _PIECES[tuple(marker.args)]
        metafunc.parametrize("pieces", combos, indirect=True,
                             ids=["ours" if c == ("lean", "http1") else f"{'front' if c[0] != 'lean' else 'client'}=aiohttp"
                                  for c in combos])


@pytest.fixture
def pieces(request) -> tuple[str, str]:
    """(server.front, upstream_client) the proxy runs with: ours unless the module asks for both."""
    return getattr(request, "param", ("lean", "http1"))


@pytest.fixture
def front_impl(pieces) -> str:
    return pieces[0]


@pytest.fixture
def client_impl(pieces) -> str:
    return pieces[1]


@pytest.fixture
async def client_pool(client_impl):
    """Makes pools of the upstream client under test (`http1.Pool` or `aiohttp_client.Pool`); closed after the test."""
    import asyncio

    from proxy.upstream import aiohttp_client, http1

    kind = http1.Pool if client_impl == "http1" else aiohttp_client.Pool
    made = []

    def make(*args, **kwargs):
        made.append(kind(*args, **kwargs))
        return made[-1]

    yield make
    for pool in made:
        pool.close()
    await asyncio.sleep(0)  # an aiohttp pool's session closes in a task of its own


@pytest.fixture
async def proxy_factory(pieces):
    """Start the proxy on 127.0.0.1 from routes.yaml text: `proxy = await proxy_factory(text)`."""
    from tests.fakes import start_proxy, stop_proxy

    running = []

    async def start(text: str, **kwargs):
        if pieces != ("lean", "http1"):
            kwargs.setdefault("pieces", pieces)
        proxy = await start_proxy(text, **kwargs)
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        _check_pieces(proxy.process, pieces)
        await stop_proxy(proxy)


def _check_pieces(process, pieces: tuple[str, str]) -> None:
    """A test run over aiohttp's pieces really ran over them (a switch that did nothing would pass silently)."""
    from proxy.upstream import aiohttp_client, http1

    front = process._front
    if front is not None and pieces[0] == "aiohttp":
        assert front.lean_requests == 0 and not front.connections, "server.front: aiohttp answered on the lean path"
    wanted = http1.Pool if pieces[1] == "http1" else aiohttp_client.Pool
    pools = process.runtime.transport._pools.values()
    assert all(type(pool) is wanted for pool in pools), f"upstream_client: {pieces[1]} not used"


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


@pytest.fixture
def log_lines():
    """The JSON lines the proxy writes while the test runs (call the fixture's value to read them)."""
    import io

    import orjson
    import structlog

    from proxy.observability import logs

    buffer = io.StringIO()
    logs.configure("info", "json", stream=buffer)
    yield lambda: [orjson.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    structlog.reset_defaults()
