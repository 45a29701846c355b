"""The HIT fast path (proxy/downstream/hit.py HitStage, stage 0 of the chain): the same answers, counts and refusals as the full chain."""

from __future__ import annotations

import asyncio
import re

import pytest
import structlog
from yarl import URL

from proxy.downstream.wire import render_head
from proxy.observability import logs
from tests.fakes import Ok
from tests.chain.test_caching import RATES, cached, redis_table

VARIABLE = {"x-request-id", "date"}


class ChainCalls:
    """Counts requests that went through the chain instead of the fast path."""

    def __init__(self, runtime) -> None:
        self.count = 0
        self._chain = runtime.chain
        runtime.chain = self

    async def __call__(self, exchange):
        self.count += 1
        return await self._chain(exchange)


def comparable(response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in response.headers.items():
        if name.lower() not in VARIABLE:
            out.setdefault(name.lower(), []).append(value)
    return out


@pytest.fixture
def warning_logs():
    logs.configure("warning", "json")
    yield
    structlog.reset_defaults()


async def start(fake_upstream, proxy_factory, clock, **kwargs):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES, headers={"Content-Type": "application/json", "ETag": '"v1"'})
    proxy = await proxy_factory(cached(primary.url, **kwargs), clock=clock)
    return primary, proxy, ChainCalls(proxy.process.runtime)


@pytest.mark.parametrize("quiet", [False, True], ids=["info-logs", "warning-logs"])
async def test_a_fast_hit_carries_the_same_headers_and_body_as_a_chain_hit(fake_upstream, proxy_factory, clock,
                                                                          request, quiet):
    if quiet:
        request.getfixturevalue("warning_logs")
    primary, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    clock.advance(42)
    fast = await proxy.get("/fx/latest/USD")
    assert chain.count == 1  # only the miss went through the chain
    # `%55` is `U`: the same copy, but an encoded path always takes the full path.
    slow = await proxy.client.get(URL(proxy.url + "/fx/latest/%55SD", encoded=True))
    assert chain.count == 2
    assert fast.status == slow.status == 200
    assert fast.headers["X-Cache"] == slow.headers["X-Cache"] == "HIT"
    assert comparable(fast) == comparable(slow)
    assert fast.headers["Age"] == "42" and fast.headers["X-Upstream"] == "fx_primary"
    assert fast.headers["Cache-Status"] == f"resilience-proxy; hit; ttl={86400 - 42}"
    assert len(fast.headers["X-Request-ID"]) == 32 and fast.headers["X-Request-ID"] != slow.headers["X-Request-ID"]
    assert await fast.read() == await slow.read() == RATES
    assert primary.calls == 1


async def test_a_fast_hit_keeps_a_valid_caller_request_id_and_replaces_an_unsafe_one(fake_upstream, proxy_factory, clock):
    _, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    await proxy.get("/fx/latest/USD")
    kept = await proxy.get("/fx/latest/USD", headers={"X-Request-ID": "abc-123"})
    replaced = await proxy.get("/fx/latest/USD", headers={"X-Request-ID": "bad id\twith tab"})
    assert chain.count == 1
    assert kept.headers["X-Request-ID"] == "abc-123"
    assert replaced.headers["X-Request-ID"] != "bad id\twith tab" and len(replaced.headers["X-Request-ID"]) == 32


async def test_the_fast_path_never_answers_across_credentials_encodings_or_no_store(fake_upstream, proxy_factory, clock):
    primary, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    await proxy.get("/fx/latest/USD")
    assert (await proxy.get("/fx/latest/USD", headers={"Authorization": "Bearer x"})).headers["X-Cache"] == "BYPASS"
    assert (await proxy.get("/fx/latest/USD", headers={"Cookie": "a=b"})).headers["X-Cache"] == "BYPASS"
    assert (await proxy.get("/fx/latest/USD", headers={"Cache-Control": "no-store"})).headers["X-Cache"] == "BYPASS"
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Encoding": "gzip"})).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Encoding": "gzip"})).headers["X-Cache"] == "HIT"
    conditional = await proxy.get("/fx/latest/USD", headers={"If-None-Match": '"v1"'})
    assert conditional.headers["X-Cache"] == "BYPASS"
    assert chain.count == 6  # everything above but the gzip HIT went through the chain
    assert primary.calls == 6


