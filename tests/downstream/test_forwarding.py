"""Forwarding as a proxy should: byte for byte, the right headers, nothing forwarded anywhere else."""

from __future__ import annotations

import asyncio
import gzip
import re

import pytest

from tests.fakes import Garbage, Gzip, Huge, Ok, route_table

pytestmark = pytest.mark.http_pieces("front", "client")  # over ours and aiohttp's (docs/http-pieces.md)

FAST_RETRY = {"retries": 0, "base_delay": "1ms", "max_delay": "5ms"}


def one_service(url: str, **upstream: object) -> str:
    return route_table({"fx": {"prefix": "/fx", "retry": "NONE",
                               "upstreams": [{"name": "fx_primary", "url": url, **upstream}]}})


async def raw_request(proxy, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send bytes as they are (aiohttp's client would normalise them) and read the answer."""
    host, port = proxy.process.addresses["main"]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), read_timeout)
    finally:
        writer.close()


async def test_answer_is_the_upstreams_byte_for_byte_with_proxy_headers_added(fake_upstream, proxy_factory):
    upstream = await fake_upstream("primary")
    upstream.default = Ok(status=201, body=b'{"rates": {"KRW": 1400}}',
                          headers={"Content-Type": "application/json; charset=utf-8", "X-Vendor-Trace": "abc",
                                   "ETag": '"v1"'})
    proxy = await proxy_factory(one_service(upstream.url))
    response = await proxy.get("/fx/latest/USD?symbols=KRW", headers={"X-Request-ID": "req-123"})
    assert response.status == 201
    assert await response.read() == b'{"rates": {"KRW": 1400}}'
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["X-Vendor-Trace"] == "abc"
    assert response.headers["ETag"] == '"v1"'
    assert response.headers["X-Upstream"] == "fx_primary"
    assert response.headers["X-Request-ID"] == "req-123"
    assert upstream.calls == 1
    assert upstream.seen[0].path_qs == "/latest/USD?symbols=KRW"


