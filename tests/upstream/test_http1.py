"""The upstream HTTP/1.1 client (proxy.http1) against raw scripted servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from yarl import URL

from proxy.upstream import http1

pytestmark = pytest.mark.http_pieces("client")  # observable client behaviour over http1 and aiohttp's (docs/http-pieces.md)


class RawServer:
    """Answers each request on a connection with the next scripted reply (bytes, or a callable)."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.requests: list[bytes] = []
        self.open_now = 0
        self.most_open = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> URL:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                reply = self.replies.pop(0)
                if reply == b"CLOSE":
                    break
                if reply.startswith(b"SLOW:"):
                    await asyncio.sleep(0.05)
                    reply = reply[5:]
                writer.write(reply)
                await writer.drain()
                if b"Connection: close" in reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Seq: %d\r\n\r\nok"


@pytest.fixture
async def raw_server():
    servers = []

    async def start(replies: list[bytes]) -> tuple[RawServer, URL]:
        server = RawServer(replies)
        servers.append(server)
        return server, await server.start()

    yield start
    for server in servers:
        await server.stop()


async def get(pool: http1.Pool, method: str = "GET", body: bytes | None = None) -> tuple[http1.Response, bytes]:
    response = await pool.request(method, "/x", {}, body, 1.0)
    data, complete = await response.read_all(1 << 20)
    assert complete
    response.release()
    return response, data


