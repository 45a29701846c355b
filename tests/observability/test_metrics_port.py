"""The metrics port answers the two Kubernetes probes as the main port does, and nothing else of /health."""

from __future__ import annotations

import pytest

from tests.fakes import route_table

TABLE = route_table({"fx": {"upstreams": [{"name": "fx_primary", "url": "http://127.0.0.1:1"}]}})


async def answer(proxy, base: str, path: str, method: str = "GET") -> tuple[int, object]:
    async with proxy.client.request(method, base + path) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


@pytest.mark.parametrize("path", ["/health/live", "/health/ready"])
async def test_each_probe_answers_on_the_metrics_port_as_on_the_main_port(proxy_factory, path):
    proxy = await proxy_factory(TABLE)
    on_metrics = await answer(proxy, proxy.metrics_url, path)
    assert on_metrics[0] == 200
    assert on_metrics == await answer(proxy, proxy.url, path)


async def test_a_proxy_that_is_not_ready_says_so_on_both_ports(proxy_factory):
    proxy = await proxy_factory(TABLE)
    proxy.process.ready = False  # what start() has not reached yet and stop() sets first
    main = await answer(proxy, proxy.url, "/health/ready")
    metrics = await answer(proxy, proxy.metrics_url, "/health/ready")
    assert metrics == main == (503, {"status": "starting"})
    assert (await answer(proxy, proxy.metrics_url, "/health/live"))[0] == 200, "alive while not ready"


@pytest.mark.parametrize("path", ["/health", "/health/integrations", "/health/ui", "/health/integrations/circuits"])
async def test_the_rest_of_health_stays_on_the_main_port(proxy_factory, path):
    proxy = await proxy_factory(TABLE)
    assert (await answer(proxy, proxy.metrics_url, path))[0] == 404
    assert (await answer(proxy, proxy.url, path))[0] == 200


async def test_probes_on_the_metrics_port_take_only_reads(proxy_factory):
    proxy = await proxy_factory(TABLE)
    async with proxy.client.post(proxy.metrics_url + "/health/ready") as response:
        assert response.status == 405 and response.headers["Allow"] == "GET, HEAD"
    async with proxy.client.head(proxy.metrics_url + "/health/live") as response:
        assert response.status == 200


async def test_metrics_still_answer_beside_the_probes(proxy_factory):
    proxy = await proxy_factory(TABLE)
    status, body = await answer(proxy, proxy.metrics_url, "/metrics")
    assert status == 200 and 'circuit_breaker_open{provider="fx_primary",service="fx"} 0.0' in body