async def test_vary_routes_and_stale_copies_take_the_full_path(fake_upstream, proxy_factory, clock):
    primary, proxy, chain = await start(fake_upstream, proxy_factory, clock,
                                        route_cache={"ttl": "1m", "vary": ["Accept-Language"]})
    await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Language": "en"})).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})).headers["X-Cache"] == "HIT"
    assert chain.count == 3
    clock.advance(61)  # past the ttl: never served fresh, refetched by the chain
    assert (await proxy.get("/fx/latest/USD", headers={"Accept-Language": "ko"})).headers["X-Cache"] == "MISS"
    assert chain.count == 4 and primary.calls == 3


@pytest.mark.parametrize("quiet", [False, True], ids=["info-logs", "warning-logs"])
async def test_fast_hits_are_counted_in_metrics_and_stats(fake_upstream, proxy_factory, clock, request, quiet):
    if quiet:
        request.getfixturevalue("warning_logs")
    _, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    for _ in range(4):
        await proxy.get("/fx/latest/USD")
    assert chain.count == 1
    proxy.process.bus.deliver_waiting()  # what a scrape or a health read does first
    metrics = proxy.process.metrics
    registry = metrics.registry
    route = proxy.process.runtime.config.services["fx"].routes[0].name  # the route table's name, not a path
    assert registry.get_sample_value("proxy_requests_total",
                                     {"service": "fx", "route": route, "code": "200", "cache": "hit"}) == 3
    assert registry.get_sample_value("proxy_requests_total",
                                     {"service": "fx", "route": route, "code": "200", "cache": "miss"}) == 1
    assert registry.get_sample_value("cache_requests_total", {"service": "fx", "result": "hit"}) == 3
    assert registry.get_sample_value("cache_requests_total", {"service": "fx", "result": "miss"}) == 1
    assert registry.get_sample_value("proxy_request_duration_seconds_count", {"service": "fx"}) == 4
    assert metrics.hit_rate("fx") == 75.0
    body, _ = metrics.render()
    assert 'cache_hit_rate{service="fx"} 75.0' in body.decode()
    window = proxy.process.stats.window(5)["services"]["fx"]
    assert window["requests"] == 4 and window["cacheHitRate"] == 75.0


async def test_the_hit_rate_window_still_ages_out_fast_hits(fake_upstream, proxy_factory, clock, warning_logs):
    _, proxy, _ = await start(fake_upstream, proxy_factory, clock)
    await proxy.get("/fx/latest/USD")
    await proxy.get("/fx/latest/USD")
    clock.advance(301)
    assert proxy.process.metrics.hit_rate("fx") is None


async def test_a_fast_hit_writes_the_request_log_line_at_info(fake_upstream, proxy_factory, clock):
    _, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    await proxy.get("/fx/latest/USD")
    proxy.process.bus.deliver_waiting()  # the MISS's line is not the one this test looks for
    with structlog.testing.capture_logs() as lines:
        await proxy.get("/fx/latest/USD")
        proxy.process.bus.deliver_waiting()  # per-request lines are written in batches, after the answer
    assert chain.count == 1
    requests = [line for line in lines if line.get("kind") == "request"]
    assert len(requests) == 1
    assert requests[0]["x_cache"] == "HIT" and requests[0]["status"] == 200 and requests[0]["route"] == "/fx/latest/{base}"


async def test_a_local_copy_is_re_read_from_redis_after_local_ttl(fake_upstream, proxy_factory, clock, redis_url,
                                                                  redis_prefix):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES)
    proxy = await proxy_factory(redis_table(primary.url, redis_url, redis_prefix), clock=clock)
    if not proxy.process.runtime.store.connected:
        pytest.skip("no Redis answers at " + redis_url)
    chain = ChainCalls(proxy.process.runtime)
    await proxy.get("/fx/latest/USD")
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    assert chain.count == 1  # the local copy answered on the fast path
    clock.advance(1.5)  # past local_ttl (1s): the copy must be re-read from Redis, by the chain
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    assert chain.count == 2
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    assert chain.count == 2 and primary.calls == 1


async def raw_exchange(proxy, data: bytes, *, answers: int | None = None, rcvbuf: int | None = None,
                       before_reading=None) -> bytes:
    """Send `data` as-is on one connection; read until EOF, or until `answers` complete answers."""
    import socket

    host, port = proxy.process.addresses["main"]
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # small: the kernel holds little for us
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(data)
    await writer.drain()
    if before_reading is not None:
        await before_reading()
    received = bytearray()
    try:
        async with asyncio.timeout(5):
            while answers is None or count_answers(received) < answers:
                chunk = await reader.read(1024 * 1024)
                if not chunk:
                    break
                received += chunk
    finally:
        writer.close()
    return bytes(received)


