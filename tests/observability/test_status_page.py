"""The status page `GET /health/ui`: served with a strict Content-Security-Policy and no external
assets, and drawn by a real headless Chromium from the proxy's JSON endpoints during an outage
and while flight-status events flow to WebSocket subscribers (the Events panel).

Chromium runs as a subprocess (`--dump-dom`, `--virtual-time-budget`), so no Selenium or
Playwright is needed. Set STATUS_PAGE_SCREENSHOT=/some/file.png to also save a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import warnings
from html.parser import HTMLParser
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.downstream.admin import status_page
from tests.fakes import Fail, Ok, route_table

PAGE = "/health/ui"
ENDPOINTS = ("/health", "/health/integrations/circuits", "/health/integrations/stats?minutes=60",
             "/health/integrations/cache", "/health/integrations/outbox", "/health/integrations/proxy")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0")
CHROMIUM_TIMEOUT = 90  # a hang guard, not a performance bound


# --- Chromium -------------------------------------------------------------------------------

def _find_chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary; tests never install it (.ci/run does, with apt-get): without it they skip."""
    found = _find_chromium()
    if found is None:
        reason = "chromium is not installed (.ci/run installs Debian's chromium; or: apt-get install chromium)"
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    return found


async def run_chromium(chromium: str, url: str, *extra: str, budget_ms: int = 5000) -> tuple[str, str]:
    """Load `url` in headless Chromium for `budget_ms` of virtual time; (stdout, stderr).

    Runs without blocking the event loop, which also serves the proxy under test.
    """
    with tempfile.TemporaryDirectory(prefix="rp-chromium-", ignore_cleanup_errors=True) as profile:
        process = await asyncio.create_subprocess_exec(
            chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *extra, url,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(process.communicate(), CHROMIUM_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"chromium did not finish loading {url} within {CHROMIUM_TIMEOUT} s") from None
        finally:
            # Chromium's helper processes share its session; end them with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    stderr = err.decode("utf-8", "replace")
    assert process.returncode == 0, f"chromium exited with {process.returncode}: {stderr[-2000:]}"
    return out.decode("utf-8", "replace"), stderr


def console_problems(stderr: str) -> list[str]:
    """Console lines about blocked content or script errors (Chromium logs them to stderr)."""
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line and ("Content Security Policy" in line or "Uncaught" in line)]


