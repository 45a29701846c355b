"""Every refusal on the proxy port is told exactly once (`RequestRefused`), on either front end, with the
caller's trace: CONNECT, an absolute-form target, an unsafe target (400), no route (404), headers too
large (431), a body too large by its Content-Length or as it is read (413)."""

from __future__ import annotations

import pytest

from proxy import signals
from tests.fakes import route_table
from tests.downstream.test_front import Client

pytestmark = pytest.mark.http_pieces("front")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"traceparent: 00-{TRACE_ID}-00f067aa0ba902b7-01\r\n".encode()

# (request bytes before the headers' end, status, error, service the event names)
REFUSALS = {
    "connect": (b"CONNECT vendor.example:443 HTTP/1.1\r\nHost: vendor.example:443\r\n", 400, "bad_request", None),
    "absolute_form": (b"GET http://vendor.example/fx/a HTTP/1.1\r\nHost: vendor.example\r\n", 400, "bad_request", None),
    "unsafe_target": (b"GET /fx/%2e%2e/%2e%2e/etc HTTP/1.1\r\nHost: proxy\r\n", 400, "bad_request", None),
    "no_route": (b"GET /nowhere/at-all HTTP/1.1\r\nHost: proxy\r\n", 404, "no_route", None),
    "headers_too_large": (b"GET /fx/a HTTP/1.1\r\nHost: proxy\r\nX-Padding: " + b"p" * 2048 + b"\r\n",
                          431, "request_headers_too_large", None),
    "declared_body_too_large": (b"POST /fx/a HTTP/1.1\r\nHost: proxy\r\nContent-Length: 2048\r\n",
                                413, "request_body_too_large", "fx"),
    "read_body_too_large": (b"POST /fx/a HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n",
                            413, "request_body_too_large", "fx"),
}
BODIES = {"declared_body_too_large": b"x" * 2048,
          "read_body_too_large": b"800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n"}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_each_refusal_is_told_once_with_the_caller_s_trace(case, fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    server = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "max_request_body": "1KiB",
              "max_header_bytes": "1KiB"}
    proxy = await proxy_factory(route_table({"fx": {"upstreams": [{"name": "fx_primary", "url": upstream.url}]}},
                                            server=server), clock=clock)
    seen: list = []
    proxy.process.bus.subscribe(seen.append)
    head, status, error, service = REFUSALS[case]
    client = await Client.open(proxy)
    try:
        client.send(head + TRACEPARENT + b"\r\n" + BODIES.get(case, b""))
        answer = await client.answer()
    finally:
        client.close()
    assert answer.status == status and answer.header("X-Cache") == "BYPASS"
    proxy.process.bus.deliver_waiting()
    refused = [e for e in seen if isinstance(e, signals.RequestRefused)]
    assert [(e.status, e.error, e.service) for e in refused] == [(status, error, service)]
    assert refused[0].trace.trace_id == TRACE_ID and refused[0].request_id == answer.header("X-Request-ID")
    assert not [e for e in seen if isinstance(e, signals.RequestFinished)]
    assert upstream.calls == 0