def count_answers(data: bytearray) -> int:
    """How many complete answers `data` holds (framed by Content-Length), without copying bodies."""
    count = start = 0
    while (end := data.find(b"\r\n\r\n", start)) != -1:
        length = int(re.search(rb"(?im)^content-length: *(\d+)", data[start:end]).group(1))
        start = end + 4 + length
        if start > len(data):
            break
        count += 1
    return count


def split_answers(data: bytes) -> list[tuple[bytes, bytes]]:
    """Complete (head, body) pairs in `data`, framed by Content-Length."""
    out = []
    while b"\r\n\r\n" in data:
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
        if len(rest) < length:
            break
        out.append((head, rest[:length]))
        data = rest[length:]
    return out


PLAIN_GET = b"GET /fx/latest/USD HTTP/1.1\r\nHost: t\r\n\r\n"  # no Accept-Encoding: its own cache key


def header(head: bytes, name: str) -> str | None:
    found = re.search(rb"(?im)^" + name.encode() + rb": *([^\r\n]*)", head)
    return found.group(1).decode() if found else None


async def test_pipelined_fast_hits_come_back_whole_and_in_order(fake_upstream, proxy_factory, clock):
    _, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    await raw_exchange(proxy, PLAIN_GET, answers=1)
    requests = b"".join(b"GET /fx/latest/USD HTTP/1.1\r\nHost: t\r\nX-Request-ID: req-%d\r\n\r\n" % n for n in range(5))
    answers = split_answers(await raw_exchange(proxy, requests, answers=5))
    assert [header(head, "X-Request-ID") for head, _ in answers] == [f"req-{n}" for n in range(5)]
    assert all(head.startswith(b"HTTP/1.1 200 OK\r\n") and header(head, "X-Cache") == "HIT" for head, _ in answers)
    assert [body for _, body in answers] == [RATES] * 5
    assert chain.count == 1  # all five on the fast path


@pytest.mark.parametrize("request_line, extra", [
    (b"GET /fx/latest/USD HTTP/1.0", b""),
    (b"GET /fx/latest/USD HTTP/1.1", b"Connection: close\r\n"),
], ids=["http-1.0", "connection-close"])
async def test_answers_that_close_the_connection_take_the_full_path(fake_upstream, proxy_factory, clock,
                                                                    request_line, extra):
    _, proxy, chain = await start(fake_upstream, proxy_factory, clock)
    await raw_exchange(proxy, PLAIN_GET, answers=1)
    received = await raw_exchange(proxy, request_line + b"\r\nHost: t\r\n" + extra + b"\r\n")  # read to EOF
    [(head, body)] = split_answers(received)
    assert header(head, "X-Cache") == "HIT" and body == RATES
    assert chain.count == 2  # the chain answered, from the same copy, and the server closed the connection


