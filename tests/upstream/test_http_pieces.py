"""The two switches (docs/http-pieces.md): `server.front: lean | aiohttp` and `upstream_client: http1 | aiohttp`.

Their settings, their reloads, and what the aiohttp client must leave alone (headers, proxies,
compression) and how its failures are classified, beside http1's.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import yaml

from proxy.config.parse import ConfigError, parse_config
from proxy.upstream import aiohttp_client, http1
from tests.fakes import Delay, Garbage, Ok, Reset, refused_port, route_table

LISTENERS = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}


def table(url: str = "http://127.0.0.1:9", server: dict | None = None, **top: object) -> str:
    services = {"fx": {"retry": "NONE", "timeout": "300ms", "upstreams": [{"name": "fx_primary", "url": url}]}}
    return route_table(services, server={**LISTENERS, **(server or {})}, **top)


# --- settings ---------------------------------------------------------------------------------

def test_both_default_to_our_pieces_and_show_in_the_effective_config():
    config = parse_config(table(), "routes.yaml", {})
    assert (config.server.front, config.upstream_client) == ("lean", "http1")
    assert (config.effective["server"]["front"], config.effective["upstream_client"]) == ("lean", "http1")


def test_aiohttp_s_pieces_are_chosen_by_name():
    config = parse_config(table(server={"front": "aiohttp"}, upstream_client="aiohttp"), "routes.yaml", {})
    assert (config.server.front, config.upstream_client) == ("aiohttp", "aiohttp")
    printed = yaml.safe_load(yaml.safe_dump(dict(config.effective), sort_keys=False))  # what `check` prints
    assert (printed["server"]["front"], printed["upstream_client"]) == ("aiohttp", "aiohttp")


@pytest.mark.parametrize("server, top, message", [
    ({"front": "nginx"}, {}, "server.front: expected lean or aiohttp, got 'nginx'"),
    ({"front": 1}, {}, "server.front: expected lean or aiohttp, got 1"),
    ({"front": None}, {}, "server.front: expected lean or aiohttp, got None"),
    ({}, {"upstream_client": "curl"}, "upstream_client: expected http1 or aiohttp, got 'curl'"),
    ({}, {"upstream_client": ["aiohttp"]}, "upstream_client: expected http1 or aiohttp, got ['aiohttp']"),
    ({}, {"upstream_client": "AIOHTTP"}, "upstream_client: expected http1 or aiohttp, got 'AIOHTTP'"),
], ids=["unknown-front", "number-front", "empty-front", "unknown-client", "list-client", "wrong-case-client"])
def test_a_bad_value_is_refused_naming_its_key_and_line(server, top, message):
    text = table(server=server, **top)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "routes.yaml", {})
    line = next(n for n, row in enumerate(text.splitlines(), 1) if row.lstrip().startswith(("front:", "upstream_client:")))
    assert f"routes.yaml:{line}: {message}" in str(caught.value)


def test_a_misspelt_key_is_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError, match="unknown key 'upstream_clients'.*upstream_client"):
        parse_config(table(upstream_clients="aiohttp"), "routes.yaml", {})
    with pytest.raises(ConfigError, match=r"server: unknown key 'frontend'.*front"):
        parse_config(table(server={"frontend": "aiohttp"}), "routes.yaml", {})


# --- the aiohttp client leaves the request alone ----------------------------------------------

class Recorder:
    """A raw server that keeps each request's head and answers 200 with a gzip-declared body."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if b"chunked" in head.lower():
                    await reader.readuntil(b"0\r\n\r\n")
                elif b"content-length: " in head.lower():
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\n\x1f\x8b\x00\x00")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def recorder():
    server = Recorder()
    url = await server.start()
    yield server, url
    assert server.server is not None
    server.server.close()


def head_names(head: bytes) -> list[str]:
    return [line.split(b":", 1)[0].decode() for line in head.split(b"\r\n")[1:] if line]


async def stream():
    yield b"ab"


@pytest.mark.parametrize("method, body, framing", [
    ("GET", None, []), ("POST", b"{}", ["Content-Length"]), ("POST", None, ["Content-Length"]),
    ("PUT", "stream", ["Transfer-Encoding"]), ("DELETE", None, {"http1": [], "aiohttp": ["Content-Length"]}),
], ids=["get", "post", "empty-post", "streamed-put", "delete"])
@pytest.mark.http_pieces("client")
async def test_a_request_carries_our_headers_and_its_framing_only(client_pool, client_impl, recorder, monkeypatch,
                                                                 method, body, framing):
    from multidict import CIMultiDict
    from yarl import URL

    server, url = recorder
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{refused_port()}")  # never used: trust_env is off
    monkeypatch.setenv("NO_PROXY", "")
    pool = client_pool(URL(url))
    headers = CIMultiDict([("X-A", "1"), ("X-A", "2"), ("content-type", "text/plain")])
    response = await pool.request(method, "/x?q=%2F", headers, stream() if body == "stream" else body, 1.0)
    data, complete = await response.read_all(1024)
    response.release()
    assert (data, complete) == (b"\x1f\x8b\x00\x00", True)  # gzip passed on as it came: no decompression
    if isinstance(framing, dict):
        framing = framing[client_impl]  # aiohttp frames every body-less DELETE with Content-Length: 0
    (head,) = server.heads
    assert head.startswith(f"{method} /x?q=%2F HTTP/1.1\r\n".encode())  # the target as given, not re-encoded
    assert head_names(head) == ["Host", "X-A", "X-A", "content-type", *framing]  # no User-Agent, Accept, ...


