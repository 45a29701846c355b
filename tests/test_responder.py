"""The aiohttp side of the one `Responder` interface (proxy/downstream/responder.py)."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.downstream.responder import AiohttpResponder
from proxy.downstream.wire import RawAnswer, json_response

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
