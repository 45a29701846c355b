"""What the status page adds to HAProxy's and Envoy's usual figures: version, uptime, route-table hash
and last reload, connections and requests in flight per upstream, answers by status class, time since
each breaker's last change, rate-limit tokens and key rests; as JSON and drawn by headless Chromium."""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import re

import aiohttp
import orjson
import pytest
from aiohttp import web

import proxy as proxy_package
from proxy.config.parse import load_config
from proxy.ops.process import ProxyProcess
from tests.fakes import Fail, RunningProxy, route_table
from tests.observability.test_status_page import PAGE, StatusDom, chromium, console_problems, run_chromium  # noqa: F401

QUOTA = Fail(429, headers={"Retry-After": "120"}, body=b'{"error": "quota exceeded"}')


def routes(primary: str, secondary: str) -> str:
    return route_table({"fx": {
        "retry": "NONE", "breaker": "FAST", "cache": {"ttl": "0s"},
        "upstreams": [
            {"name": "fx_primary", "url": primary, "query": {"access_key": "{key}"}, "keys": ["key-one-1111", "key-two-2222"],
             "rate_limit": {"rate": 5, "per": "1s", "burst": 10}},
            {"name": "fx_secondary", "url": secondary}]}})


class Gate:
    """An upstream that holds each request until `release()`: requests in flight, without a timer."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "Gate":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        self.waiting += 1
        await self.open.wait()
        return web.Response(body=b'{"from": "gate"}', content_type="application/json")

    async def stop(self) -> None:
        self.open.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def scene(fake_upstream, clock, tmp_path):
    """A proxy from a routes.yaml file (so it has a hash and reloads) after a mixed run of traffic."""
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    path = tmp_path / "routes.yaml"
    path.write_text(routes(primary.url, secondary.url))
    process = ProxyProcess(load_config(path, {}), clock=clock, env={})
    await process.start()
    running = RunningProxy(process, aiohttp.ClientSession())
    primary.script(QUOTA)  # the first key is refused: the second answers
    assert (await running.get("/fx/a")).headers["X-Upstream"] == "fx_primary"
    primary.script(Fail(404))
    assert (await running.get("/fx/b")).status == 404
    primary.default = Fail(503)
    for name in ("c", "d", "e"):  # three failures open the FAST breaker; the secondary answers each
        assert (await running.get(f"/fx/{name}")).headers["X-Upstream"] == "fx_secondary"
    assert running.breaker("fx_primary").state.value == "OPEN"
    try:
        yield running, path, primary, secondary
    finally:
        await running.client.close()
        await process.stop()


async def read(proxy, path: str) -> dict:
    answer = await proxy.get(path)
    assert answer.status == 200
    return await answer.json()


def by_provider(circuits: dict) -> dict:
    return {c["provider"]: c for c in circuits["circuits"]}


async def test_the_circuits_json_has_pool_in_flight_tokens_keys_and_time_since_change(scene, clock):
    proxy, _, primary, secondary = scene
    circuits = by_provider(await read(proxy, "/health/integrations/circuits"))
    first, second = circuits["fx_primary"], circuits["fx_secondary"]
    assert first["changedAt"] == first["openedAt"] and first["sinceChangeSeconds"] == 0
    # Six attempts took six of the ten tokens; the fake clock has not moved, so none came back.
    assert first["rateLimit"] == {"tokens": 4.0, "burst": 10, "perSecond": 5.0, "shared": False}
    assert second["rateLimit"] is None
    assert [k["spent"] for k in first["keys"]] == [True, False]
    assert first["keys"][0]["spentUntil"] == "2024-12-01T08:02:00.000Z"
    assert first["pool"] == {"open": 1, "idle": 1, "busy": 0, "waiting": 0, "limit": 256} and first["inFlight"] == 0
    assert primary.calls == 6 and secondary.calls == 3
    clock.advance(10)
    later = by_provider(await read(proxy, "/health/integrations/circuits"))
    assert later["fx_primary"]["sinceChangeSeconds"] == 10
    assert later["fx_secondary"]["sinceChangeSeconds"] == 10  # never changed: since it started
    assert later["fx_primary"]["rateLimit"]["tokens"] == 10.0  # refilled at 5 a second, up to the burst


async def test_answers_are_counted_by_status_class_per_upstream(scene):
    proxy, *_ = scene
    stats = await read(proxy, "/health/integrations/stats?minutes=60")
    assert stats["providers"]["fx_primary"]["responses"] == {"2xx": 1, "3xx": 0, "4xx": 2, "5xx": 3, "none": 0}
    assert stats["providers"]["fx_secondary"]["responses"] == {"2xx": 3, "3xx": 0, "4xx": 0, "5xx": 0, "none": 0}


async def test_requests_in_flight_show_as_busy_connections(fake_upstream, proxy_factory, clock):
    gate = await Gate().start()
    try:
        proxy = await proxy_factory(route_table({"fx": {"retry": "NONE", "timeout": "30s", "deadline": "30s",
                                                        "upstreams": [{"name": "fx_gate", "url": gate.url}]}}),
                                    clock=clock)
        held = [asyncio.ensure_future(proxy.get(f"/fx/{n}")) for n in range(3)]
        for _ in range(500):  # a hang guard: the three requests reach the gate within a few loop turns
            if gate.waiting == 3:
                break
            await asyncio.sleep(0.01)
        assert gate.waiting == 3
        [circuit] = (await read(proxy, "/health/integrations/circuits"))["circuits"]
        assert circuit["inFlight"] == 3
        assert circuit["pool"]["busy"] == 3 and circuit["pool"]["open"] == 3
        gate.open.set()
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200, 200]
        [after] = (await read(proxy, "/health/integrations/circuits"))["circuits"]
        assert after["inFlight"] == 0 and after["pool"]["idle"] == 3
    finally:
        await gate.stop()


@pytest.mark.parametrize("pieces", [("lean", "aiohttp")], indirect=True, ids=["client=aiohttp"])
async def test_with_aiohttp_s_client_requests_in_flight_are_counted_and_connections_unknown(fake_upstream, proxy_factory,
                                                                                          clock, pieces):
    gate = await Gate().start()
    try:
        proxy = await proxy_factory(route_table({"fx": {"retry": "NONE", "timeout": "30s", "deadline": "30s",
                                                        "upstreams": [{"name": "fx_gate", "url": gate.url}]}}),
                                    clock=clock)
        [before] = (await read(proxy, "/health/integrations/circuits"))["circuits"]
        # aiohttp's connector keeps its connection counts to itself: shown as unknown, never as a made-up 0.
        unknown = {"open": None, "idle": None, "busy": None, "waiting": None, "limit": 256}
        assert before["pool"] == unknown and before["inFlight"] == 0
        held = [asyncio.ensure_future(proxy.get(f"/fx/{n}")) for n in range(3)]
        for _ in range(500):  # a hang guard: the three requests reach the gate within a few loop turns
            if gate.waiting == 3:
                break
            await asyncio.sleep(0.01)
        assert gate.waiting == 3
        [circuit] = (await read(proxy, "/health/integrations/circuits"))["circuits"]
        assert circuit["inFlight"] == 3 and circuit["pool"] == unknown
        gate.open.set()
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200, 200]
        [after] = (await read(proxy, "/health/integrations/circuits"))["circuits"]
        assert after["inFlight"] == 0
    finally:
        await gate.stop()


async def test_the_proxy_json_has_version_uptime_hash_and_last_reload(scene, clock):
    proxy, path, *_ = scene
    about = await read(proxy, "/health/integrations/proxy")
    assert about["version"] == proxy_package.__version__ and about["python"] == platform.python_version()
    assert about["aiohttp"] == aiohttp.__version__
    assert about["startedAt"] == "2024-12-01T08:00:00.000Z" and about["uptimeSeconds"] == 0
    assert about["config"] == {"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                               "lastReload": None}
    clock.advance(90)
    path.write_text(path.read_text() + "\n# an operator's note\n")
    assert (await proxy.request("POST", "/health/reload")).status == 200
    about = await read(proxy, "/health/integrations/proxy")
    assert about["uptimeSeconds"] == 90
    assert about["config"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert about["config"]["lastReload"] == {"at": "2024-12-01T08:01:30.000Z", "source": "admin", "ok": True}
    good_hash = about["config"]["sha256"]
    path.write_text("version: 2\n")  # refused: the previous table keeps serving
    assert (await proxy.request("POST", "/health/reload")).status == 400
    about = await read(proxy, "/health/integrations/proxy")
    assert about["config"]["lastReload"]["ok"] is False
    assert about["config"]["sha256"] == good_hash  # the hash of the table in force, not of the refused file


async def test_chromium_shows_the_new_figures(chromium, scene, clock):  # noqa: F811
    proxy, path, *_ = scene
    clock.advance(10)
    assert (await proxy.request("POST", "/health/reload")).status == 200
    out, err = await run_chromium(chromium, proxy.url + PAGE, "--dump-dom")
    screenshot = os.environ.get("STATUS_PAGE_SCREENSHOT")
    if screenshot:
        root, ext = os.path.splitext(screenshot)
        await run_chromium(chromium, proxy.url + PAGE, f"--screenshot={root}-fields{ext or '.png'}",
                           "--window-size=1280,900", "--hide-scrollbars")
    dom = StatusDom(out)
    assert console_problems(err) == [], "the page hit a CSP block or a script error"
    assert dom.body.get("data-state") == "ok" and dom.problems == {}
    page = dom.page
    assert page["version"] == f"{proxy_package.__version__} (Python {platform.python_version()})"
    assert page["uptime"] == "10.0 s"
    assert page["configHash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert page["lastReload"] == "2024-12-01 08:00:10 UTC · admin · applied"
    first, second = dom.providers["fx_primary"], dom.providers["fx_secondary"]
    assert (first["circuitState"], first["sinceChange"]) == ("OPEN", "10.0 s")
    assert (first["responses2xx"], first["responses4xx"], first["responses5xx"]) == ("1", "2", "3")
    assert (second["responses2xx"], second["responses4xx"], second["responses5xx"]) == ("3", "0", "0")
    assert first["inFlight"] == "0" and first["pool"] == "0 busy / 1 open (max 256)"
    assert first["tokens"] == "10.0 / 10" and second["tokens"] == "no limit"
    assert first["keys"] == "1 of 2 keys ready · next back 2024-12-01 08:02:00 UTC"
    assert second["keys"] == "—"
    assert re.fullmatch(r"\d+\.\d s", second["sinceChange"])


async def test_the_page_polls_the_proxy_endpoint(scene):
    proxy, *_ = scene
    html = await (await proxy.get(PAGE)).text()
    assert '"/health/integrations/proxy"' in html
    body = orjson.loads(await (await proxy.get("/health/integrations/proxy")).read())
    assert set(body) == {"version", "python", "aiohttp", "startedAt", "uptimeSeconds", "config", "timestamp"}