async def test_sequential_requests_reuse_one_keep_alive_connection(client_pool, raw_server):
    server, url = await raw_server([OK % n for n in range(3)])
    pool = client_pool(url)
    seen = [(await get(pool))[0].header("X-Seq") for _ in range(3)]
    assert seen == ["0", "1", "2"] and server.connections == 1
    assert server.requests[0].startswith(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:")
    pool.close()


async def test_the_pool_never_opens_more_than_its_limit(client_pool, raw_server):
    server, url = await raw_server([b"SLOW:" + OK % n for n in range(6)])
    pool = client_pool(url, limit=2)
    answers = await asyncio.gather(*(get(pool) for _ in range(6)))
    assert sorted(int(r.header("X-Seq")) for r, _ in answers) == list(range(6))
    assert server.most_open == 2 and server.connections == 2
    pool.close()


async def test_a_body_delimited_by_the_close_is_read_whole(client_pool, raw_server):
    _, url = await raw_server([b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"y" * 70000])
    pool = client_pool(url)
    response, data = await get(pool)
    assert response.status == 200 and data == b"y" * 70000 and response.content_length is None
    pool.close()


async def test_informational_answers_are_skipped(client_pool, raw_server):
    _, url = await raw_server([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                               + OK % 7])
    pool = client_pool(url)
    response, data = await get(pool)
    assert (response.status, response.header("X-Seq"), response.header("Link"), data) == (200, "7", None, b"ok")
    pool.close()


async def test_a_head_answer_ends_with_its_headers_even_with_a_content_length(client_pool, client_impl, raw_server):
    server, url = await raw_server([b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", OK % 1])
    pool = client_pool(url)
    response, data = await asyncio.wait_for(get(pool, "HEAD"), 2.0)
    assert response.status == 200 and response.content_length == 5000 and data == b""
    assert (await get(pool))[1] == b"ok"
    if client_impl == "http1":
        assert server.connections == 2  # llhttp cannot be told the request was HEAD: the connection is not reused
    else:
        assert server.connections == 1  # aiohttp's parser knows it was HEAD: the connection is reused
    pool.close()


@pytest.mark.parametrize("reply, message", [
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\nContent-Length: 0\r\n\r\n", "headers larger than"),
    (b"THIS IS NOT HTTP\r\n\r\n", None),
    (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", None),
], ids=["huge-headers", "garbage", "bad-length"])
async def test_what_is_not_http_is_a_bad_answer(client_pool, client_impl, raw_server, reply, message):
    _, url = await raw_server([reply])
    pool = client_pool(url)
    if client_impl == "aiohttp" and message is not None:
        message = "Got more than 65536 bytes"  # aiohttp's words for its line limit; the class is the contract
    with pytest.raises(http1.BadAnswer, match=message):
        await get(pool)
    pool.close()


async def test_a_close_mid_body_is_a_disconnect_not_a_short_answer(client_pool, raw_server):
    _, url = await raw_server([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly this"])
    pool = client_pool(url)
    response = await pool.request("GET", "/x", {}, None, 1.0)
    with pytest.raises(http1.Disconnected):
        await response.read_all(1 << 20)
    response.release()
    pool.close()


async def test_a_reused_connection_closed_under_us_is_retried_once_for_idempotent_methods(client_pool, raw_server):
    # The second request meets a connection the server closed: sent again on a new one.
    server, url = await raw_server([OK % 1, b"CLOSE", OK % 2])
    pool = client_pool(url)
    await get(pool)
    await asyncio.sleep(0.05)
    assert (await get(pool))[0].header("X-Seq") == "2"
    assert server.connections == 2 and len(server.requests) == 3


async def test_a_post_on_a_closed_reused_connection_is_not_sent_twice(client_pool, raw_server):
    server, url = await raw_server([OK % 1, b"CLOSE", OK % 2])
    pool = client_pool(url)
    await get(pool)
    await asyncio.sleep(0.05)
    with pytest.raises(http1.Disconnected):
        await get(pool, "POST", b"{}")
    assert len(server.requests) == 2


async def test_connect_failures_and_header_injection_are_refused(client_pool, raw_server):
    server, url = await raw_server([])
    await server.stop()
    await asyncio.sleep(0)
    with pytest.raises(http1.ConnectFailed, match="Cannot connect"):
        await client_pool(URL("http://127.0.0.1:1")).request("GET", "/", {}, None, 1.0)
    with pytest.raises(ValueError, match="line break"):
        await client_pool(url).request("GET", "/", {"X-A": "1\r\nX-Injected: 1"}, None, 1.0)


async def test_credentials_in_the_url_become_basic_auth_and_bodies_carry_their_length(client_pool, raw_server):
    server, url = await raw_server([OK % 1])
    pool = client_pool(url.with_user("me").with_password("pw"))
    await get(pool, "POST", b'{"a": 1}')
    head = server.requests[0].decode()
    assert "Authorization: Basic bWU6cHc=\r\n" in head and "Content-Length: 8\r\n" in head
    pool.close()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    """A certificate for 127.0.0.1 made by the openssl command line, and its key."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_https_upstreams_are_verified_and_spoken_to_over_tls(self_signed):
    import ssl

    cert, key = self_signed
    served = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            served.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(OK % 9)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_side)
    url = URL(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        with pytest.raises(http1.ConnectFailed, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await http1.Pool(url).request("GET", "/x", {}, None, 2.0)  # the system's CAs do not know it
        trusting = ssl.create_default_context(cafile=str(cert))
        response, data = await get(http1.Pool(url, ssl_context=trusting))
        assert (response.status, response.header("X-Seq"), data) == (200, "9", b"ok")
        assert served[-1].startswith(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:")
    finally:
        server.close()


async def test_a_request_body_cut_short_by_an_early_answer_never_reuses_the_connection(client_pool, raw_server):
    server, url = await raw_server([b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n", OK % 2])
    pool = client_pool(url)

    async def body():
        yield b"a" * 1000
        await asyncio.sleep(0.1)  # the upstream has answered by now
        yield b"b" * 1000
        yield b"c" * 1000

    response = await pool.request("POST", "/x", {}, body(), 1.0)
    assert response.status == 413
    await response.read_all(1 << 20)
    response.release()
    assert (await get(pool))[0].header("X-Seq") == "2"
    assert server.connections == 2  # a half-sent chunked body leaves the old connection out of step
    pool.close()


async def test_a_connection_paused_under_a_large_body_reads_again_when_pooled(client_pool, raw_server):
    # Bodies larger than the read-ahead pause the socket; the paused connection must not go back to the pool
    # still paused, or the next request on it waits for an answer nobody reads.
    big = b"x" * (400 * 1024)
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Seq: %%d\r\n\r\n%b" % (len(big), big)
    server, url = await raw_server([reply % n for n in range(3)])
    pool = client_pool(url)
    for n in range(3):
        async with asyncio.timeout(2):
            response = await pool.request("GET", "/x", {}, None, 1.0)
            await asyncio.sleep(0.05)  # the whole body arrives (and pauses the socket) before it is read
            body, complete = await response.read_all(1 << 20)
        response.release()
        assert complete and len(body) == len(big) and response.header("X-Seq") == str(n)
    assert server.connections == 1
    pool.close()


async def serve_once(handler) -> tuple[asyncio.Server, URL]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")


def endless_upload(sent: list[int]):
    async def body():
        for _ in range(2000):  # 128 MB at most: far beyond what loopback buffers hold
            sent[0] += 1
            yield b"u" * 65536
    return body()


@pytest.mark.parametrize("then_close", [False, True])
async def test_an_upload_answered_early_returns_the_answer_not_a_stall(client_pool, then_close):
    # The upstream refuses the body (413) and stops reading it; the client is blocked writing. The answer
    # must end the upload: with the connection kept open, and with the upstream closing after its answer.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(65536)
        close = b"Connection: close\r\n" if then_close else b""
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n%b\r\nbig!" % close)
        if then_close:
            writer.write_eof()
            await asyncio.sleep(0.05)
            writer.transport.abort()
        else:
            await asyncio.sleep(3)
            writer.close()

    server, url = await serve_once(handler)
    pool = client_pool(url)
    sent = [0]
    async with asyncio.timeout(2):
        response = await pool.request("POST", "/x", {}, endless_upload(sent), 1.0)
        assert response.status == 413
        body, _ = await response.read_all(1024)
    response.release()
    assert body == b"big!" and sent[0] < 2000
    pool.close()
    server.close()


async def test_a_reset_cuts_a_body_delimited_by_the_close(client_pool, client_impl, raw_server):
    # A close-delimited body ends with a clean close (FIN); a reset mid-body is a broken answer.
    go = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe first half")
        await writer.drain()
        await go.wait()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # close with linger 0: a reset

    server, url = await serve_once(handler)
    pool = client_pool(url)
    async with asyncio.timeout(2):
        response = await pool.request("GET", "/x", {}, None, 1.0)
        assert await response.read() == b"the first half"
        go.set()
        if client_impl == "http1":
            with pytest.raises(http1.Disconnected):
                await response.read_all(1 << 20)
        else:  # a known weakness of the reference: aiohttp ends a body that runs to the close at a reset too
            assert await response.read_all(1 << 20) == (b"", True)
    response.release()
    pool.close()
    server.close()


async def test_a_connect_cancelled_as_it_completes_gives_its_slot_back_once(raw_server, monkeypatch):
    # Cancelled between the connection being made and create_connection returning, asyncio reports the
    # connection lost *and* the connect fails: the pool must count the slot free once, or its limit breaks.
    server, url = await raw_server([b"SLOW:" + OK % 1, b"SLOW:" + OK % 2])
    pool = http1.Pool(url, limit=1)
    made = http1._Connection.connection_made
    cancelled = []

    def cancel_as_made(self, transport):
        made(self, transport)
        if not cancelled:
            cancelled.append(True)
            victim.cancel()

    monkeypatch.setattr(http1._Connection, "connection_made", cancel_as_made)
    victim = asyncio.create_task(pool.request("GET", "/x", {}, None, 1.0))
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert cancelled
    async with asyncio.timeout(2):
        while server.open_now:  # the server sees the abandoned connection go
            await asyncio.sleep(0.005)
    # With the slot freed twice the pool would think it had room for two connections.
    results = await asyncio.gather(get(pool), get(pool))
    assert sorted(r[0].header("X-Seq") for r in results) == ["1", "2"]
    assert server.most_open == 1
    pool.close()


async def test_a_fresh_connection_at_the_limit_makes_room_by_closing_an_idle_one(raw_server):
    # The re-send after a lost keep-alive race wants a new connection; at the pool's limit it must close an
    # idle one rather than wait for a slot that only frees when another connection dies.
    server, url = await raw_server([OK % 1, OK % 2])
    pool = http1.Pool(url, limit=1)
    await get(pool)
    async with asyncio.timeout(2):
        connection, reused = await pool._acquire(1.0, fresh=True)
        assert not reused
        response = await connection.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", None, False)
    await response.read_all(1024)
    response.release()
    assert response.header("X-Seq") == "2" and server.connections == 2
    pool.close()


async def test_trailers_after_a_chunked_body_are_not_taken_for_headers(client_pool, raw_server):
    reply = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
             b"2\r\nok\r\n0\r\nX-Checksum: abc\r\n\r\n")
    _, url = await raw_server([reply])
    pool = client_pool(url)
    response, body = await get(pool)
    assert body == b"ok" and response.header("X-Checksum") is None and response.header("Trailer") == "X-Checksum"
    pool.close()


async def test_an_answer_ends_an_upload_waiting_on_a_slow_caller(client_pool):
    # The caller's next chunk is slow to come; the upstream has already refused the upload. The answer is
    # passed on at once and the caller's body is no longer read.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(65536)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await asyncio.sleep(3)
        writer.close()

    server, url = await serve_once(handler)
    pool = client_pool(url)
    closed = []

    async def body():
        try:
            yield b"a" * 1000
            await asyncio.Event().wait()  # the caller sends nothing more (bounded by the timeout below)
            yield b"never"
        finally:
            closed.append(True)

    async with asyncio.timeout(1):
        response = await pool.request("POST", "/x", {}, body(), 1.0)
        assert response.status == 413
        data, _ = await response.read_all(1024)
        response.release()
        await asyncio.sleep(0)
    assert data == b"big!" and closed == [True]
    pool.close()
    server.close()


async def test_a_refused_upload_s_answer_delimited_by_the_close_survives_the_reset_that_ends_it(client_pool):
    # The upstream answers an upload it will not read, without a length, and closes: with our bytes still
    # unread its kernel resets the connection. The answer was whole; the reset is our unread upload's doing.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(65536)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\n"
                     b"too big, sorry")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # unread bytes in its buffer: a reset, not a clean close

    server, url = await serve_once(handler)
    pool = client_pool(url)
    sent = [0]
    async with asyncio.timeout(2):
        response = await pool.request("POST", "/x", {}, endless_upload(sent), 1.0)
        await asyncio.sleep(0.2)  # the reset has arrived
        body, complete = await response.read_all(1024)
    response.release()
    assert response.status == 413 and body == b"too big, sorry" and complete
    pool.close()
    server.close()


async def test_a_fresh_connection_closed_before_any_answer(client_pool, client_impl, raw_server):
    server, url = await raw_server([b"CLOSE", OK % 2])
    pool = client_pool(url)
    if client_impl == "http1":  # only a reused connection's close may be the keep-alive race: no second send
        with pytest.raises(http1.Disconnected):
            await get(pool)
        assert len(server.requests) == 1
    else:  # aiohttp sends any idempotent request once more after a disconnect, fresh connection or not
        assert (await get(pool))[0].header("X-Seq") == "2"
        assert len(server.requests) == 2
    pool.close()