# --- failures are classified alike ------------------------------------------------------------

@pytest.mark.http_pieces("client")
@pytest.mark.parametrize("step, outcome", [(Delay(2.0), "timeout"), (Garbage(), "malformed")], ids=["timeout", "garbage"])
async def test_a_failed_attempt_says_what_failed(fake_upstream, proxy_factory, step, outcome):
    upstream = await fake_upstream()
    upstream.script(step)
    proxy = await proxy_factory(table(upstream.url))
    response = await proxy.get("/fx/a")
    assert response.status in (502, 504)
    assert (await response.json())["attempts"][0]["outcome"] == outcome


@pytest.mark.http_pieces("client")
async def test_nothing_listening_is_a_refused_connect(proxy_factory, client_pool):
    from yarl import URL

    port = refused_port()
    with pytest.raises(http1.ConnectRefused, match=f"Cannot connect to host 127.0.0.1:{port}"):
        await client_pool(URL(f"http://127.0.0.1:{port}")).request("GET", "/", {}, None, 1.0)
    proxy = await proxy_factory(table(f"http://127.0.0.1:{port}"))
    response = await proxy.get("/fx/a")
    attempt = (await response.json())["attempts"][0]
    assert (response.status, attempt["outcome"]) == (502, "connect_error")


@pytest.mark.http_pieces("client")
async def test_an_upstream_that_closes_without_answering(fake_upstream, proxy_factory, client_impl):
    upstream = await fake_upstream()
    upstream.script(Reset(), Ok(body=b"second"))
    proxy = await proxy_factory(table(upstream.url))
    response = await proxy.get("/fx/a")
    if client_impl == "http1":  # a reset is the attempt's outcome: the chain's retry policy decides what follows
        assert (response.status, (await response.json())["attempts"][0]["outcome"]) == (502, "reset")
        assert upstream.calls == 1
    else:  # aiohttp sends an idempotent request once more by itself, unseen by the retry policy and the breaker
        assert (response.status, await response.read()) == (200, b"second")
        assert upstream.calls == 2


# --- reloads ----------------------------------------------------------------------------------

async def started(path, text: str, clock):
    """A proxy process on the route table file `path`, written with `text` (so that it can be reloaded)."""
    from proxy.config.parse import load_config
    from proxy.ops.process import ProxyProcess

    path.write_text(text)
    process = ProxyProcess(load_config(path, {}), clock=clock, env={})
    await process.start()
    return process


async def test_a_reload_of_server_front_applies_to_the_connections_made_after_it(fake_upstream, tmp_path, clock):
    upstream = await fake_upstream()
    path = tmp_path / "routes.yaml"
    process = await started(path, table(upstream.url), clock)
    front = process._front
    host, port = process.addresses["main"]
    try:
        async with aiohttp.ClientSession() as before, aiohttp.ClientSession() as after:
            assert (await before.get(f"http://{host}:{port}/fx/a")).status == 200
            assert front.lean_requests == 1
            path.write_text(table(upstream.url, server={"front": "aiohttp"}))
            assert await process.reload("test") == []
            assert (await after.get(f"http://{host}:{port}/fx/b")).status == 200  # a new connection: aiohttp's
            assert front.lean_requests == 1 and len(front.handed) == 1
            assert (await before.get(f"http://{host}:{port}/fx/c")).status == 200  # the old one stays lean
            assert front.lean_requests == 2 and front.handed_off == 0
    finally:
        await process.stop()
    assert upstream.calls == 3


async def test_a_reload_of_upstream_client_gives_the_new_table_its_own_pools(fake_upstream, tmp_path, clock):
    upstream = await fake_upstream()
    path = tmp_path / "routes.yaml"
    process = await started(path, table(upstream.url), clock)
    host, port = process.addresses["main"]
    try:
        async with aiohttp.ClientSession() as client:
            assert (await client.get(f"http://{host}:{port}/fx/a")).status == 200
            old = process.runtime.transport
            (old_pool,) = old._pools.values()
            assert type(old_pool) is http1.Pool
            path.write_text(table(upstream.url, upstream_client="aiohttp"))
            assert await process.reload("test") == []
            assert (await client.get(f"http://{host}:{port}/fx/b")).status == 200
            (new_pool,) = process.runtime.transport._pools.values()
            assert type(new_pool) is aiohttp_client.Pool and process.runtime.transport.client == "aiohttp"
            await old.close(keep={"fx_primary"})  # what the old table's retirement does: its pools were its own
            assert old_pool.closed and not new_pool.closed
    finally:
        await process.stop()
    assert [seen.path_qs for seen in upstream.seen] == ["/a", "/b"]
