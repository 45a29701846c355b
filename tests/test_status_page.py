"""The status page `GET /health/ui`: served with a strict Content-Security-Policy and no external
assets, and drawn by a real headless Chromium from the proxy's JSON endpoints during an outage.

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

import orjson
import pytest
from aiohttp import web

from proxy.health import status_page
from tests.fakes import Fail, Ok, route_table

PAGE = "/health/ui"
ENDPOINTS = ("/health", "/health/integrations/circuits", "/health/integrations/stats?minutes=60",
             "/health/integrations/cache")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0")
CHROMIUM_TIMEOUT = 90  # a hang guard, not a performance bound
INSTALL = "apt-get update -qq && apt-get install -y -qq chromium"


# --- Chromium -------------------------------------------------------------------------------

def _find_chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def _install_chromium() -> str | None:
    """Try once to install Debian's chromium; None on success, else why it failed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"not running as root, so `{INSTALL}` cannot run"
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    try:
        done = subprocess.run(["sh", "-c", INSTALL], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except subprocess.TimeoutExpired:
        return f"`{INSTALL}` did not finish within 10 minutes"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return f"`{INSTALL}` exited with {done.returncode}: {' / '.join(tail)}"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary, installed with apt-get once if missing (as root); else the test skips."""
    found = _find_chromium()
    if found is None:
        problem = _install_chromium()
        found = _find_chromium()
        if found is None:
            reason = f"Chromium cannot be installed here: {problem or 'apt-get succeeded but no chromium binary appeared'}"
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
    """What the rendered page shows: `data-field` texts by provider row, by service card and on the page."""

    _VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.body: dict[str, str] = {}
        self.title = ""
        self.page: dict[str, str] = {}
        self.services: dict[str, dict[str, str]] = {}
        self.providers: dict[str, dict[str, str]] = {}
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
            self.row_classes[attributes["data-provider"]] = set(attributes.get("class", "").split())
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
        field = provider = service = endpoint = None
        for _, attributes in reversed(self._open):
            field = field or attributes.get("data-field")
            provider = provider or attributes.get("data-provider")
            service = service or attributes.get("data-service")
            endpoint = endpoint or attributes.get("data-endpoint")
        if endpoint is not None:
            self.problems[endpoint] = self.problems.get(endpoint, "") + data
        if field is None:
            return
        if provider is not None:
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


HOSTILE_PROVIDER = "<img src=x onerror=\"document.title='pwned'\">"
HOSTILE_SERVICE = "<b>svc</b>&amp;"
HOSTILE_STATE = "OPEN\" class=\"pwned"


class _StatusBackend:
    """A real server on 127.0.0.1 serving the real page next to hostile or failing JSON endpoints."""

    def __init__(self) -> None:
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