class StatusDom(HTMLParser):
    """What the rendered page shows: `data-field` texts by provider row, by service card, by event topic
    row and on the page."""

    _VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.body: dict[str, str] = {}
        self.title = ""
        self.page: dict[str, str] = {}
        self.services: dict[str, dict[str, str]] = {}
        self.providers: dict[str, dict[str, str]] = {}
        self.topics: dict[str, dict[str, str]] = {}
        self.row_classes: dict[str, set[str]] = {}
        self.problems: dict[str, str] = {}
        self._open: list[tuple[str, dict[str, str]]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.tags.append(tag)
        if tag == "body":
            self.body = attributes
        if tag == "tr" and "data-provider" in attributes:
            self.row_classes.setdefault(attributes["data-provider"], set()).update(attributes.get("class", "").split())
        if tag not in self._VOID:
            self._open.append((tag, attributes))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                return

    def handle_data(self, data: str) -> None:
        if any(tag == "title" for tag, _ in self._open):
            self.title += data
        field = provider = service = endpoint = topic = None
        for _, attributes in reversed(self._open):
            field = field or attributes.get("data-field")
            provider = provider or attributes.get("data-provider")
            service = service or attributes.get("data-service")
            endpoint = endpoint or attributes.get("data-endpoint")
            topic = topic or attributes.get("data-topic")
        if endpoint is not None:
            self.problems[endpoint] = self.problems.get(endpoint, "") + data
        if field is None:
            return
        if topic is not None:
            scope = self.topics.setdefault(topic, {})
        elif provider is not None:
            scope = self.providers.setdefault(provider, {})
        elif service is not None:
            scope = self.services.setdefault(service, {})
        else:
            scope = self.page
        scope[field] = (scope.get(field, "") + data).strip()


def _policy(header: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            directives[words[0]] = words[1:]
    return directives


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def outage_routes(primary_url: str, secondary_url: str) -> str:
    return route_table({"fx": {
        "prefix": "/fx", "cache": {"ttl": "1m", "stale": "1h"}, "breaker": "FAST", "retry": "NONE",
        "upstreams": [{"name": "fx_primary", "url": primary_url}, {"name": "fx_secondary", "url": secondary_url}],
    }})


def watched_routes(flight_api_url: str) -> str:
    """A watched flight-status route (memory outbox) whose fake API the test controls."""
    return route_table({"flights": {
        "retry": "NONE",
        "routes": [{"match": "/flights/status/{flight}",
                    "watch": {"interval": "5m", "fields": "{status: status, gate: gate}"}}],
        "upstreams": [{"name": "flights_kac", "url": flight_api_url}],
    }}, events={"ack_timeout": "30s"})


def flight(status: str) -> Ok:
    return Ok(body=orjson.dumps({"flight": "KE001", "status": status, "gate": "3"}))


async def ws_frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await ws.receive(timeout=5)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return orjson.loads(message.data)


async def ws_subscribe(ws: aiohttp.ClientWebSocketResponse, topic: str) -> dict[str, Any]:
    await ws.send_str(orjson.dumps({"op": "subscribe", "topic": topic}).decode())
    return await ws_frame(ws)


# --- served as plain HTTP ---------------------------------------------------------------------

async def test_the_page_is_html_under_a_hash_only_policy_with_no_external_assets(fake_upstream, proxy_factory):
    upstream = await fake_upstream("primary")
    proxy = await proxy_factory(outage_routes(upstream.url, upstream.url))

    response = await proxy.get(PAGE)
    html = await response.text()

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    header = response.headers["Content-Security-Policy"]
    policy = _policy(header)
    assert policy["default-src"] == ["'none'"]
    assert policy["connect-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"] and policy["base-uri"] == ["'none'"]
    assert "unsafe-inline" not in header and "unsafe-eval" not in header and "http" not in header
    # Exactly the page's own inline blocks may run, by hash.
    scripts = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    assert len(scripts) == 1 and len(styles) == 1
    assert policy["script-src"] == [_sha256(scripts[0])]
    assert policy["style-src"] == [_sha256(styles[0])]
    # No external assets and no other way to load code.
    assert not re.search(r"""\b(?:src|href|action)\s*=\s*["']?\s*(?:[a-z]+:)?//""", html, re.IGNORECASE)
    assert not re.search(r"https?://", html), "the page names another host"
    assert not re.search(r"<(?:script|link|iframe|object|embed|img)\b[^>]*\b(?:src|href)=", html, re.IGNORECASE)
    # Data is inserted as text only, never parsed as HTML.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in html, sink
    for endpoint in ENDPOINTS:
        assert f'"{endpoint}"' in html, f"the page does not poll {endpoint}"


async def test_the_page_answers_head_and_refuses_other_methods(fake_upstream, proxy_factory):
    upstream = await fake_upstream("primary")
    proxy = await proxy_factory(outage_routes(upstream.url, upstream.url))

    head = await proxy.request("HEAD", PAGE)
    post = await proxy.request("POST", PAGE)

    assert head.status == 200 and head.headers["Content-Type"] == "text/html; charset=utf-8"
    assert await head.read() == b""
    assert post.status == 405 and post.headers["Allow"] == "GET, HEAD"


def test_the_page_ships_as_package_data_and_is_read_once():
    body, headers = status_page()
    assert body.startswith(b"<!doctype html>")
    assert status_page() is status_page()  # cached: the file is read once per process
    assert headers["Content-Type"] == "text/html; charset=utf-8"


# --- drawn by a real browser ------------------------------------------------------------------

async def test_chromium_shows_the_open_primary_the_healthy_secondary_and_the_stale_serve(
        chromium, fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(outage_routes(primary.url, secondary.url), clock=clock)

    # A copy of USD from the primary, then past its ttl both upstreams fail once: STALE.
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    clock.advance(61)
    primary.script(Fail(503))
    secondary.script(Fail(503))
    stale = await proxy.get("/fx/latest/USD")
    assert stale.headers["X-Cache"] == "STALE"
    # The primary keeps failing: two more failures open its FAST breaker (3), the secondary answers.
    primary.default = Fail(503)
    secondary.default = Ok(body=b'{"from": "secondary"}')
    for base in ("EUR", "GBP", "JPY", "CNY", "AUD", "CAD"):
        answer = await proxy.get(f"/fx/latest/{base}")
        assert answer.headers["X-Upstream"] == "fx_secondary"
    assert proxy.breaker("fx_primary").state.value == "OPEN"
    stats = await (await proxy.get("/health/integrations/stats?minutes=60")).json()
    assert stats["providers"]["fx_primary"]["errorRate"] == 0.75  # 3 of 4 attempts failed
    assert stats["providers"]["fx_secondary"]["errorRate"] == pytest.approx(1 / 7, abs=1e-4)  # below DEGRADED's 20 %

    out, err = await run_chromium(chromium, proxy.url + PAGE, "--dump-dom")
    dom = StatusDom(out)

    assert console_problems(err) == [], "the page hit a CSP block or a script error"
    assert dom.body.get("data-state") == "ok" and int(dom.body.get("data-refreshes", "0")) >= 1, dom.body
    assert dom.problems == {}
    assert dom.page["overall"] == "DEGRADED"
    first = dom.providers["fx_primary"]
    assert (first["circuitState"], first["status"]) == ("OPEN", "DOWN")
    assert {"state-OPEN", "status-DOWN"} <= dom.row_classes["fx_primary"]
    assert (first["requests"], first["errors"], first["errorRate"]) == ("4", "3", "75.0 %")
    assert first["failures"] == "3 / 3"
    assert first["retryAt"] == "2024-12-01 08:01:31 UTC"  # opened at the fake clock's 08:01:01, FAST = 30 s
    for percentile in ("p50", "p95", "p99"):
        assert re.fullmatch(r"\d+\.\d+ (?:ms|s)", first[percentile]), first
    second = dom.providers["fx_secondary"]
    assert (second["circuitState"], second["status"]) == ("CLOSED", "HEALTHY")
    assert {"state-CLOSED", "status-HEALTHY"} <= dom.row_classes["fx_secondary"]
    assert second["errorRate"] == "14.3 %"
    fx = dom.services["fx"]
    assert fx["overall"] == "DEGRADED"
    assert int(fx["stale"]) >= 1
    assert fx["cacheHitRate"].endswith(" %") and fx["cacheHitRate5m"].endswith(" %")
    assert dom.page["backend"] == "memory" and dom.page["connected"] == "yes"

    screenshot = os.environ.get("STATUS_PAGE_SCREENSHOT")
    if screenshot:
        await run_chromium(chromium, proxy.url + PAGE, f"--screenshot={screenshot}", "--window-size=1280,900",
                           "--hide-scrollbars")
        assert os.path.getsize(screenshot) > 0


# Percent-encoded markup in the flight segment; the proxy keeps the decoded text as the topic name.
# (An encoded `/` would add a path segment, so no watched route would match and it would be refused.)
HOSTILE_TOPIC = "flights/status/%3Cb%3Ex%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E"


async def test_chromium_shows_the_events_panel_while_subscribers_receive_ack_and_miss_events(
        chromium, fake_upstream, proxy_factory, clock):
    api = await fake_upstream("kac")
    api.default = flight("SCHEDULED")
    proxy = await proxy_factory(watched_routes(api.url), clock=clock)
    events = proxy.process.events
    await events.watcher.stop()  # the test steps the clock and polls itself
    acker = await proxy.client.ws_connect(proxy.url + "/events")
    laggard = await proxy.client.ws_connect(proxy.url + "/events")
    hostile = await proxy.client.ws_connect(proxy.url + "/events")
    try:
        assert await ws_subscribe(acker, "flights/status/KE001") == {"type": "subscribed", "topic": "flights/status/KE001"}
        assert (await ws_subscribe(laggard, "flights/status/KE001"))["type"] == "subscribed"
        answer = await ws_subscribe(hostile, HOSTILE_TOPIC)
        assert answer["type"] == "subscribed", answer
        hostile_name = answer["topic"]
        assert hostile_name == "flights/status/<b>x<img src=x onerror=alert(1)>"  # markup, if ever parsed
        assert await events.watcher.tick() == 2       # the baselines of both topics: no event
        # The flight is delayed: one event per topic, written to the outbox, pushed to every subscriber.
        api.default = flight("DELAYED")
        clock.advance(300)
        assert await events.watcher.tick() == 2
        event = await ws_frame(acker)
        assert (await ws_frame(laggard))["evtId"] == event["evtId"]
        hostile_event = await ws_frame(hostile)
        assert hostile_event["topic"] == hostile_name
        for ws, evt_id in ((acker, event["evtId"]), (hostile, hostile_event["evtId"])):
            await ws.send_str(orjson.dumps({"op": "ack", "evtId": evt_id}).decode())
            assert await ws_frame(ws) == {"type": "acked", "evtId": evt_id}
        # The laggard never acks: redelivered after the 30 s ack timeout, then still waiting 12 s later.
        clock.advance(30)
        assert await events.hub.redeliver_due() == 1
        again = await ws_frame(laggard)
        assert again["evtId"] == event["evtId"] and again["redelivery"] is True
        clock.advance(12)
        outbox = await (await proxy.get("/health/integrations/outbox")).json()
        assert outbox["websocket"] == {"clients": 3, "unacked": 1, "oldestUnackedAge": 42.0, "delivered": 3,
                                       "acked": 2, "ackRatio": 0.6667, "redelivered": 1, "dropped": 0}
        assert outbox["length"] == 2 and outbox["durable"] is False

        out, err = await run_chromium(chromium, proxy.url + PAGE, "--dump-dom")
        screenshot = os.environ.get("STATUS_PAGE_SCREENSHOT")
        if screenshot:
            root, ext = os.path.splitext(screenshot)
            await run_chromium(chromium, proxy.url + PAGE, f"--screenshot={root}-events{ext or '.png'}",
                               "--window-size=1280,1100", "--hide-scrollbars")
    finally:
        for ws in (acker, laggard, hostile):
            await ws.close()
    dom = StatusDom(out)

    assert console_problems(err) == [], "the page hit a CSP block or a script error"
    assert dom.body.get("data-state") == "ok" and dom.problems == {}
    page = dom.page
    assert (page["outboxLength"], page["durable"], page["deadLetters"]) == ("2", "not durable (memory)", "0")
    assert (page["wsClients"], page["unacked"], page["oldestUnackedAge"]) == ("3", "1", "42.0 s")
    assert (page["ackRatio"], page["deliveredAcked"], page["redelivered"], page["dropped"]) == ("66.7 %", "3 / 2", "1", "0")
    assert (page["webhooksDelivered"], page["webhookFailures"], page["webhooksDead"]) == ("0", "0", "0")
    assert dom.topics["flights/status/KE001"] == {"topic": "flights/status/KE001", "route": "/flights/status/{flight}",
                                                 "subscribers": "2", "polls": "2"}
    # The caller-supplied topic is shown as text: no <b> or <img> element appears anywhere.
    assert dom.topics[hostile_name]["topic"] == hostile_name and dom.topics[hostile_name]["subscribers"] == "1"
    assert "b" not in dom.tags and "img" not in dom.tags


HOSTILE_PROVIDER = "<img src=x onerror=\"document.title='pwned'\">"
HOSTILE_SERVICE = "<b>svc</b>&amp;"
HOSTILE_STATE = "OPEN\" class=\"pwned"


class _StatusBackend:
    """A real server on 127.0.0.1 serving the real page next to hostile or failing JSON endpoints."""

    def __init__(self, outbox: Any = None) -> None:
        self._outbox = outbox  # the outbox answer's body; None: the endpoint fails with 503
        self.calls: dict[str, int] = {}
        self._runner: web.ServerRunner | None = None
        self.url = ""

    async def start(self) -> None:
        self._runner = web.ServerRunner(web.Server(self._handle), access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.calls[request.path] = self.calls.get(request.path, 0) + 1
        if request.path == PAGE:
            body, headers = status_page()
            return web.Response(body=body, headers=headers)
        if request.path == "/health":
            return self._json({"status": "unhealthy", "timestamp": "2024-12-01T08:00:00.000Z", "services": {
                HOSTILE_SERVICE: {"service": HOSTILE_SERVICE, "overall": "DOWN", "providers": [
                    {"providerName": HOSTILE_PROVIDER, "status": "DOWN", "circuitState": "OPEN", "isHealthy": False}]}}})
        if request.path == "/health/integrations/circuits":
            return self._json({"circuits": [{"provider": HOSTILE_PROVIDER, "service": HOSTILE_SERVICE, "state": HOSTILE_STATE,
                                             "failures": 5, "threshold": 5, "openedAt": None, "retryAt": None,
                                             "forced": False}]})
        if request.path == "/health/integrations/stats":
            return web.Response(status=500, text="boom")
        if request.path == "/health/integrations/cache":
            return web.Response(text="this is not JSON", content_type="text/plain")
        if request.path == "/health/integrations/outbox":
            return web.Response(status=503, text="no outbox") if self._outbox is None else self._json(self._outbox)
        return web.Response(status=404)

    @staticmethod
    def _json(body: Any) -> web.Response:
        return web.Response(body=orjson.dumps(body), content_type="application/json")


async def test_chromium_shows_failing_endpoints_as_unavailable_keeps_polling_and_escapes_every_value(chromium):
    backend = _StatusBackend()
    await backend.start()
    try:
        out, err = await run_chromium(chromium, backend.url + PAGE, "--dump-dom", budget_ms=12000)
    finally:
        await backend.stop()
    dom = StatusDom(out)

    # Hostile names are shown as text, never become markup, handlers or classes.
    assert console_problems(err) == []
    assert "img" not in dom.tags and "b" not in dom.tags
    assert dom.title == "resilience-proxy status"
    row = dom.providers[HOSTILE_PROVIDER]
    assert row["provider"] == HOSTILE_PROVIDER
    assert row["circuitState"] == HOSTILE_STATE
    assert not any("pwned" in c for c in dom.row_classes[HOSTILE_PROVIDER]) and "status-DOWN" in dom.row_classes[HOSTILE_PROVIDER]
    assert dom.services[HOSTILE_SERVICE]["service"] == HOSTILE_SERVICE
    # What failed says "unavailable"; what answered is still shown.
    assert row["status"] == "DOWN" and row["failures"] == "5 / 5"
    for field in ("requests", "errors", "errorRate", "p50", "p95", "p99"):
        assert row[field] == "unavailable", field
    assert dom.services[HOSTILE_SERVICE]["stale"] == "unavailable"
    assert dom.page["backend"] == "unavailable"
    assert dom.page["overall"] == "UNHEALTHY"
    assert "HTTP 500" in dom.problems["/health/integrations/stats?minutes=60"]
    assert "unavailable" in dom.problems["/health/integrations/cache"]
    assert "/health" not in dom.problems and dom.body["data-state"] == "partial"
    # 12 s of virtual time at one refresh per 5 s: the page kept polling after the failures.
    assert backend.calls[PAGE] == 1
    assert backend.calls["/health/integrations/stats"] >= 2
    assert int(dom.body["data-refreshes"]) >= 2
    # The events panel says so too, and the outbox kept being asked.
    assert "HTTP 503" in dom.problems["/health/integrations/outbox"]
    for field in ("outboxLength", "durable", "wsClients", "unacked", "oldestUnackedAge", "ackRatio", "webhooksDead"):
        assert dom.page[field] == "unavailable", field
    assert dom.topics == {}
    assert backend.calls["/health/integrations/outbox"] >= 2


HOSTILE_TOPICS = {
    "flights/status/<b>KE001</b>": {"subscribers": 4, "static": False, "route": "<img src=x onerror=alert(1)>", "polls": 9},
    "__proto__": {"subscribers": "<i>many</i>", "static": True, "route": None, "polls": None},
}


async def test_chromium_shows_a_redis_outbox_that_cannot_count_and_hostile_topics_as_text(chromium):
    backend = _StatusBackend(outbox={
        "backend": "redis", "durable": True, "length": None, "deadLetters": 7, "topics": HOSTILE_TOPICS,
        "websocket": {"clients": 2, "unacked": 5, "oldestUnackedAge": 185.5, "delivered": 40, "acked": 35,
                      "ackRatio": 0.875, "redelivered": 6, "dropped": 1},
        "webhooks": {"delivered": 12, "failed_attempts": 3, "dead": 2},
    })
    await backend.start()
    try:
        out, err = await run_chromium(chromium, backend.url + PAGE, "--dump-dom")
    finally:
        await backend.stop()
    dom = StatusDom(out)

    assert console_problems(err) == []
    assert "/health/integrations/outbox" not in dom.problems
    page = dom.page
    # Redis did not answer XLEN in time: the length is unknown, not zero.
    assert (page["outboxLength"], page["durable"], page["deadLetters"]) == ("unknown", "yes (redis)", "7")
    assert (page["wsClients"], page["unacked"], page["oldestUnackedAge"], page["ackRatio"]) == ("2", "5", "3 min 5 s", "87.5 %")
    assert (page["redelivered"], page["dropped"]) == ("6", "1")
    assert (page["webhooksDelivered"], page["webhookFailures"], page["webhooksDead"]) == ("12", "3", "2")
    assert dom.topics["flights/status/<b>KE001</b>"] == {"topic": "flights/status/<b>KE001</b>",
                                                        "route": "<img src=x onerror=alert(1)>",
                                                        "subscribers": "4", "polls": "9"}
    # Values of the wrong type are not shown as numbers.
    assert dom.topics["__proto__"] == {"topic": "__proto__", "route": "—", "subscribers": "—", "polls": "—"}
    assert not {"b", "i", "img"} & set(dom.tags)
