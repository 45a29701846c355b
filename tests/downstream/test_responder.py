"""The aiohttp side of the one `Responder` interface (proxy/downstream/responder.py) and the way in on it."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.downstream.responder import AiohttpResponder
from proxy.downstream.wire import RawAnswer, json_response
from tests.fakes import Ok
from tests.chain.test_caching import RATES, cached

WHOLE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_a_whole_answer_is_handed_to_aiohttp_as_it_is():
    responder = AiohttpResponder(make_mocked_request("GET", "/fx"))
    assert not responder.started
    raw = RawAnswer(WHOLE, 200)
    responder.send(raw)
    assert responder.started and responder.result() is raw
    assert raw.data == WHOLE and raw.keep_alive


def test_after_an_upgrade_it_does_not_switch_to_a_whole_answer_ends_the_connection():
    responder = AiohttpResponder(make_mocked_request("GET", "/fx"), close_after=True)
    responder.send(RawAnswer(WHOLE, 200))
    raw = responder.result()
    assert raw.data == b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok" and not raw.keep_alive


def test_after_an_upgrade_it_does_not_switch_to_a_response_ends_the_connection():
    responder = AiohttpResponder(make_mocked_request("GET", "/fx"), close_after=True)
    responder.send_response(json_response(200, {"ok": True}))
    assert responder.result().keep_alive is False


def test_an_upgraded_answer_keeps_its_connection():
    responder = AiohttpResponder(make_mocked_request("GET", "/events"), close_after=True)
    socket = web.WebSocketResponse()
    responder.upgraded(socket)
    assert responder.result() is socket and socket.keep_alive is not False


def test_a_handler_that_gives_no_answer_is_a_bug_not_a_hang():
    with pytest.raises(RuntimeError, match="no answer"):
        AiohttpResponder(make_mocked_request("GET", "/fx")).result()


async def test_an_aiohttp_server_of_its_own_takes_the_same_way_in(fake_upstream, proxy_factory, clock):
    """`Downstream.on_aiohttp` is the whole way in for a plain aiohttp server: stage 0, then the chain."""
    primary = await fake_upstream("primary")
    primary.default = Ok(body=RATES, headers={"Content-Type": "application/json"})
    proxy = await proxy_factory(cached(primary.url), clock=clock)
    runner = web.ServerRunner(web.Server(proxy.process.downstream.on_aiohttp), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            miss = await session.get(url + "/fx/latest/USD")
            hit = await session.get(url + "/fx/latest/USD")
            health = await session.get(url + "/health/live")
            assert (miss.headers["X-Cache"], hit.headers["X-Cache"]) == ("MISS", "HIT")
            assert await hit.read() == RATES and primary.calls == 1
            assert health.status == 200 and "X-Request-ID" in health.headers
    finally:
        await runner.cleanup()
