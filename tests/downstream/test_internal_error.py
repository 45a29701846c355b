"""A defect of ours (an exception no stage expected) still gets the caller a 500 with its request id, and
is counted in `proxy_requests_total` and logged like any answer, so an error-rate alert sees it; the
proxy goes on answering. On either front end."""

from __future__ import annotations

import pytest

from proxy import signals
from tests.fakes import Ok, metric, route_table

pytestmark = pytest.mark.http_pieces("front")

SECRET = "sk_live_do_not_log_me"


class Defect(RuntimeError):
    pass


def table(url: str) -> str:
    return route_table({"fx": {"upstreams": [{"name": "fx_primary", "url": url}]}})


async def test_an_exception_in_the_chain_is_a_counted_500_and_the_next_request_is_answered(
        fake_upstream, proxy_factory, clock, log_lines):
    upstream = await fake_upstream()
    upstream.default = Ok(body=b'{"rate": 1.1}')
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    runtime = proxy.process.runtime
    working = runtime.chain

    async def broken(exchange):
        raise Defect("a stage's bug")

    runtime.chain = broken
    seen: list = []
    proxy.process.bus.subscribe(seen.append)
    response = await proxy.get("/fx/latest/USD", headers={"Authorization": f"Bearer {SECRET}"})
    body = await response.json()
    assert response.status == 500
    assert body == {"error": "internal_error", "request_id": response.headers["X-Request-ID"]}
    assert response.headers["X-Cache"] == "MISS"
    proxy.process.bus.deliver_waiting()
    finished = [e for e in seen if isinstance(e, signals.RequestFinished)]
    assert [(e.service, e.status, e.request_id) for e in finished] == [("fx", 500, body["request_id"])]
    assert not [e for e in seen if isinstance(e, signals.RequestRefused)]  # told once, not twice
    assert await metric(proxy, "proxy_requests_total", service="fx", route="/fx", code="500", cache="miss") == 1
    lines = log_lines()
    errors = [line for line in lines if line["event"] == "unhandled error while proxying"]
    assert len(errors) == 1 and "Defect" in errors[0]["exception"]
    assert [line["status"] for line in lines if line["event"] == "request"] == [500]
    assert SECRET not in "".join(str(line) for line in lines)

    runtime.chain = working
    after = await proxy.get("/fx/latest/USD")
    assert (after.status, await after.read()) == (200, b'{"rate": 1.1}')
    assert upstream.calls == 1  # only the request after the defect reached the upstream


async def test_an_exception_before_any_route_took_the_request_is_a_counted_500(fake_upstream, proxy_factory,
                                                                               clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)

    def broken(raw_path):
        raise Defect("the resolver's bug")

    proxy.process.runtime.resolve = broken
    seen: list = []
    proxy.process.bus.subscribe(seen.append)
    response = await proxy.get("/fx/latest/USD")
    body = await response.json()
    assert response.status == 500 and body["error"] == "internal_error"
    assert response.headers["X-Cache"] == "BYPASS"
    proxy.process.bus.deliver_waiting()
    refused = [e for e in seen if isinstance(e, signals.RequestRefused)]
    assert [(e.status, e.error, e.service, e.request_id) for e in refused] == [
        (500, "internal_error", None, body["request_id"])]
    assert await metric(proxy, "proxy_requests_total", service="none", route="none", code="500", cache="bypass") == 1
    assert upstream.calls == 0
