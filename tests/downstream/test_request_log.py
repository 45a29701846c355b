"""The request log line's client and byte counts, and a `Server` header that names no versions."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.downstream.test_front import GET, Client
from tests.fakes import Huge, Ok, route_table

SERVER = "resilience-proxy"


def table(url: str, **service: object) -> str:
    settings = {"retry": "NONE", "cache": {"ttl": "1h"}, "routes": [{"match": "/fx/{rest}", "name": "fx"}],
                "upstreams": [{"name": "fx_primary", "url": url}], **service}
    return route_table({"fx": settings}, server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                                                   "max_response_buffer": "64KiB"})


def request_lines(proxy, read) -> list[dict]:
    proxy.process.bus.deliver_waiting()
    return [line for line in read() if line.get("kind") == "request"]


async def test_the_request_line_has_the_client_and_bytes_in_and_out(fake_upstream, proxy_factory, clock, log_lines):
    upstream = await fake_upstream()
    upstream.default = Ok(body=b'{"rates": {"KRW": 1400.5}}', headers={"Content-Type": "application/json"})
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    assert (await proxy.get("/fx/latest")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest")).headers["X-Cache"] == "HIT"  # the fast path's line
    posted = await proxy.request("POST", "/fx/orders", data=b"x" * 1234)
    assert posted.status == 200
    miss, hit, post = request_lines(proxy, log_lines)
    for line in (miss, hit, post):
        assert line["client"] == "127.0.0.1"
    assert (miss["bytes_in"], miss["bytes_out"]) == (0, 26)
    assert (hit["x_cache"], hit["bytes_in"], hit["bytes_out"]) == ("HIT", 0, 26)
    assert (post["bytes_in"], post["bytes_out"]) == (1234, 26)
    assert upstream.seen[-1].body == b"x" * 1234


async def test_a_streamed_answer_counts_the_bytes_it_sent(fake_upstream, proxy_factory, clock, log_lines):
    upstream = await fake_upstream()
    upstream.default = Huge(300_000, chunked=True)  # above max_response_buffer: streamed through
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    answer = await proxy.get("/fx/big")
    assert len(await answer.read()) == 300_000
    [line] = request_lines(proxy, log_lines)
    assert line["bytes_out"] == 300_000


async def test_refusals_are_logged_with_the_client_but_no_label_worth_of_path(proxy_factory, clock, log_lines):
    proxy = await proxy_factory(table("http://127.0.0.1:1"), clock=clock)
    assert (await proxy.get("/nowhere/at/all?api_key=abc")).status == 404
    proxy.process.bus.deliver_waiting()
    [line] = [line for line in log_lines() if line.get("event") == "request refused"]
    assert line["client"] == "127.0.0.1" and line["status"] == 404 and line["error"] == "no_route"
    assert line["path"] == "/nowhere/at/all"  # the query (where keys travel) is left out


async def test_the_lean_front_end_names_no_versions(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()  # an aiohttp server: its own Server header names Python and aiohttp
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    client = await Client.open(proxy)
    try:
        for _ in range(2):  # a MISS through the chain, then a fast HIT
            client.send(GET % b"/fx/latest")
            answer = await client.answer()
            assert answer.status == 200 and answer.header("Server") == SERVER
        client.send(GET % b"/nowhere")
        assert (await client.answer()).header("Server") == SERVER
    finally:
        client.close()
    assert proxy.process._front.lean_requests == 3 and proxy.process._front.handed_off == 0


async def test_aiohttp_s_answers_name_no_versions_either(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    upstream.default = Huge(300_000, chunked=False)
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    seen = []
    # A body makes a request aiohttp's: a streamed answer, a health read, the metrics port.
    streamed = await proxy.request("POST", "/fx/big", data=b"{}")
    await streamed.read()
    seen.append(streamed.headers.getall("Server"))
    health = await proxy.get("/health")
    seen.append(health.headers.getall("Server"))
    metrics = await proxy.client.get(proxy.metrics_url + "/metrics")
    seen.append(metrics.headers.getall("Server"))
    assert seen == [[SERVER]] * 3
    # aiohttp's own error page for a request it cannot parse.
    client = await Client.open(proxy)
    try:
        client.send(b"GET /fx/x HTTP/1.1\r\nHost: proxy\r\nBad Header: x\r\n\r\n")
        broken = await client.answer()
    finally:
        client.close()
    assert broken.status == 400 and broken.header("Server") == SERVER
    assert proxy.process._front.handed_off >= 2


async def test_no_answer_carries_python_or_aiohttp_versions(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    async with aiohttp.ClientSession() as session:
        for url in (proxy.url + "/fx/a", proxy.url + "/health/ready", proxy.url + "/health/ui",
                    proxy.metrics_url + "/elsewhere"):
            async with session.get(url) as answer:
                assert "aiohttp" not in answer.headers.get("Server", "") and "Python" not in answer.headers["Server"]


async def test_a_websocket_upgrade_names_no_versions(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    reader, writer = await asyncio.open_connection(*proxy.process.addresses["main"])
    try:
        writer.write(b"GET /events HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 101") and b"\r\nServer: resilience-proxy\r\n" in head