async def test_a_request_id_is_made_when_the_caller_sends_none(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    proxy = await proxy_factory(one_service(upstream.url))
    first = await proxy.get("/fx/a")
    second = await proxy.get("/fx/a")
    assert len(first.headers["X-Request-ID"]) == 32
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


async def test_gzip_passes_through_untouched(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    step = Gzip()
    upstream.default = step
    proxy = await proxy_factory(one_service(upstream.url))
    response = await proxy.get("/fx/latest/USD", headers={"Accept-Encoding": "gzip"})
    raw = await response.read()
    assert response.headers["Content-Encoding"] == "gzip"
    assert raw == step.raw
    assert gzip.decompress(raw) == step.text
    assert upstream.seen[0].headers["Accept-Encoding"] == "gzip"


async def test_hop_by_hop_and_credential_headers_are_not_forwarded(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    upstream.default = Ok(headers={"Content-Type": "text/plain", "Keep-Alive": "timeout=5",
                                   "Connection": "X-Upstream-Private", "X-Upstream-Private": "secret",
                                   "X-End-To-End": "kept"})
    proxy = await proxy_factory(one_service(upstream.url))
    response = await proxy.get("/fx/a", headers={
        "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1", "TE": "trailers", "Proxy-Authorization": "Basic eA==",
        "Cookie": "session=abc", "Authorization": "Bearer caller-token", "X-Keep-Me": "2"})
    assert response.status == 200
    seen = upstream.seen[0].headers
    for dropped in ("X-Drop-Me", "TE", "Proxy-Authorization", "Cookie", "Authorization"):
        assert dropped not in seen, dropped
    assert seen["X-Keep-Me"] == "2"
    assert seen["Host"] == f"127.0.0.1:{upstream.port}"
    assert "X-Upstream-Private" not in response.headers
    assert "Keep-Alive" not in response.headers
    assert response.headers["X-End-To-End"] == "kept"


async def test_service_may_allow_the_callers_authorization_through(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    text = route_table({"api": {"forward_headers": ["Authorization"], "retry": "NONE",
                                "upstreams": [{"name": "own_api", "url": upstream.url}]}})
    proxy = await proxy_factory(text)
    await proxy.get("/api/me", headers={"Authorization": "Bearer mine", "Cookie": "c=1"})
    assert upstream.seen[0].headers["Authorization"] == "Bearer mine"
    assert "Cookie" not in upstream.seen[0].headers


async def test_each_vendor_gets_its_own_url_shape_and_keys_from_the_environment(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Ok(status=500))
    text = route_table({"fx": {
        "retry": "NONE",
        "routes": [{"match": "/fx/latest/{base}"}],
        "upstreams": [
            {"name": "fx_primary", "url": primary.url + "/api", "path": "/v6/latest/{base}",
             "headers": {"Authorization": "Bearer ${FX_PRIMARY_API_KEY}"}},
            {"name": "fx_secondary", "url": secondary.url, "path": "/latest",
             "query": {"access_key": "${FX_SECONDARY_API_KEY}", "base": "{base}"}},
        ]}})
    env = {"FX_PRIMARY_API_KEY": "pk-live-1111", "FX_SECONDARY_API_KEY": "sk-live-2222"}
    proxy = await proxy_factory(text, env=env)
    response = await proxy.get("/fx/latest/EUR?symbols=KRW&access_key=caller-tries-its-own")
    assert response.status == 200
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert primary.seen[0].path_qs == "/api/v6/latest/EUR?symbols=KRW&access_key=caller-tries-its-own"
    assert primary.seen[0].headers["Authorization"] == "Bearer pk-live-1111"
    assert secondary.seen[0].path_qs == "/latest?symbols=KRW&access_key=sk-live-2222&base=EUR"
    assert "Authorization" not in secondary.seen[0].headers


async def test_placeholder_values_cannot_inject_path_or_query(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    text = route_table({"fx": {"retry": "NONE", "routes": [{"match": "/fx/latest/{base}"}],
                               "upstreams": [{"name": "p", "url": upstream.url, "path": "/v6/{base}/x"}]}})
    proxy = await proxy_factory(text)
    response = await proxy.get("/fx/latest/USD%3Fadmin=1%23")
    assert response.status == 200
    assert upstream.seen[0].path_qs == "/v6/USD%3Fadmin=1%23/x"


async def test_unknown_prefix_is_404_no_route_and_nothing_is_forwarded(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    proxy = await proxy_factory(one_service(upstream.url))
    for path in ("/other/x", "/fxy/latest", "/"):
        response = await proxy.get(path)
        assert response.status == 404, path
        assert (await response.json())["error"] == "no_route"
    assert upstream.calls == 0


@pytest.mark.parametrize("target", [
    b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    b"GET /fx/../admin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/%2E%2e%2fadmin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/%252e%252e/admin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx//evil.example/x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET //evil.example/fx HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/a%5c..%5cb HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/a%00b HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/..;/admin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/a/..;jsessionid=1/admin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/%2e%2e%3b/admin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/.;x/admin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/a#b HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/a?q=1#/../admin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/%2525252e%2525252e/admin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fx/%25%32%65%25%32%65/admin HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=lambda target: target.split(b" ")[1].decode())
async def test_targets_that_could_escape_the_route_table_are_refused_with_400(fake_upstream, proxy_factory, target):
    """Refused by either front end, never forwarded, and never answered from a copy: asked twice
    of a cached service, the second is as refused as the first."""
    upstream = await fake_upstream()
    proxy = await proxy_factory(route_table({"fx": {"retry": "NONE", "cache": {"ttl": "1h"},
                                                    "upstreams": [{"name": "fx_primary", "url": upstream.url}]}}))
    for _ in range(2):
        answer = await raw_request(proxy, target)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b'"error":"bad_request"' in answer
    assert upstream.calls == 0


async def test_oversized_headers_get_431_and_are_not_forwarded(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    proxy = await proxy_factory(one_service(upstream.url))
    response = await proxy.get("/fx/a", headers={"X-Big": "a" * 20000})
    assert response.status == 431
    assert upstream.calls == 0


async def test_oversized_bodies_get_413_by_length_and_while_streaming(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    text = route_table({"fx": {"retry": "NONE", "upstreams": [{"name": "p", "url": upstream.url}]}},
                       server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                               "max_request_body": "64KiB", "replay_buffer": "16KiB"})
    proxy = await proxy_factory(text)
    declared = await proxy.request("POST", "/fx/upload", data=b"x" * 70000)
    assert declared.status == 413

    async def chunks():
        for _ in range(10):
            yield b"y" * 10000

    streamed = await proxy.request("POST", "/fx/upload", data=chunks())
    assert streamed.status == 413
    # A declared oversized body never reaches the upstream.
    assert all(len(seen.body) <= 70000 for seen in upstream.seen)
    assert not any(len(seen.body) == 70000 for seen in upstream.seen)


async def test_request_bodies_reach_the_upstream_whole(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    text = route_table({"fx": {"retry": "NONE", "upstreams": [{"name": "p", "url": upstream.url}]}},
                       server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "replay_buffer": "16KiB"})
    proxy = await proxy_factory(text)
    small = await proxy.request("PUT", "/fx/doc", data=b"small body")
    large = await proxy.request("PUT", "/fx/doc", data=b"z" * 100_000)
    assert small.status == large.status == 200
    assert upstream.seen[0].body == b"small body"
    assert upstream.seen[1].body == b"z" * 100_000


async def test_huge_upstream_bodies_are_streamed_whole(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    text = route_table({"fx": {"retry": "NONE", "upstreams": [{"name": "p", "url": upstream.url}]}},
                       server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                               "max_response_buffer": "256KiB"})
    proxy = await proxy_factory(text)
    upstream.script(Huge(3_000_000, chunked=True), Huge(2_000_000, chunked=False))
    chunked = await proxy.get("/fx/big")
    assert chunked.status == 200
    assert len(await chunked.read()) == 3_000_000
    sized = await proxy.get("/fx/big")
    assert sized.headers["Content-Length"] == "2000000"
    assert len(await sized.read()) == 2_000_000
    assert chunked.headers["X-Upstream"] == "p"


async def test_malformed_http_from_a_client_never_crashes_the_proxy(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    proxy = await proxy_factory(one_service(upstream.url))
    for junk in (b"\x00\x01\x02\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /fx/a HTTP/1.1\r\nBad Header\r\n\r\n",
                 b"POST /fx/a HTTP/1.1\r\nContent-Length: -5\r\n\r\n"):
        answer = await raw_request(proxy, junk)
        assert answer == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:100]
    response = await proxy.get("/fx/a")
    assert response.status == 200
    assert upstream.calls == 1


async def test_garbage_from_an_upstream_is_a_malformed_attempt_not_a_crash(fake_upstream, proxy_factory):
    upstream = await fake_upstream()
    upstream.script(Garbage())
    proxy = await proxy_factory(one_service(upstream.url))
    response = await proxy.get("/fx/a")
    body = await response.json()
    assert response.status == 502
    assert body["attempts"][0]["upstream"] == "fx_primary"
    assert body["attempts"][0]["outcome"] in ("malformed", "reset")
    assert (await proxy.get("/fx/a")).status == 200
