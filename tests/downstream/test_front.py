"""The lean front end (proxy/downstream/front.py): which requests it answers itself, how it hands a
connection to aiohttp without losing a byte, and that its answers say what aiohttp's say."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from dataclasses import dataclass, field

import httptools
import orjson
import pytest
from aiohttp import web

from proxy.config.model import ServerSettings
from proxy.downstream.connection import SINGLETONS, LeanConnection, is_plain_target
from proxy.downstream.front import LeanFront
from proxy.downstream.lean import LeanRequest
from proxy.downstream.wire import render_response
from tests.fakes import Delay, Fail, Huge, Ok, refused_port, route_table, start_proxy, stop_proxy

pytestmark = pytest.mark.http_pieces("front")  # the observable HTTP behaviour over ours and aiohttp's (docs/http-pieces.md)

GET = b"GET %s HTTP/1.1\r\nHost: proxy\r\n\r\n"


@dataclass
class Answer:
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class Client:
    """One raw keep-alive connection to the proxy; answers parsed with httptools as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = httptools.HttpResponseParser(self)
        self._answers: deque[Answer] = deque()
        self._current = Answer()
        self.closed = False

    @classmethod
    async def open(cls, proxy, receive_buffer: int | None = None) -> "Client":
        host, port = proxy.process.addresses["main"]
        if receive_buffer is None:
            return cls(*await asyncio.open_connection(host, port))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connect: no autotuning
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        return cls(*await asyncio.open_connection(sock=sock))

    def send(self, data: bytes) -> None:
        self._writer.write(data)

    async def answer(self, timeout: float = 5.0) -> Answer:
        async with asyncio.timeout(timeout):
            while not self._answers:
                data = await self._reader.read(65536)
                if not data:
                    raise ConnectionResetError("the proxy closed the connection")
                self._parser.feed_data(data)
        return self._answers.popleft()

    async def sees_close(self, timeout: float = 5.0) -> bool:
        """Whether the proxy closes the connection (EOF or reset) within `timeout` without saying more."""
        try:
            async with asyncio.timeout(timeout):
                data = await self._reader.read(65536)
        except ConnectionError:  # reset, or a broken pipe for a caller still writing
            return True
        return data == b""

    def close(self) -> None:
        self._writer.close()

    # httptools callbacks
    def on_status(self, reason: bytes) -> None:
        self._current.reason = reason.decode()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers.append((name.decode(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        self._current.status = self._parser.get_status_code()
        self._answers.append(self._current)
        self._current = Answer()


def assert_paths(front: LeanFront, front_impl: str, lean: int, handed: int) -> None:
    """How many requests the lean path answered and how many connections it handed to aiohttp's server.

    With `server.front: aiohttp` both are 0: every connection is aiohttp's from its first byte.
    """
    assert (front.lean_requests, front.handed_off) == ((lean, handed) if front_impl == "lean" else (0, 0))


def answering(front: LeanFront) -> list:
    """The port's connections being answered, lean or aiohttp's (neither idle nor reading a head)."""
    return [c for c in (*front.connections, *front.handed) if c.idle_since is None and c.reading_since is None]


def front_of(proxy) -> LeanFront:
    return proxy.process._front


def one_upstream(url: str, **server: object) -> str:
    listeners = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", **server}
    return route_table({"fx": {"retry": "NONE", "timeout": "2s", "upstreams": [{"name": "fx_primary", "url": url}]}},
                       server=listeners)


@pytest.fixture
async def proxied(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(one_upstream(upstream.url), clock=clock)
    return proxy, upstream, proxy.process._front


async def test_plain_gets_on_a_keep_alive_connection_are_answered_by_the_lean_front_end(front_impl, proxied):
    proxy, upstream, front = proxied
    upstream.default = Ok(body=b'{"rate": 1}')
    client = await Client.open(proxy)
    for path in (b"/fx/a", b"/fx/b?base=USD", b"/fx/c"):
        client.send(GET % path)
        answer = await client.answer()
        assert (answer.status, answer.body, answer.header("X-Upstream")) == (200, b'{"rate": 1}', "fx_primary")
    assert [s.path_qs for s in upstream.seen] == ["/a", "/b?base=USD", "/c"]
    assert_paths(front, front_impl, 3, 0)
    client.close()


async def test_a_request_arriving_in_pieces_is_answered_once_whole(front_impl, proxied):
    proxy, upstream, front = proxied
    client = await Client.open(proxy)
    request = b"GET /fx/pieces HTTP/1.1\r\nHost: proxy\r\nX-Request-ID: in-pieces\r\n\r\n"
    for start in range(0, len(request), 9):
        client.send(request[start:start + 9])
        await asyncio.sleep(0.005)  # separate segments, each its own data_received
    answer = await client.answer()
    assert (answer.status, answer.header("X-Request-ID")) == (200, "in-pieces")
    assert upstream.calls == 1 and upstream.seen[0].path_qs == "/pieces"
    assert_paths(front, front_impl, 1, 0)
    client.close()


async def test_pipelined_requests_go_to_aiohttp_and_are_answered_in_order(front_impl, proxied):
    proxy, upstream, front = proxied
    client = await Client.open(proxy)
    client.send(b"GET /fx/one HTTP/1.1\r\nHost: p\r\nX-Request-ID: one\r\n\r\n"
                b"GET /fx/two HTTP/1.1\r\nHost: p\r\nX-Request-ID: two\r\n\r\n")
    first, second = await client.answer(), await client.answer()
    assert [first.header("X-Request-ID"), second.header("X-Request-ID")] == ["one", "two"]
    assert [s.path_qs for s in upstream.seen] == ["/one", "/two"]
    assert_paths(front, front_impl, 0, 1)
    client.close()


@pytest.mark.parametrize("first", [
    b"POST /fx/orders HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nX-Request-ID: one\r\n\r\nhello",
    b"GET /fx/a%2Fb HTTP/1.1\r\nHost: p\r\nX-Request-ID: one\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nHost: p\r\nX-Request-ID: one\r\n\r\n",
], ids=["post", "encoded", "health"])
async def test_a_request_not_plain_followed_by_a_plain_one_in_one_read_loses_neither(front_impl, proxied, first):
    proxy, upstream, front = proxied
    client = await Client.open(proxy)
    client.send(first + b"GET /fx/two HTTP/1.1\r\nHost: p\r\nX-Request-ID: two\r\n\r\n")
    answers = [await client.answer(), await client.answer()]
    assert [a.header("X-Request-ID") for a in answers] == ["one", "two"]
    assert [a.status for a in answers] == [200, 200]
    assert upstream.seen[-1].path_qs == "/two"
    assert_paths(front, front_impl, 0, 1)
    client.close()


async def test_a_request_sent_while_the_previous_one_is_answered_waits_its_turn(front_impl, proxied):
    proxy, upstream, front = proxied
    upstream.script(Delay(0.2, then=Ok(body=b"slow")), Ok(body=b"quick"))
    client = await Client.open(proxy)
    client.send(GET % b"/fx/slow")
    await asyncio.sleep(0.05)  # the first is with the upstream now
    client.send(GET % b"/fx/quick")
    first, second = await client.answer(), await client.answer()
    assert (first.body, second.body) == (b"slow", b"quick")
    assert_paths(front, front_impl, 2, 0)  # read after the first answer, still plain
    client.close()


@pytest.mark.parametrize("request_bytes, forwarded", [
    (b"POST /fx/orders HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nhello", ("POST", "/orders", b"hello")),
    (b"GET /fx/chunked HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
     ("GET", "/chunked", b"abc")),
    (b"GET /fx/zero HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n", ("GET", "/zero", b"")),
    (b"DELETE /fx/orders/7 HTTP/1.1\r\nHost: p\r\n\r\n", ("DELETE", "/orders/7", b"")),
    (b"GET /fx/old HTTP/1.0\r\nHost: p\r\n\r\n", ("GET", "/old", b"")),
    (b"GET /fx/last HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n", ("GET", "/last", b"")),
    (b"GET /fx/a%2Fb HTTP/1.1\r\nHost: p\r\n\r\n", ("GET", "/a%2Fb", b"")),
    (b"GET /fx/up HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", ("GET", "/up", b"")),
])
async def test_requests_that_are_not_plain_are_answered_by_aiohttp_from_their_first_byte(
        front_impl, proxied, request_bytes, forwarded):
    proxy, upstream, front = proxied
    client = await Client.open(proxy)
    client.send(request_bytes)
    answer = await client.answer()
    assert answer.status == 200
    seen = upstream.seen[0]
    assert (seen.method, seen.path_qs, seen.body) == forwarded
    assert_paths(front, front_impl, 0, 1)
    client.close()


@pytest.mark.parametrize("target, status", [(b"/health/live", 200), (b"/fx/./a", 400), (b"//fx/a", 400),
                                            (b"http://elsewhere.example/fx/a", 400)])
async def test_the_proxys_own_endpoints_and_odd_targets_keep_aiohttp_s_answers(front_impl, proxied, target, status):
    proxy, upstream, front = proxied
    client = await Client.open(proxy)
    client.send(GET % target)
    assert (await client.answer()).status == status
    assert upstream.calls == 0  # nothing forwarded anywhere for these
    assert_paths(front, front_impl, 0, 1)
    client.close()


async def test_a_connection_once_handed_off_stays_with_aiohttp(front_impl, proxied):
    proxy, upstream, front = proxied
    client = await Client.open(proxy)
    client.send(GET % b"/fx/lean")
    assert (await client.answer()).status == 200
    client.send(b"POST /fx/post HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\nhi")
    assert (await client.answer()).status == 200
    client.send(GET % b"/fx/after")
    assert (await client.answer()).status == 200
    assert [(s.method, s.path_qs, s.body) for s in upstream.seen] == [
        ("GET", "/lean", b""), ("POST", "/post", b"hi"), ("GET", "/after", b"")]
    assert_paths(front, front_impl, 1, 1)
    client.close()


@pytest.mark.parametrize("upgrade", [b"h2c", b"websocket", b"TLS/1.2"])
@pytest.mark.parametrize("cached", [False, True], ids=["chain", "cache-hit"])
async def test_a_request_after_an_upgrade_the_proxy_declines_is_never_left_unanswered(
        fake_upstream, proxy_factory, clock, upgrade, cached):
    """aiohttp's parser drops what follows an upgrade it does not switch to: the answer closes the connection."""
    upstream = await fake_upstream()
    service = {"retry": "NONE", "upstreams": [{"name": "fx_primary", "url": upstream.url}]}
    if cached:
        service["cache"] = {"ttl": "1h"}
    proxy = await proxy_factory(route_table({"fx": service}), clock=clock)
    client = await Client.open(proxy)
    if cached:  # the answer below is then the hit path's pre-rendered bytes
        client.send(GET % b"/fx/a")
        await client.answer()
    client.send(b"GET /fx/a HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n" % upgrade
                + GET % b"/fx/b")
    first = await client.answer()
    assert (first.status, first.header("X-Cache"), first.header("Connection")) == (
        200, "HIT" if cached else "BYPASS", "close")
    assert await client.sees_close(1.0)
    assert upstream.calls == 1  # /fx/b never reached anyone: the caller knows, the connection closed


@pytest.mark.parametrize("request_bytes", [
    b"THIS IS NOT HTTP\r\n\r\n",
    b"GET /fx/" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: p\r\n\r\n",
    b"GET /fx/\xc3\xa9 HTTP/1.1\r\nHost: p\r\n\r\n",
    b"GET /fx/a HTTP/1.1\r\nHost: p\r\nX-Big: " + b"v" * 70_000 + b"\r\n\r\n",
    b"GET /fx/a HTTP/1.1\r\nHost: p\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(300)) + b"\r\n",
    b"GET /fx/a HTTP/1.1\r\nAccept: */*\r\n\r\n",
    b"GET /fx/a HTTP/1.1\r\nHost: p\r\nHost: q\r\n\r\n",
    b"GET /fx/a HTTP/1.1\r\nHost: p\r\nUser-Agent: a\r\nUser-Agent: b\r\n\r\n",
    b"GET /fx/a HTTP/1.1\r\nHost: p\r\nSec-WebSocket-Key1: 4 @1  46546xW%0l 1 5\r\n\r\n",
    b"GET /fx/a HTTP/1.1\r\nHost: p\r\nX-A: a\x00b\r\n\r\n",
], ids=["not-http", "long-target", "non-ascii-target", "long-header", "many-headers", "no-host", "two-hosts",
        "two-user-agents", "old-websocket", "nul-in-value"])
async def test_what_aiohttp_refuses_it_still_refuses(front_impl, proxied, request_bytes):
    proxy, upstream, front = proxied
    client = await Client.open(proxy)
    client.send(request_bytes)
    answer = await client.answer()
    assert answer.status == 400
    assert upstream.calls == 0
    assert_paths(front, front_impl, 0, 1)
    client.close()


def test_every_header_aiohttp_refuses_twice_is_known_here():
    from aiohttp.http_parser import SINGLETON_HEADERS

    assert {name.lower().encode() for name in SINGLETON_HEADERS} <= SINGLETONS


async def test_trailing_spaces_after_a_header_value_are_not_part_of_it(front_impl, proxied):
    proxy, upstream, front = proxied
    lean, handed = await Client.open(proxy), await Client.open(proxy)
    lean.send(b"GET /fx/a HTTP/1.1\r\nHost: p\r\nX-Request-ID: given-id  \t\r\nX-Note: v \r\n\r\n")
    handed.send(b"GET /fx/a HTTP/1.1\r\nHost: p\r\nX-Request-ID: given-id  \t\r\nX-Note: v \r\n"
                b"Content-Length: 0\r\n\r\n")
    from_lean, from_aiohttp = await lean.answer(), await handed.answer()
    assert from_lean.header("X-Request-ID") == from_aiohttp.header("X-Request-ID") == "given-id"
    assert [seen.headers["X-Note"] for seen in upstream.seen] == ["v", "v"]
    assert_paths(front, front_impl, 1, 1)
    lean.close()
    handed.close()


async def test_a_fresh_cached_copy_is_answered_on_the_lean_path(front_impl, fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    text = route_table({"fx": {"retry": "NONE", "cache": {"ttl": "1h"},
                               "upstreams": [{"name": "fx_primary", "url": upstream.url}]}})
    proxy = await proxy_factory(text, clock=clock)
    client = await Client.open(proxy)
    client.send(GET % b"/fx/latest")
    assert (await client.answer()).header("X-Cache") == "MISS"
    client.send(GET % b"/fx/latest")
    hit = await client.answer()
    assert (hit.status, hit.header("X-Cache"), hit.body) == (200, "HIT", b'{"from": "fake"}')
    assert upstream.calls == 1
    assert_paths(proxy.process._front, front_impl, 2, 0)
    client.close()


# --- the same answers as aiohttp's ---------------------------------------------------------------

_VARIES = {"date", "x-request-id", "age"}


def comparable(answer: Answer) -> tuple[int, str, list[tuple[str, str]], bytes]:
    return answer.status, answer.reason, sorted((k.lower(), v) for k, v in answer.headers
                                                if k.lower() not in _VARIES), answer.body


@pytest.mark.parametrize("step", [
    Ok(body=b'{"rate": 1.1}', headers={"Content-Type": "application/json", "ETag": '"v1"'}),
    Ok(status=204, body=b"", headers={"X-Note": "nothing"}),
    Ok(status=304, body=b"", headers={"ETag": '"v1"'}),
    Ok(status=200, body=b"", headers={}),
    Fail(404, body=b'{"error": "no such base"}'),
    Huge(300_000, chunked=True),
    Huge(300_000, chunked=False),
], ids=["json", "204", "304", "empty", "404", "streamed-chunked", "streamed-length"])
async def test_lean_answers_say_what_aiohttp_s_say(front_impl, fake_upstream, proxy_factory, clock, step):
    upstream = await fake_upstream()
    upstream.default = step
    proxy = await proxy_factory(one_upstream(upstream.url, max_response_buffer="64KiB"), clock=clock)
    lean, handed = await Client.open(proxy), await Client.open(proxy)
    lean.send(GET % b"/fx/x")
    # Content-Length: 0 makes the request not plain (never forwarded: the upstream sees the same GET).
    handed.send(b"GET /fx/x HTTP/1.1\r\nHost: proxy\r\nContent-Length: 0\r\n\r\n")
    from_lean, from_aiohttp = await lean.answer(), await handed.answer()
    expected = getattr(step, "status", 200)
    assert from_lean.status == expected
    assert comparable(from_lean) == comparable(from_aiohttp)
    assert_paths(proxy.process._front, front_impl, 1, 1)
    # Both connections stay usable after the answer: its framing ended where the answer did.
    for client in (lean, handed):
        client.send(GET % b"/fx/again")
        assert (await client.answer()).status == expected
        client.close()
    assert upstream.calls == 4


async def test_an_error_answer_from_the_chain_says_what_aiohttp_s_says(proxy_factory, clock):
    proxy = await proxy_factory(one_upstream(f"http://127.0.0.1:{refused_port()}"), clock=clock)
    lean, handed = await Client.open(proxy), await Client.open(proxy)
    lean.send(GET % b"/fx/x")
    handed.send(b"GET /fx/x HTTP/1.1\r\nHost: proxy\r\nContent-Length: 0\r\n\r\n")
    from_lean, from_aiohttp = await lean.answer(), await handed.answer()
    assert from_lean.status == 502
    assert comparable(from_lean)[:3] == comparable(from_aiohttp)[:3]
    lean_body, aiohttp_body = orjson.loads(from_lean.body), orjson.loads(from_aiohttp.body)
    assert lean_body.pop("request_id") == from_lean.header("X-Request-ID")
    aiohttp_body.pop("request_id")
    assert lean_body == aiohttp_body and lean_body["attempts"][0]["outcome"] == "connect_error"
    for client in (lean, handed):
        client.close()


_RAW_ANSWERS = {
    # A 304 may carry the Content-Length of what it stands for (RFC 9110 8.6): above the buffer, it is streamed.
    b"/big304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 100000\r\n\r\n',
    b"/latin1": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Name: caf\xe9\r\nContent-Length: 2\r\n\r\nok",
    b"/latin1big": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Name: caf\xe9\r\nContent-Length: 100000\r\n\r\n"
                   + b"x" * 100_000,
}


@pytest.mark.parametrize("path", list(_RAW_ANSWERS), ids=lambda p: p.decode())
async def test_odd_upstream_answers_are_written_as_aiohttp_writes_them(proxy_factory, clock, path):
    async def upstream(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(_RAW_ANSWERS[head.split(b" ")[1]])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        proxy = await proxy_factory(one_upstream(f"http://127.0.0.1:{port}", max_response_buffer="64KiB"), clock=clock)
        lean, handed = await Client.open(proxy), await Client.open(proxy)
        lean.send(GET % (b"/fx" + path))
        handed.send(b"GET /fx%s HTTP/1.1\r\nHost: proxy\r\nContent-Length: 0\r\n\r\n" % path)
        from_lean, from_aiohttp = await lean.answer(), await handed.answer()
        assert comparable(from_lean) == comparable(from_aiohttp)
        assert from_lean.status == int(_RAW_ANSWERS[path][9:12])
        if path != b"/big304":
            assert from_lean.header("X-Name") == "caf"  # the byte that was not UTF-8 is left out, as aiohttp does
        lean.send(GET % (b"/fx" + path))
        assert (await lean.answer()).status == from_lean.status  # the framing held: the connection goes on
        lean.close()
        handed.close()
    finally:
        server.close()


def test_a_response_with_a_line_break_in_a_header_is_not_rendered():
    response = web.Response(status=200, body=b"x", headers={"X-Bad": "a\r\nInjected: yes"})
    assert render_response(response) is None


@pytest.mark.parametrize("target, plain", [
    (b"/fx/latest/USD", True), (b"/fx/latest?base=USD&x=%20", True), (b"/", True),
    (b"/fx/a%2Fb", False), (b"/fx/../admin", False), (b"/fx/./a", False), (b"//fx", False),
    (b"http://x/fx", False), (b"*", False), (b"/fx/\xc3\xa9", False), (b"/fx#frag", False),
    (b"/health", False), (b"/health/ready", False), (b"/events", False), (b"/events?topic=a", False),
    (b"/healthy/rates", True), (b"/eventsfeed", True), (b"/events/x", True),  # only /events itself is the hub
])
def test_which_targets_are_plain(target, plain):
    assert is_plain_target(target) is plain


async def test_a_lean_request_reads_its_query_as_aiohttp_does(proxied):
    """The cache key is made from the query: both front ends must see the same one."""
    proxy, upstream, front = proxied
    seen = {}

    async def capture(request):
        seen["aiohttp"] = list(request.rel_url.query.items())
        return web.Response(text="ok")

    runner = web.ServerRunner(web.Server(capture), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    target = "/fx/q?b=2&a=1&a=%20x&empty=&flag&plus=a+b&enc=%E2%82%AC"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"ok")
        writer.close()
    finally:
        await runner.cleanup()
    lean = LeanRequest(target, (), _connection_stub())
    assert list(lean.rel_url.query.items()) == seen["aiohttp"]
    assert lean.path == "/fx/q" and lean.raw_path == target


async def test_a_lean_request_names_its_headers_as_aiohttp_does():
    """Upstreams see the header names the proxy's request has: the same from either front end."""
    sent = [(b"accept", b"*/*"), (b"USER-AGENT", b"curl/8"), (b"x-forwarded-for", b"1.2.3.4"),
            (b"x-request-id", b"id-1"), (b"X-Custom-thing", b"a"), (b"if-none-match", b'"v1"'),
            (b"Cache-control", b"no-cache"), (b"host", b"proxy"), (b"x-My", b"b")]
    seen = {}

    async def capture(request):
        seen["aiohttp"] = list(request.headers.items())
        return web.Response(text="ok")

    runner = web.ServerRunner(web.Server(capture), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"GET /fx HTTP/1.1\r\n" + b"".join(b"%s: %s\r\n" % pair for pair in sent) + b"\r\n")
        await reader.readuntil(b"ok")
        writer.close()
    finally:
        await runner.cleanup()
    lean = LeanRequest("/fx", tuple(sent), _connection_stub())
    assert list(lean.headers.items()) == seen["aiohttp"]


def _connection_stub():
    class Stub:
        transport = None
    return Stub()


async def test_a_caller_that_does_not_read_holds_its_connection_not_the_proxy(front_impl, proxied):
    proxy, upstream, front = proxied
    body = b"x" * 4_000_000  # buffered (under max_response_buffer), far past the socket buffers
    upstream.default = Ok(body=body, headers={"Content-Type": "application/octet-stream"})
    slow = await Client.open(proxy, receive_buffer=64 * 1024)  # the kernel must not take the whole answer
    slow.send(GET % b"/fx/big")
    await asyncio.sleep(0.2)  # not reading: the answer waits in the proxy's write buffer
    if front_impl == "lean":
        assert len(answering(front)) == 1  # the lean writer holds it until its write buffer drains
    else:  # aiohttp's counts it idle once RawAnswer.prepare left less than _DRAIN_ABOVE in the buffer (handler.py)
        assert not answering(front) and front.handed
    other = await Client.open(proxy)
    other.send(GET % b"/fx/small")
    assert len((await other.answer()).body) == len(body)  # the proxy still answers everyone else
    answer = await slow.answer(10.0)
    assert answer.body == body
    await asyncio.sleep(0.05)
    assert not answering(front)  # drained, ready again
    slow.send(GET % b"/fx/again")
    assert (await slow.answer()).status == 200
    assert_paths(front, front_impl, 3, 0)
    slow.close()
    other.close()


# --- lifetime --------------------------------------------------------------------------------

HEADER_TIMEOUT, KEEPALIVE_TIMEOUT = ServerSettings().header_timeout, ServerSettings().keepalive_timeout


async def test_connections_idle_past_the_keep_alive_timeout_are_closed(proxied):
    proxy, upstream, front = proxied
    upstream.script(Ok(), Ok(), Delay(0.3))
    idle, handed, busy = await Client.open(proxy), await Client.open(proxy), await Client.open(proxy)
    idle.send(GET % b"/fx/a")
    await idle.answer()
    handed.send(b"DELETE /fx/a HTTP/1.1\r\nHost: p\r\n\r\n")  # aiohttp's from here on
    await handed.answer()
    busy.send(GET % b"/fx/slow")
    await asyncio.sleep(0.1)
    now = asyncio.get_running_loop().time()
    assert front.sweep(now + KEEPALIVE_TIMEOUT - 1) == 0
    assert front.sweep(now + KEEPALIVE_TIMEOUT + 1) == 2  # the one answering is not idle
    assert await idle.sees_close() and await handed.sees_close()
    assert (await busy.answer()).status == 200
    busy.close()


async def test_a_request_head_must_arrive_whole_within_the_header_timeout(front_impl, proxied):
    proxy, upstream, front = proxied
    upstream.script(Ok(), Ok(), Delay(0.2), Delay(0.3))
    silent, half, half_after, half_early, half_post, idle, busy = [await Client.open(proxy) for _ in range(7)]
    half.send(b"GET /fx/a HTTP/1.1\r\nHost: p\r\n")
    idle.send(GET % b"/fx/a")
    await idle.answer()
    half_after.send(GET % b"/fx/b")
    await half_after.answer()
    half_after.send(b"GET /fx/c HTTP/1.1\r\n")  # after an answer, never finished
    half_early.send(GET % b"/fx/slow")
    await asyncio.sleep(0.05)
    half_early.send(b"GET /fx/d HTTP/1.1\r\n")  # while the first is answered, and never finished
    assert (await half_early.answer()).status == 200
    half_post.send(b"POST /fx/e HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nX-")  # handed to aiohttp mid-head
    busy.send(GET % b"/fx/slow")
    await asyncio.sleep(0.05)
    assert front.handed_off == (1 if front_impl == "lean" else 0)  # aiohttp's from the first byte: none handed
    assert len(answering(front)) == 1
    now = asyncio.get_running_loop().time()
    assert front.sweep(now + HEADER_TIMEOUT - 1) == 0
    assert front.sweep(now + HEADER_TIMEOUT + 0.1) == 5
    for client in (silent, half, half_after, half_early, half_post):
        assert await client.sees_close()
    assert front.closed["header_timeout"] == 5
    assert (await busy.answer()).status == 200  # a request being answered is never cut
    idle.send(GET % b"/fx/f")  # an idle keep-alive connection has its own, longer timeout
    assert (await idle.answer()).status == 200
    assert upstream.calls == 5
    for client in (idle, busy):
        client.close()


async def test_slow_heads_and_idle_connections_are_closed_on_time(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    text = one_upstream(upstream.url, header_timeout="200ms", keepalive_timeout="400ms")
    proxy = await proxy_factory(text, clock=clock)
    lean_slow, handed_slow, idle = [await Client.open(proxy) for _ in range(3)]
    idle.send(GET % b"/fx/a")
    await idle.answer()
    handed_slow.send(b"POST /fx/b HTTP/1.1\r\nContent-Length: 2\r\n")
    lean_slow.send(b"GET /fx/c HTTP/1.1\r\nHost: p\r\nX-Slow: ")
    for _ in range(20):  # slowloris: a byte every 20 ms, the head never whole
        lean_slow.send(b"a")
        handed_slow.send(b"X")
        await asyncio.sleep(0.02)
    assert await lean_slow.sees_close(0.1) and await handed_slow.sees_close(0.1)  # while the bytes kept coming
    assert front_of(proxy).closed["header_timeout"] == 2
    assert await idle.sees_close(1.0)
    assert upstream.calls == 1


async def test_past_the_cap_a_new_connection_closes_the_one_idle_longest(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(one_upstream(upstream.url, max_connections=3), clock=clock)
    first, second, third = [await Client.open(proxy) for _ in range(3)]
    second.send(GET % b"/fx/a")  # answered first: idle longest
    await second.answer()
    first.send(b"DELETE /fx/b HTTP/1.1\r\nHost: p\r\n\r\n")  # aiohttp's connections count alike
    await first.answer()
    third.send(GET % b"/fx/c")
    await third.answer()
    fourth = await Client.open(proxy)
    assert await second.sees_close()
    fifth = await Client.open(proxy)
    assert await first.sees_close()
    for client in (third, fourth, fifth):
        client.send(GET % b"/fx/d")
        assert (await client.answer()).status == 200
        client.close()
    assert front_of(proxy).closed == {"header_timeout": 0, "shed": 2, "refused": 0}


async def test_past_the_cap_a_caller_that_began_its_next_request_is_not_the_one_closed(
        fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(one_upstream(upstream.url, max_connections=3), clock=clock)
    lean, handed, other = [await Client.open(proxy) for _ in range(3)]
    lean.send(GET % b"/fx/a")
    await lean.answer()
    handed.send(b"DELETE /fx/b HTTP/1.1\r\nHost: p\r\n\r\n")
    await handed.answer()
    other.send(GET % b"/fx/c")
    await other.answer()
    lean.send(b"GET /fx/d HTTP/1.1\r\n")  # idle longest, but its next request has begun
    handed.send(b"GET /fx/e HTTP/1.1\r\n")
    await asyncio.sleep(0.05)
    newcomer = await Client.open(proxy)
    assert await other.sees_close()
    lean.send(b"Host: p\r\n\r\n")
    handed.send(b"Host: p\r\n\r\n")
    assert ((await lean.answer()).status, (await handed.answer()).status) == (200, 200)
    for client in (lean, handed, newcomer):
        client.close()


async def test_past_the_cap_a_connection_being_answered_is_never_closed(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    upstream.script(Delay(0.3, then=Ok(body=b"one")), Delay(0.3, then=Ok(body=b"two")), Delay(0.3))
    proxy = await proxy_factory(one_upstream(upstream.url, max_connections=3), clock=clock)
    busy, busy_handed, idle = [await Client.open(proxy) for _ in range(3)]
    busy.send(GET % b"/fx/slow")
    busy_handed.send(b"DELETE /fx/slow HTTP/1.1\r\nHost: p\r\n\r\n")
    await asyncio.sleep(0.05)
    newcomer = await Client.open(proxy)
    assert await idle.sees_close()  # the only idle one
    newcomer.send(GET % b"/fx/new")  # now being answered too: every connection is
    await asyncio.sleep(0.05)
    refused = await Client.open(proxy)
    assert await refused.sees_close()
    assert {(await busy.answer()).body, (await busy_handed.answer()).body} == {b"one", b"two"}
    assert (await newcomer.answer()).status == 200
    assert front_of(proxy).closed == {"header_timeout": 0, "shed": 1, "refused": 1}
    for client in (busy, busy_handed, newcomer):
        client.close()


def test_connection_bounds_are_server_settings_with_sane_values():
    from proxy.config.parse import ConfigError, parse_config

    settings = parse_config(one_upstream("http://127.0.0.1:1", header_timeout="2s", keepalive_timeout="30s",
                                         max_connections=500), "routes.yaml", {})
    assert (settings.server.header_timeout, settings.server.keepalive_timeout, settings.server.max_connections) == (
        2.0, 30.0, 500)
    assert {k: settings.effective["server"][k] for k in ("header_timeout", "keepalive_timeout", "max_connections")} \
        == {"header_timeout": 2.0, "keepalive_timeout": 30.0, "max_connections": 500}
    defaults = ServerSettings()
    assert (defaults.header_timeout, defaults.keepalive_timeout, defaults.max_connections) == (10.0, 75.0, None)
    for key, value in (("header_timeout", 0), ("keepalive_timeout", ".inf"), ("header_timeout", ".nan"),
                       ("max_connections", 0), ("max_connections", "many")):
        text = one_upstream("http://127.0.0.1:1").replace("server:\n", f"server:\n  {key}: {value}\n", 1)
        with pytest.raises(ConfigError, match=f"server.{key}"):
            parse_config(text, "routes.yaml", {})


async def test_without_a_set_cap_the_port_takes_what_the_fd_limit_leaves_room_for(proxied):
    import resource

    from proxy.ops.process import default_max_connections

    proxy, upstream, front = proxied
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert front.max_connections == default_max_connections() == min(4096, max(16, soft * 3 // 4))


async def test_stopping_finishes_answers_in_flight_and_closes_idle_connections(fake_upstream, clock):
    upstream = await fake_upstream()
    upstream.script(Delay(1.0, then=Ok(body=b"finished")))
    proxy = await start_proxy(one_upstream(upstream.url), clock=clock)
    try:
        busy, idle = await Client.open(proxy), await Client.open(proxy)
        busy.send(GET % b"/fx/slow")
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(stop_proxy(proxy))
        assert await idle.sees_close(0.5)  # at once, not when the busy one is done
        answer = await busy.answer()
        assert (answer.status, answer.body) == (200, b"finished")
        assert await busy.sees_close(2.0)
        await stopping
    finally:
        if not proxy.client.closed:
            await stop_proxy(proxy)


async def test_stopping_cancels_what_is_still_running_after_the_drain(fake_upstream, clock):
    upstream = await fake_upstream()
    upstream.script(Delay(1.5))
    text = one_upstream(upstream.url, drain_timeout="200ms")
    proxy = await start_proxy(text, clock=clock)
    client = await Client.open(proxy)
    client.send(GET % b"/fx/slow")
    await asyncio.sleep(0.1)
    (connection,) = [c for c in proxy.process._front.connections if c.answering is not None]
    await stop_proxy(proxy)
    assert connection.answering.cancelled()
    assert proxy.process.runtime.active == 0  # nothing holds the table after stop
    assert await client.sees_close(1.0)


async def test_a_connection_lost_to_any_error_reads_as_the_caller_gone_to_a_writer():
    front = LeanFront(_never_called, lambda request: None, max_line_size=8190, max_field_size=8190, max_headers=100,
                      header_timeout=10.0, keepalive_timeout=75.0, max_connections=100)
    connection = LeanConnection(front)

    class Transport:
        def is_closing(self):
            return False

    connection.transport = Transport()  # type: ignore[assignment]
    connection.pause_writing()
    waiting = asyncio.ensure_future(connection.drain())
    await asyncio.sleep(0)
    connection.connection_lost(TimeoutError(110, "Connection timed out"))  # a keep-alive probe gave up
    with pytest.raises(ConnectionResetError) as lost:
        await waiting
    assert isinstance(lost.value.__cause__, TimeoutError)


async def _never_called(request):
    raise AssertionError("no request reaches a connection in this test")


async def test_a_caller_that_leaves_mid_request_costs_nothing_else(proxied, capsys):
    proxy, upstream, front = proxied
    upstream.script(Delay(0.2, then=Ok(body=b"nobody reads this")))
    leaving = await Client.open(proxy)
    leaving.send(GET % b"/fx/slow")
    await asyncio.sleep(0.05)
    leaving.close()
    await asyncio.sleep(0.3)  # the answer arrives for a connection that is gone
    staying = await Client.open(proxy)
    staying.send(GET % b"/fx/next")
    assert (await staying.answer()).status == 200
    assert upstream.calls == 2
    assert not front.connections - {c for c in front.connections if c.transport is not None}
    assert "Traceback" not in capsys.readouterr().err
    staying.close()
