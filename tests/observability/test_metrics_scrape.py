"""What a Prometheus server scraping the metrics port sees: build and process facts, no `_created`,
sub-millisecond request buckets, refusals counted with bounded labels, and the optional prefix."""

from __future__ import annotations

import platform

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

import proxy as proxy_package
from proxy.config.parse import ConfigError, load_config, parse_config
from proxy.ops.process import ProxyProcess
from tests.fakes import Ok, RunningProxy, route_table

FX_ROUTES = [{"match": "/fx/latest/{base}", "name": "latest"}]


def table(upstream_url: str, **top: object) -> str:
    return route_table({"fx": {"retry": "NONE", "cache": {"ttl": "1h"}, "routes": FX_ROUTES,
                               "upstreams": [{"name": "fx_primary", "url": upstream_url}]}}, **top)


async def scrape(proxy) -> str:
    response = await proxy.client.get(proxy.metrics_url + "/metrics")
    assert response.status == 200
    return await response.text()


def families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(text: str, name: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


async def test_a_scrape_shows_build_info_and_the_sidecar_s_own_process(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    text = await scrape(proxy)
    [build] = samples(text, "build_info")
    assert build.value == 1
    assert build.labels == {"version": proxy_package.__version__, "python": platform.python_version(),
                            "aiohttp": aiohttp.__version__}
    # The process collector: the sidecar's own memory and CPU, read from /proc.
    [rss] = samples(text, "process_resident_memory_bytes")
    assert rss.value > 1024 * 1024
    assert samples(text, "process_cpu_seconds_total")[0].value > 0
    assert samples(text, "process_open_fds")[0].value > 0
    [python] = samples(text, "python_info")
    assert python.labels["version"] == platform.python_version()
    assert samples(text, "python_gc_collections_total")


async def test_no_created_series_only_counts_and_buckets(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    await proxy.get("/fx/latest/USD")
    text = await scrape(proxy)
    assert "_created" not in text
    # The series that would have had one are still there.
    assert samples(text, "proxy_requests_total") and samples(text, "proxy_request_duration_seconds_count")
    # The registry itself still has them (tests and other readers of the registry are unaffected).
    assert proxy.process.metrics.registry.get_sample_value(
        "proxy_request_duration_seconds_created", {"service": "fx"}) is not None


async def test_a_hit_lands_in_a_sub_millisecond_bucket(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    upstream.default = Ok(body=b'{"rates": {}}', headers={"Content-Type": "application/json"})
    proxy = await proxy_factory(table(upstream.url), clock=clock)  # a FakeClock: a HIT takes 0 s on it
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    text = await scrape(proxy)
    buckets = {float(s.labels["le"]): s.value for s in samples(text, "proxy_request_duration_seconds_bucket")
               if s.labels["service"] == "fx"}
    below_1ms = sorted(le for le in buckets if le < 0.001)
    assert below_1ms == [0.0001, 0.00025, 0.0005]
    assert buckets[0.0001] == 2  # both answers took no time on the fake clock: the first bucket holds them
    assert upstream.calls == 1


async def test_refusals_are_counted_with_bounded_labels(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    small_bodies = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "max_request_body": "1KiB"}
    proxy = await proxy_factory(table(upstream.url, server=small_bodies), clock=clock)
    for n in range(5):
        assert (await proxy.get(f"/nowhere-{n}/secret-{n}")).status == 404  # no service takes it
    bad = await proxy.client.get(URL(proxy.url + "/fx/%2e%2e/%2e%2e/etc", encoded=True))  # escapes the base path
    assert bad.status == 400 and (await bad.json())["error"] == "bad_request"
    too_big = await proxy.request("POST", "/fx/latest/USD", data=b"x" * 2048)
    assert too_big.status == 413
    too_big.close()
    assert (await proxy.get("/fx/latest/USD")).status == 200
    text = await scrape(proxy)
    counted = {(s.labels["service"], s.labels["route"], s.labels["code"], s.labels["cache"]): s.value
               for s in samples(text, "proxy_requests_total")}
    assert counted == {("none", "none", "404", "bypass"): 5, ("none", "none", "400", "bypass"): 1,
                       ("fx", "none", "413", "bypass"): 1, ("fx", "latest", "200", "miss"): 1}
    assert "nowhere" not in text and "secret" not in text and "etc" not in text
    assert upstream.calls == 1  # none of the refusals reached it


async def test_a_prefix_is_put_on_every_metric_name(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url, metrics={"prefix": "team_a"}), clock=clock)
    await proxy.get("/fx/latest/USD")
    await proxy.get("/nowhere")
    text = await scrape(proxy)
    found = families(text)
    assert found and all(name.startswith("team_a_") for name in found), sorted(found)
    names = {s.name for family in found.values() for s in family.samples}
    assert all(name.startswith("team_a_") for name in names)
    for wanted in ("team_a_build_info", "team_a_process_resident_memory_bytes", "team_a_proxy_requests_total",
                   "team_a_cache_hit_rate", "team_a_circuit_breaker_open",
                   "team_a_proxy_request_duration_seconds_bucket"):
        assert wanted in names, wanted
    assert "_created" not in text
    # A reload may change it: the next scrape says the new names.
    proxy.process.metrics.exposition.prefix = ""
    assert "proxy_requests" in families(await scrape(proxy))  # a counter's family name has no _total


async def test_the_prefix_follows_a_reload(fake_upstream, proxy_factory, clock, tmp_path):
    upstream = await fake_upstream()
    path = tmp_path / "routes.yaml"
    path.write_text(table(upstream.url))
    process = ProxyProcess(load_config(path, {}), clock=clock, env={})
    await process.start()
    client = aiohttp.ClientSession()
    running = RunningProxy(process, client)
    try:
        assert "build_info" in families(await scrape(running))
        path.write_text(table(upstream.url, metrics={"prefix": "shared"}))
        assert await process.reload("admin") == []
        assert "shared_build_info" in families(await scrape(running))
    finally:
        await client.close()
        await process.stop()


@pytest.mark.parametrize("prefix, why", [
    ("9lives", "starts with a digit"),
    ("team-a", "a dash is not allowed in a metric name"),
    ("", "empty"),
    (["a"], "not a string"),
])
def test_a_bad_prefix_is_refused_with_its_line(prefix, why):
    text = table("http://127.0.0.1:1", metrics={"prefix": prefix})
    if prefix == "":
        assert parse_config(text, "routes.yaml", {}).metrics.prefix == ""  # empty means none
        return
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "routes.yaml", {})
    assert "metrics.prefix" in str(caught.value), why


def test_unknown_metrics_keys_are_refused():
    with pytest.raises(ConfigError) as caught:
        parse_config(table("http://127.0.0.1:1", metrics={"prefx": "a"}), "routes.yaml", {})
    assert "metrics: unknown key 'prefx'" in str(caught.value)
