"""Edges a review found: what coalescing may share, broken streams, key rotation with a streamed
body, reloaded server settings, HEAD lengths, Expect: 100-continue, query secrets in logs."""

from __future__ import annotations

import asyncio
import io

import orjson
import pytest
import structlog

from proxy.observability import logs
from tests.fakes import Delay, Fail, Huge, Ok, route_table

pytestmark = pytest.mark.http_pieces("front", "client")  # over ours and aiohttp's (docs/http-pieces.md)


def cached_service(url: str, **service: object) -> str:
    settings = {"retry": "NONE", "timeout": "5s", "deadline": "10s", "cache": {"ttl": "1h"}}
    settings.update(service)
    return route_table({"fx": {**settings, "upstreams": [{"name": "fx_primary", "url": url}]}})


async def raw(proxy, data: bytes, wait: float = 3.0) -> bytes:
    host, port = proxy.process.addresses["main"]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), wait)
            if not chunk:
                break
            chunks.append(chunk)
    except (asyncio.TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return b"".join(chunks)


async def test_an_answer_with_set_cookie_is_never_shared_with_coalesced_callers(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    upstream.script(Delay(0.3, then=Ok(body=b"one", headers={"Set-Cookie": "session=caller-one"})),
                    Delay(0.3, then=Ok(body=b"two", headers={"Set-Cookie": "session=caller-two"})))
    proxy = await proxy_factory(cached_service(upstream.url), clock=clock)
    first, second = await asyncio.gather(proxy.get("/fx/a"), proxy.get("/fx/a"))
    cookies = {first.headers["Set-Cookie"], second.headers["Set-Cookie"]}
    assert cookies == {"session=caller-one", "session=caller-two"}
    assert upstream.calls == 2


async def test_a_private_answer_is_not_shared_but_a_public_error_is(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    upstream.script(Delay(0.3, then=Ok(body=b"mine", headers={"Cache-Control": "private"})),
                    Delay(0.3, then=Ok(body=b"yours", headers={"Cache-Control": "private"})),
                    Delay(0.3, then=Fail(404, body=b'{"error": "no such base"}')))
    proxy = await proxy_factory(cached_service(upstream.url), clock=clock)
    private = await asyncio.gather(proxy.get("/fx/a"), proxy.get("/fx/a"))
    assert sorted([await r.read() for r in private]) == [b"mine", b"yours"]
    missing = await asyncio.gather(proxy.get("/fx/b"), proxy.get("/fx/b"))
    assert [r.status for r in missing] == [404, 404]
    assert upstream.calls == 3  # the two 404s were one call: a public answer may be shared


async def test_conditional_requests_bypass_the_cache_and_coalescing(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    upstream.script(Delay(0.3, then=Ok(status=304, body=b"", headers={"ETag": '"v1"'})),
                    Delay(0.3, then=Ok(body=b"full", headers={"ETag": '"v1"'})))
    proxy = await proxy_factory(cached_service(upstream.url), clock=clock)
    conditional, plain = await asyncio.gather(
        proxy.get("/fx/a", headers={"If-None-Match": '"v1"'}), proxy.get("/fx/a"))
    assert conditional.status == 304 and conditional.headers["X-Cache"] == "BYPASS"
    assert plain.status == 200 and await plain.read() == b"full"
    assert upstream.seen[0].headers.get("If-None-Match") == '"v1"'
    assert upstream.calls == 2


async def test_a_head_never_feeds_a_concurrent_get_and_keeps_its_content_length(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    upstream.default = Delay(0.3, then=Ok(body=b"0123456789"))
    proxy = await proxy_factory(cached_service(upstream.url), clock=clock)
    head, get = await asyncio.gather(proxy.request("HEAD", "/fx/a"), proxy.get("/fx/a"))
    assert head.headers["Content-Length"] == "10"
    assert await get.read() == b"0123456789"
    assert upstream.calls == 2


async def test_a_stream_broken_after_its_headers_is_cut_not_followed_by_a_second_answer(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    text = route_table({"fx": {"retry": "NONE", "upstreams": [{"name": "p", "url": upstream.url}]}},
                       server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                               "max_response_buffer": "64KiB", "drain_timeout": "500ms"})
    proxy = await proxy_factory(text, clock=clock)
    upstream.script(Huge(1_000_000, chunked=False, stall_after=200_000))
    answer = await raw(proxy, b"GET /fx/big HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.count(b"HTTP/1.1 ") == 1          # no 500 smuggled into the body
    assert len(answer) < 1_000_000                   # truncated: the connection was cut
    assert (await proxy.get("/fx/after")).status == 200


async def test_a_refused_key_never_resends_a_streamed_body_empty(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    upstream.script(Fail(429, body=b'{"error": "quota"}'))
    text = route_table({"fx": {"retry": "NONE", "upstreams": [
        {"name": "p", "url": upstream.url, "query": {"k": "{key}"}, "keys": ["kkkk-1", "kkkk-2"]}]}},
        server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "replay_buffer": "1KiB"})
    proxy = await proxy_factory(text, clock=clock)
    response = await proxy.request("PUT", "/fx/doc", data=b"b" * 100_000)
    body = await response.json()
    assert response.status == 502
    assert [a["outcome"] for a in body["attempts"]] == ["key_refused"]
    assert [len(s.body) for s in upstream.seen] == [100_000]
    small = await proxy.request("PUT", "/fx/doc", data=b"small")  # replayable: the next key is used
    assert small.status == 200
    assert upstream.seen[-1].path_qs.endswith("k=kkkk-2") and upstream.seen[-1].body == b"small"


async def test_a_reload_applies_new_strip_headers_to_forwarding(fake_upstream, proxy_factory, clock, tmp_path):
    from proxy.config.parse import load_config
    from proxy.ops.process import ProxyProcess

    upstream = await fake_upstream()
    path = tmp_path / "routes.yaml"
    services = {"fx": {"retry": "NONE", "upstreams": [{"name": "p", "url": upstream.url}]}}
    path.write_text(route_table(services))
    process = ProxyProcess(load_config(path, {}), clock=clock, env={})
    await process.start()
    import aiohttp
    async with aiohttp.ClientSession() as client:
        try:
            host, port = process.addresses["main"]
            await client.get(f"http://{host}:{port}/fx/a", headers={"X-Internal-Token": "t1"})
            path.write_text(route_table(services, server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                                                          "strip_headers": ["Cookie", "Authorization", "X-Internal-Token"]}))
            assert await process.reload("test") == []
            await client.get(f"http://{host}:{port}/fx/a", headers={"X-Internal-Token": "t2"})
        finally:
            await process.stop()
    assert upstream.seen[0].headers["X-Internal-Token"] == "t1"
    assert "X-Internal-Token" not in upstream.seen[1].headers


async def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(route_table({"fx": {"retry": "NONE", "upstreams": [{"name": "p", "url": upstream.url}]}}),
                                clock=clock)
    host, port = proxy.process.addresses["main"]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"PUT /fx/doc HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    await writer.drain()
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert final.startswith(b"HTTP/1.1 200")
    assert upstream.seen[0].body == b"hello"
    assert "Expect" not in upstream.seen[0].headers


async def test_query_values_named_like_secrets_are_masked_in_attempt_logs(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(route_table({"fx": {"retry": "NONE", "upstreams": [{"name": "p", "url": upstream.url}]}}),
                                clock=clock)
    buffer = io.StringIO()
    logs.configure("info", "json", stream=buffer)
    try:
        await proxy.get("/fx/a?api_key=callers-own-4f5e&symbols=KRW&access_token=tok-9a9a")
        proxy.process.bus.deliver_waiting()  # per-request lines are written in batches, after the answer
    finally:
        structlog.reset_defaults()
    lines = [orjson.loads(line) for line in buffer.getvalue().splitlines()]
    attempt = next(line for line in lines if line.get("kind") == "attempt")
    assert "callers-own-4f5e" not in buffer.getvalue() and "tok-9a9a" not in buffer.getvalue()
    assert "api_key=***" in attempt["url"] and "symbols=KRW" in attempt["url"]
    assert upstream.seen[0].path_qs.endswith("api_key=callers-own-4f5e&symbols=KRW&access_token=tok-9a9a")
