"""What operators see: metrics moving during an outage, health JSON shapes, stats windows, logs without secrets."""

from __future__ import annotations

import io
import re

import orjson
import pytest
import structlog

from proxy.observability import logs
from tests.fakes import Fail, Ok, metric_samples, route_table

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def outage_table(primary: str, secondary: str) -> str:
    return route_table({"fx": {
        "breaker": "FAST", "retry": "NONE", "timeout": "500ms", "deadline": "2s",
        "cache": {"ttl": "1h", "stale": "7d"},
        "routes": [{"match": "/fx/latest/{base}"}],
        "upstreams": [{"name": "fx_primary", "url": primary}, {"name": "fx_secondary", "url": secondary}]}})


def value(text: str, name: str, **labels: str) -> float:
    return metric_samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples whose labels include these (the others, e.g. route and cache, summed over)."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in metric_samples(text).items() if n == name and wanted <= set(got))


async def test_metrics_move_as_an_outage_unfolds_on_both_endpoints(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(outage_table(primary.url, secondary.url), clock=clock)
    scrape = lambda: proxy.client.get(proxy.metrics_url + "/metrics")  # noqa: E731
    before = await (await scrape()).text()
    assert value(before, "circuit_breaker_open", service="fx", provider="fx_primary") == 0
    await proxy.get("/fx/latest/USD")                       # MISS, stored
    primary.default = Fail(500)
    for base in ("EUR", "JPY", "GBP"):                       # primary fails 3x → FAST breaker opens
        assert (await proxy.get(f"/fx/latest/{base}")).headers["X-Upstream"] == "fx_secondary"
    during = await (await scrape()).text()
    assert value(during, "external_request_errors_total", service="fx", provider="fx_primary", reason="http_5xx") == 3
    assert value(during, "external_requests_total", service="fx", provider="fx_primary", outcome="success") == 1
    assert value(during, "circuit_breaker_open", service="fx", provider="fx_primary") == 1
    assert value(during, "fallbacks_total", service="fx", provider="fx_secondary") == 3
    assert total(during, "proxy_requests_total", service="fx", code="200") == 4
    secondary.default = Fail(503)
    clock.advance(7200)
    stale = await proxy.get("/fx/latest/USD")
    assert stale.headers["X-Cache"] == "STALE"
    after = await (await scrape()).text()
    assert value(after, "stale_served_total", service="fx", reason="error") == 1
    assert value(after, "cache_requests_total", service="fx", result="stale") == 1
    assert value(after, "cache_requests_total", service="fx", result="miss") == 4
    health_metrics = await (await proxy.get("/health/metrics")).text()
    assert value(health_metrics, "stale_served_total", service="fx", reason="error") == 1
    assert {k[0] for k in metric_samples(health_metrics)} == {k[0] for k in metric_samples(after)}


async def test_label_values_never_come_from_request_paths(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    proxy = await proxy_factory(route_table({"fx": {"retry": "NONE", "upstreams": [
        {"name": "fx_primary", "url": primary.url}]}}), clock=clock)
    for n in range(30):
        await proxy.get(f"/fx/unique-path-{n}?q={n}")
    text = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
    assert "unique-path" not in text
    label_values = {v for (_, labels) in metric_samples(text) for _, v in labels}
    # "/fx" is the service's prefix from the route table (the `route` of a service without named routes),
    # "CPython" is python_info's; the numbers include build_info's versions.
    assert label_values <= {"fx", "/fx", "fx_primary", "success", "200", "bypass", "miss", "CLOSED", "OPEN",
                            "HALF_OPEN", "redis", "memory", "ok", "error", "+Inf", "CPython"} | \
        {v for v in label_values if re.match(r"^[\d.e+-]+$", v)}


async def test_health_json_has_the_seed_shape_and_tracks_breaker_states(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(outage_table(primary.url, secondary.url), clock=clock)
    healthy = await (await proxy.get("/health")).json()
    assert healthy["status"] == "healthy"
    assert ISO_MS.match(healthy["timestamp"])
    assert healthy["services"]["fx"] == {"service": "fx", "overall": "HEALTHY", "providers": [
        {"providerName": "fx_primary", "status": "HEALTHY", "circuitState": "CLOSED", "isHealthy": True},
        {"providerName": "fx_secondary", "status": "HEALTHY", "circuitState": "CLOSED", "isHealthy": True}]}
    proxy.breaker("fx_primary").force_open()
    one_down = await (await proxy.get("/health")).json()
    assert one_down["status"] == "degraded"
    assert one_down["services"]["fx"]["overall"] == "DEGRADED"
    assert one_down["services"]["fx"]["providers"][0] == {
        "providerName": "fx_primary", "status": "DOWN", "circuitState": "OPEN", "isHealthy": False}
    proxy.breaker("fx_secondary").force_open()
    all_down = await proxy.get("/health")
    assert all_down.status == 200  # /health answers while the process serves
    body = await all_down.json()
    assert body["status"] == "unhealthy" and body["services"]["fx"]["overall"] == "DOWN"
    integrations = await (await proxy.get("/health/integrations")).json()
    assert integrations["services"] == body["services"]


async def test_a_provider_with_a_high_recent_error_rate_is_degraded(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(500), Ok(), Fail(500))
    proxy = await proxy_factory(outage_table(primary.url, secondary.url).replace("FAST", "CRITICAL"), clock=clock)
    for base in ("A", "B", "C"):
        await proxy.get(f"/fx/latest/{base}")
    provider = (await (await proxy.get("/health")).json())["services"]["fx"]["providers"][0]
    assert provider["circuitState"] == "CLOSED"
    assert provider["status"] == "DEGRADED" and provider["isHealthy"] is False
    clock.advance(6 * 60)  # the errors age out of the 5-minute window
    provider = (await (await proxy.get("/health")).json())["services"]["fx"]["providers"][0]
    assert provider["status"] == "HEALTHY"


async def test_liveness_and_readiness_never_depend_on_upstreams_or_redis(proxy_factory, clock):
    from tests.fakes import refused_port

    dead = f"http://127.0.0.1:{refused_port()}"
    text = route_table({"fx": {"upstreams": [{"name": "p", "url": dead}]}},
                       cache={"backend": "redis", "url": f"redis://127.0.0.1:{refused_port()}/0"})
    proxy = await proxy_factory(text, clock=clock)
    proxy.breaker("p").force_open()
    live = await proxy.get("/health/live")
    ready = await proxy.get("/health/ready")
    assert live.status == 200 and (await live.json())["status"] == "alive"
    assert ready.status == 200 and (await ready.json())["status"] == "ready"
    cache = await (await proxy.get("/health/integrations/cache")).json()
    assert cache["backend"] == "redis" and cache["connected"] is False


@pytest.mark.parametrize("minutes", ["0", "1441", "abc", "-5", "1.5", ""])
async def test_stats_minutes_outside_1_to_1440_is_400(proxy_factory, fake_upstream, clock, minutes):
    primary = await fake_upstream()
    proxy = await proxy_factory(route_table({"fx": {"upstreams": [{"name": "p", "url": primary.url}]}}), clock=clock)
    response = await proxy.get(f"/health/integrations/stats?minutes={minutes}")
    assert response.status == 400
    assert "1 to 1440" in (await response.json())["detail"]


async def test_stats_window_counts_requests_errors_and_latency_per_provider(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(500), Fail(500))
    proxy = await proxy_factory(outage_table(primary.url, secondary.url).replace("FAST", "CRITICAL"), clock=clock)
    for base in ("A", "B", "C", "D"):
        await proxy.get(f"/fx/latest/{base}")
    await proxy.get("/fx/latest/A")  # a HIT
    stats = await (await proxy.get("/health/integrations/stats?minutes=60")).json()
    assert stats["minutes"] == 60
    p = stats["providers"]["fx_primary"]
    assert (p["requests"], p["errors"], p["errorRate"]) == (4, 2, 0.5)
    assert p["p50"] is not None and p["p99"] >= p["p50"]
    assert stats["providers"]["fx_secondary"]["requests"] == 2
    assert stats["services"]["fx"]["cacheHitRate"] == pytest.approx(20.0)
    clock.advance(2 * 3600)
    later = await (await proxy.get("/health/integrations/stats?minutes=60")).json()
    assert later["providers"]["fx_primary"]["requests"] == 0


async def test_circuits_and_cache_endpoints_shapes(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(outage_table(primary.url, secondary.url), clock=clock)
    await proxy.get("/fx/latest/USD")
    await proxy.get("/fx/latest/USD")
    proxy.breaker("fx_primary").force_open()
    circuits = (await (await proxy.get("/health/integrations/circuits")).json())["circuits"]
    assert [c["provider"] for c in circuits] == ["fx_primary", "fx_secondary"]
    first = circuits[0]
    assert {"provider", "service", "state", "failures", "openedAt", "retryAt"} <= set(first)
    assert first["service"] == "fx" and first["state"] == "OPEN" and ISO_MS.match(first["openedAt"])
    cache = await (await proxy.get("/health/integrations/cache")).json()
    assert cache["backend"] == "memory" and cache["connected"] is True and cache["entries"] == 1
    assert cache["hitRate"]["fx"] == pytest.approx(50.0)


async def test_log_lines_per_request_and_attempt_and_no_secret_anywhere(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)
    secrets = {"FX_PRIMARY_API_KEY": "pk-LIVE-7f3a9c2e", "FX_SECONDARY_API_KEY": "sk-LIVE-51b0d4aa",
               "ADMIN_TOKEN": "adm-LIVE-0c1d2e3f"}
    text = route_table({"fx": {"retry": "NONE", "breaker": "FAST",
                               "routes": [{"match": "/fx/latest/{base}"}],
                               "upstreams": [
                                   {"name": "fx_primary", "url": primary.url, "path": "/v6/latest/{base}",
                                    "headers": {"Authorization": "Bearer ${FX_PRIMARY_API_KEY}"}},
                                   {"name": "fx_secondary", "url": secondary.url,
                                    "query": {"access_key": "${FX_SECONDARY_API_KEY}"}}]}})
    buffer = io.StringIO()
    logs.configure("debug", "json", stream=buffer)
    try:
        proxy = await proxy_factory(text, clock=clock, env=secrets)
        caller_secret = "caller-cookie-3b9f"
        for _ in range(3):
            await proxy.get("/fx/latest/USD?symbols=KRW", headers={"Cookie": f"sid={caller_secret}",
                                                                    "X-Request-ID": "trace-1"})
        await proxy.request("POST", "/health/integrations/circuits/fx_primary/reset",
                            headers={"Authorization": f"Bearer {secrets['ADMIN_TOKEN']}"})
    finally:
        structlog.reset_defaults()
    output = buffer.getvalue()
    lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]
    for secret in [*secrets.values(), caller_secret]:
        assert secret not in output, secret
    requests = [line for line in lines if line.get("kind") == "request"]
    assert len(requests) == 3
    first = requests[0]
    assert first["service"] == "fx" and first["route"] == "/fx/latest/{base}" and first["method"] == "GET"
    assert first["path"] == "/fx/latest/USD" and first["status"] == 200 and first["x_cache"] == "BYPASS"
    assert first["upstream"] == "fx_secondary" and first["request_id"] == "trace-1"
    assert first["attempts"] == [{"upstream": "fx_primary", "outcome": "http_5xx"},
                                 {"upstream": "fx_secondary", "outcome": "success"}]
    assert isinstance(first["duration_ms"], float)
    attempts = [line for line in lines if line.get("kind") == "attempt"]
    assert {a["provider"] for a in attempts} == {"fx_primary", "fx_secondary"}
    secondary_urls = [a["url"] for a in attempts if a["provider"] == "fx_secondary"]
    assert secondary_urls and all("access_key=***" in url for url in secondary_urls)
    assert all(line["request_id"] == "trace-1" for line in attempts)
    assert any(line["event"].startswith("Circuit breaker: OPENED for fx_primary") for line in lines)
    assert all("timestamp" in line and "level" in line for line in lines)


async def test_a_scrape_and_a_health_read_count_requests_the_bus_still_holds(fake_upstream, proxy_factory, clock,
                                                                            monkeypatch):
    from proxy import signals

    monkeypatch.setattr(signals, "PER_REQUEST_HOLD", 3600.0)  # held for the whole test unless a read delivers
    upstream = await fake_upstream("primary")
    proxy = await proxy_factory(route_table({"fx": {"retry": "NONE", "upstreams": [
        {"name": "fx_primary", "url": upstream.url}]}}), clock=clock)
    assert (await proxy.get("/fx/a")).status == 200
    assert proxy.process.stats.window(1)["services"].get("fx", {}).get("requests", 0) == 0  # still held
    scraped = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
    assert total(scraped, "proxy_requests_total", service="fx", code="200") == 1
    assert value(scraped, "external_requests_total", service="fx", provider="fx_primary", outcome="success") == 1
    assert (await proxy.get("/fx/b")).status == 200
    stats = await (await proxy.get("/health/integrations/stats?minutes=1")).json()
    assert stats["services"]["fx"]["requests"] == 2
    assert stats["providers"]["fx_primary"]["requests"] == 2