async def test_a_fast_hit_keeps_the_copy_s_own_date_and_renders_empty_bodies_like_the_chain(
        fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    primary.default = Ok(body=b"", headers={"Date": "Tue, 01 Jan 2030 00:00:00 GMT", "X-Upstream": "spoofed"})
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    chain = ChainCalls(proxy.process.runtime)
    await proxy.get("/fx/latest/USD")
    fast = await proxy.get("/fx/latest/USD")
    slow = await proxy.client.get(URL(proxy.url + "/fx/latest/%55SD", encoded=True))
    assert chain.count == 2  # the miss and the encoded path
    assert fast.headers.getall("Date") == slow.headers.getall("Date") == ["Tue, 01 Jan 2030 00:00:00 GMT"]
    assert fast.headers.getall("X-Upstream") == ["fx_primary"]  # the provider's own value never passes
    assert fast.headers["Content-Length"] == "0" and "Content-Type" not in fast.headers
    assert comparable(fast) == comparable(slow)


async def test_a_large_copy_waits_for_a_caller_that_does_not_read(fake_upstream, proxy_factory, clock):
    big = b"x" * (1024 * 1024)
    primary = await fake_upstream("primary")
    primary.default = Ok(body=big)
    proxy = await proxy_factory(cached(primary.url, top={"cache": {"max_body_bytes": "2MiB"}}),
                                clock=clock)
    chain = ChainCalls(proxy.process.runtime)
    await raw_exchange(proxy, PLAIN_GET, answers=1)
    count = 8
    hits = proxy.process.metrics.registry

    async def nothing_read_yet():
        await asyncio.sleep(0.3)
        proxy.process.metrics.flush()
        seen = hits.get_sample_value("cache_requests_total", {"service": "fx", "result": "hit"}) or 0
        # Without waiting for the socket to drain, all eight would be answered into memory by now.
        assert seen < count

    requests = PLAIN_GET * count
    answers = split_answers(await raw_exchange(proxy, requests, answers=count, rcvbuf=64 * 1024,
                                               before_reading=nothing_read_yet))
    assert [body == big for _, body in answers] == [True] * count  # nothing lost once the caller reads
    assert chain.count == 1


@pytest.mark.parametrize("status, headers, why", [
    (204, [], "a bodiless status"),
    (200, [("Transfer-Encoding", "chunked")], "framing headers in the copy"),
    (200, [("X-Note", "a\r\nSet-Cookie: x=1")], "a line break in a value"),
], ids=["204", "framing", "newline"])
def test_copies_the_fast_path_cannot_render_exactly_go_the_full_way(status, headers, why):
    assert render_head(status, None, headers, [("X-Cache", "HIT")], frozenset(), 2) is None, why


def test_a_header_byte_that_was_not_utf8_is_left_out_as_aiohttp_leaves_it_out():
    # Upstream header bytes are decoded with surrogateescape; aiohttp's header writer skips lone
    # surrogates (tests/downstream/test_front.py compares the two front ends' bytes for such an answer).
    head, _ = render_head(200, None, [("X-Name", "caf\udce9")], [], frozenset(), 2)
    assert b"\r\nX-Name: caf\r\n" in head


def test_the_rendered_head_is_what_web_response_would_send():
    headers = [("Content-Type", "application/json"), ("X-Cache", "MISS"), ("ETag", '"1"')]
    head, dated = render_head(404, None, headers, [("X-Cache", "HIT"), ("X-Upstream", "fx_primary")], {"x-cache"}, 2)
    assert not dated
    assert head.decode().split("\r\n") == [
        "HTTP/1.1 404 Not Found", "Content-Type: application/json", 'ETag: "1"', "X-Cache: HIT",
        "X-Upstream: fx_primary", "Server: resilience-proxy", "Content-Length: 2", ""]


async def test_a_target_the_cache_never_answers_is_remembered_per_route_table(fake_upstream, clock, tmp_path):
    # An uncached service's target is refused by the fast path once and then by the bare target alone;
    # a reload that caches the service starts from a new memo, so its copies are answered fast.
    from proxy.config.parse import load_config
    from proxy.ops.process import ProxyProcess
    from tests.fakes import RunningProxy, stop_proxy

    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES, headers={"Content-Type": "application/json"})
    path = tmp_path / "routes.yaml"
    path.write_text(cached(primary.url, cache={"ttl": "0s"}))
    process = ProxyProcess(load_config(path, {}), clock=clock, env={})
    await process.start()
    import aiohttp
    proxy = RunningProxy(process, aiohttp.ClientSession())
    try:
        chain = ChainCalls(process.runtime)
        for _ in range(2):
            assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "BYPASS"
        assert chain.count == 2 and primary.calls == 2
        assert process.runtime.hit.memo.get("/fx/latest/USD") is False
        path.write_text(cached(primary.url))
        assert await process.reload("test") == []
        chain = ChainCalls(process.runtime)
        assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
        hit = await proxy.get("/fx/latest/USD")
        assert hit.headers["X-Cache"] == "HIT" and chain.count == 1 and primary.calls == 3
    finally:
        await stop_proxy(proxy)


async def test_the_memo_of_rendered_heads_stays_within_its_byte_budget(fake_upstream, proxy_factory, clock,
                                                                      monkeypatch):
    from proxy.downstream import hit

    monkeypatch.setattr(hit, "_MEMO_BYTES", 20_000)
    primary = await fake_upstream("primary")
    # a vendor's long policy header: every rendered head is over 4 KB
    primary.default = Ok(body=RATES, headers={"Content-Type": "application/json", "X-Policy": "p" * 4000})
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    chain = ChainCalls(proxy.process.runtime)
    for n in range(12):
        await proxy.get(f"/fx/latest/X{n}")
        assert (await proxy.get(f"/fx/latest/X{n}")).headers["X-Cache"] == "HIT"
    assert chain.count == 12  # every second request was answered by the fast path, head and all
    memo = proxy.process.runtime.hit.memo
    held = sum(len(r.head or b"") + hit._MEMO_ENTRY_BYTES for r in memo.values() if r is not False)
    assert 0 < held <= 20_000 + 4200 + hit._MEMO_ENTRY_BYTES  # at most one item past the budget
