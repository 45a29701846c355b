"""An upstream whose host name does not exist is not retried: the request moves on at once,
and the attempt says "no such host" (a transient resolver failure is not called that).

The host names are under `.invalid` (RFC 6761): the local resolver answers "no such host" without
asking anyone. Where it cannot say so here (no resolver, or a transient failure), the tests skip.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.fakes import route_table

UNKNOWN = "http://upstream-that-does-not-exist.invalid"
# Three retries with a short backoff, each upstream's retries before the next upstream (the seed's
# order), so a retried attempt would show up before the secondary is asked.
RETRYING = {"retries": 3, "base_delay": "10ms", "max_delay": "20ms"}


@pytest.fixture(autouse=True)
async def resolver_says_no_such_host() -> None:
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.getaddrinfo("upstream-that-does-not-exist.invalid", 80), 10)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return
        pytest.skip(f"the local resolver gives no 'no such host' answer for .invalid names: {exc}")
    except TimeoutError:
        pytest.skip("the local resolver did not answer within 10 s")
    pytest.skip("the local resolver resolves .invalid names")


def table(primary: str, secondary: str | None, **service: object) -> str:
    upstreams = [{"name": "fx_primary", "url": primary}]
    if secondary is not None:
        upstreams.append({"name": "fx_secondary", "url": secondary})
    settings = {"retry": RETRYING, "timeout": "2s", "deadline": "10s", "fallback_before_retry": False}
    return route_table({"fx": {**settings, **service, "upstreams": upstreams}})


async def retries_of(proxy, provider: str) -> float:
    metrics = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
    line = f'retries_total{{provider="{provider}",service="fx"}} '
    found = [float(row[len(line):]) for row in metrics.splitlines() if row.startswith(line)]
    return found[0] if found else 0.0


async def test_an_unknown_host_is_tried_once_then_the_next_upstream_answers(fake_upstream, proxy_factory):
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(table(UNKNOWN, secondary.url))
    response = await proxy.get("/fx/latest/USD")
    assert response.status == 200
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert secondary.calls == 1
    assert await retries_of(proxy, "fx_primary") == 0, "a host that does not exist was retried"


async def test_the_error_names_the_unknown_host_as_the_reason(proxy_factory):
    proxy = await proxy_factory(table(UNKNOWN, None))
    response = await proxy.get("/fx/latest/USD")
    body = await response.json()
    assert response.status == 502
    (attempt,) = body["attempts"]
    assert (attempt["upstream"], attempt["outcome"]) == ("fx_primary", "connect_error")
    assert attempt["detail"].startswith("no such host:"), attempt
    assert await retries_of(proxy, "fx_primary") == 0


async def test_a_post_moves_to_the_next_upstream_when_the_first_host_does_not_exist(fake_upstream, proxy_factory):
    """No connection was made, so the upstream certainly never saw the request."""
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(table(UNKNOWN, secondary.url))
    response = await proxy.client.post(proxy.url + "/fx/orders", data=b'{"amount": 1}')
    assert response.status == 200
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert secondary.calls == 1
