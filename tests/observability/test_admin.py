"""Admin actions on the main port: who may use them without ADMIN_TOKEN, and that a browser on the
same host cannot be made to (a cross-site form, a DNS-rebound name)."""

from __future__ import annotations

import pytest

from tests.fakes import route_table

OPEN = "/health/integrations/circuits/fx_primary/open"


def table(url: str) -> str:
    return route_table({"fx": {"retry": "NONE", "cache": {"ttl": "1h"},
                               "upstreams": [{"name": "fx_primary", "url": url}]}})


@pytest.fixture
async def proxy(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    return await proxy_factory(table(upstream.url), clock=clock)


def own_host(proxy) -> str:
    host, port = proxy.process.addresses["main"]
    return f"{host}:{port}"


async def test_a_cross_site_form_post_cannot_open_a_breaker(proxy):
    response = await proxy.request("POST", OPEN, data=b"x", headers={
        "Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert response.status == 403
    body = await response.json()
    assert (body["error"], "another origin" in body["detail"]) == ("forbidden", True)
    assert proxy.breaker("fx_primary").state.value == "CLOSED"


async def test_a_dns_rebound_name_cannot_reload_or_purge(proxy):
    runtime = proxy.process.runtime
    for method, path in (("POST", "/health/reload"), ("DELETE", "/health/integrations/cache/fx")):
        response = await proxy.request(method, path, headers={"Host": "rebind.evil.example"})
        assert response.status == 403, path
        assert "IP address or localhost" in (await response.json())["detail"]
    assert proxy.process.runtime is runtime  # nothing was reloaded


@pytest.mark.parametrize("headers", [
    {"Host": "rebind.evil.example:8080"},
    {"Host": "localhost.evil.example"},
    {"Host": "127.0.0.1.nip.io"},
    {"Origin": "null"},                                     # a sandboxed frame or a file
    {"Origin": "http://127.0.0.1:1"},                       # another service on this host
    {"Origin": "https://evil.example", "Host": "127.0.0.1"},
], ids=lambda headers: "|".join(f"{k}={v}" for k, v in headers.items()))
async def test_what_only_a_browser_sends_is_refused(proxy, headers):
    response = await proxy.request("POST", OPEN, headers=headers)
    assert response.status == 403
    assert proxy.breaker("fx_primary").state.value == "CLOSED"


async def test_a_person_or_script_on_the_host_still_may(proxy):
    host, port = proxy.process.addresses["main"]
    for headers in ({}, {"Host": f"localhost:{port}"}, {"Host": "LOCALHOST"}, {"Host": host},
                    {"Origin": f"http://{host}:{port}"}):  # the status page's own fetches send this one
        response = await proxy.request("POST", OPEN, headers=headers)
        assert response.status == 200, headers
        assert (await proxy.request("POST", OPEN.replace("open", "reset"), headers=headers)).status == 200
    assert proxy.breaker("fx_primary").state.value == "CLOSED"


async def test_with_a_token_the_token_decides(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock, env={"ADMIN_TOKEN": "t0ken-abc"})
    assert (await proxy.request("POST", OPEN, headers={"Host": "127.0.0.1"})).status == 401
    assert (await proxy.request("POST", OPEN, headers={"Authorization": "Bearer wrong"})).status == 401
    # A browser cannot attach the token on someone else's behalf: Host and Origin do not matter then.
    opened = await proxy.request("POST", OPEN, headers={"Authorization": "Bearer t0ken-abc",
                                                        "Host": "proxy.internal", "Origin": "https://ops.example"})
    assert opened.status == 200
    assert proxy.breaker("fx_primary").state.value == "OPEN"
