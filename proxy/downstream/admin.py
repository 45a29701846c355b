"""Health, integration status and admin endpoints on the main port (`/health...`).

Read-only endpoints answer from in-memory state; admin actions (POST/DELETE) need
`Authorization: Bearer $ADMIN_TOKEN` when ADMIN_TOKEN is set, else a loopback caller whose
Host is an IP address or localhost and whose Origin, if any, is the proxy's own.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import aiohttp
from aiohttp import web
from yarl import URL

import proxy
from proxy.downstream.wire import json_response
from proxy.fleet.connection import target_of
from proxy.observability.metrics import Metrics
from proxy.observability.stats import Stats
from proxy.resilience.breaker import State

if TYPE_CHECKING:
    from proxy.chain.build import Runtime

# A provider whose error rate over the last 5 minutes is above this is DEGRADED.
DEGRADED_ERROR_RATE = 0.2

# The probe paths the metrics port answers too, as the main port does.
PROBES = frozenset({"/health/live", "/health/ready"})


_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@functools.cache
def status_page() -> tuple[bytes, dict[str, str]]:
    """The `/health/ui` page and its headers, read once from `proxy/downstream/static/status.html`.

    The page keeps its script and style inline, so the Content-Security-Policy allows exactly
    those two blocks by hash and nothing else: no other script, style, frame or remote host.
    """
    text = resources.files("proxy.downstream").joinpath("static", "status.html").read_text(encoding="utf-8")
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _INLINE.findall(text):
        digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii")
        hashes[tag].append(f"'sha256-{digest}'")
    policy = "; ".join([
        "default-src 'none'",
        "script-src " + (" ".join(hashes["script"]) or "'none'"),
        "style-src " + (" ".join(hashes["style"]) or "'none'"),
        "connect-src 'self'", "img-src 'self'",
        "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    ])
    headers = {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store",
               "Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer"}
    return text.encode("utf-8"), headers


def now_iso(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _is_loopback(request: web.BaseRequest) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _names_this_host(host: str) -> bool:
    """A Host header that is an IP literal or `localhost`, with or without a port."""
    name, port = host, ""
    if host.startswith("["):
        name, bracket, port = host[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        port = port[1:]
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        return False
    if name.lower() == "localhost" and not host.startswith("["):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return isinstance(address, ipaddress.IPv6Address) == host.startswith("[")


def _same_origin(origin: str, host: str) -> bool:
    """Whether an Origin header names this proxy as the caller reached it (`http://` + Host)."""
    try:
        given, own = URL(origin), URL(f"http://{host}")
        bare = given.user is None and given.path in ("", "/") and not given.query_string and not given.fragment
        return bare and given.scheme == "http" and given.raw_host is not None \
            and (given.raw_host.lower(), given.port) == (own.raw_host.lower(), own.port)
    except ValueError:
        return False


class FleetBreakers(Protocol):
    """What /health shows and does of the breakers shared by the fleet (proxy.fleet.breakers)."""

    @property
    def connected(self) -> bool:
        """Whether this replica follows the fleet right now (False: local breakers only)."""

    def count(self) -> int:
        """How many breakers of the current route table are shared."""

    async def act(self, upstream: str, action: str) -> bool:
        """Share an operator's `reset` or `open` with every replica; False when Redis was not told."""


def _forbidden(detail: str, request_id: str) -> web.Response:
    return json_response(403, {"error": "forbidden", "detail": detail, "request_id": request_id})


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessFacts:
    """What `/health/integrations/proxy` tells of the running process besides its build."""

    started_at: float                    # wall clock
    config_sha256: str | None            # of the route table file as last read (None: unreadable)
    last_reload: dict[str, Any] | None   # {"at", "source", "ok"} of the last reload, if any


class Health:
    """Dispatches `/health...` requests.

    `current_runtime()` is the route table in force; `deliver_waiting()` delivers the events the
    bus still holds (a read counts every request answered before it); `is_ready()` says whether
    the listeners are up; `reload(source)` re-reads the route table and returns its problems;
    `describe_events()` reports the watch events' outbox, topics and deliveries; `facts()` the
    process's start, route-table hash and last reload; `shared_breakers()` the breakers the fleet
    shares now (None without a shared Redis; a reload may move the process to another one).
    """

    def __init__(self, *, current_runtime: Callable[[], "Runtime"], deliver_waiting: Callable[[], None],
                 stats: Stats, metrics: Metrics, admin_token: str | None, is_ready: Callable[[], bool],
                 reload: Callable[[str], Awaitable[list[str]]],
                 describe_events: Callable[[], Awaitable[dict[str, Any]]],
                 facts: Callable[[], ProcessFacts],
                 shared_breakers: Callable[[], FleetBreakers | None] = lambda: None) -> None:
        self._runtime = current_runtime
        self._deliver_waiting = deliver_waiting
        self._stats = stats
        self._metrics = metrics
        self._admin_token = admin_token
        self._is_ready = is_ready
        self._reload_table = reload
        self._describe_events = describe_events
        self._facts = facts
        self._shared = shared_breakers

    async def __call__(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        method = request.method
        parts = path.split("/")[1:]  # ["health", ...]
        if method in ("GET", "HEAD"):
            handler = self._reads.get(path)
            if handler is None:
                return json_response(404, {"error": "not_found", "request_id": request_id})
            self._deliver_waiting()  # what is read counts every request answered before it
            return await handler(self, request)
        admin = self._admin_route(method, parts)
        if admin is None:
            if path in self._reads:
                return json_response(405, {"error": "method_not_allowed", "request_id": request_id},
                                     {"Allow": "GET, HEAD"})
            return json_response(404, {"error": "not_found", "request_id": request_id})
        refused = self._authorize(request, request_id)
        if refused is not None:
            return refused
        return await admin(request)

    # --- read-only ---------------------------------------------------------------------

    async def health(self, request: web.BaseRequest) -> web.Response:
        services = self._services()
        overall = [s["overall"] for s in services.values()]
        if overall and all(o == "DOWN" for o in overall):
            status = "unhealthy"
        elif any(o != "HEALTHY" for o in overall):
            status = "degraded"
        else:
            status = "healthy"
        runtime = self._runtime()
        body = {"status": status, "services": services, "timestamp": now_iso(runtime.clock.time())}
        fleet = self._fleet()
        if fleet is not None:
            body["fleet"] = fleet
        return json_response(200, body)

    def _fleet(self) -> dict[str, Any] | None:
        """Whether shared breakers follow the fleet or, Redis being out of reach, decide locally."""
        shared = self._shared()
        if shared is None or not shared.count():
            return None
        return {"sharedBreakers": shared.count(), "breakers": "fleet" if shared.connected else "local",
                "redis": target_of(self._runtime().config.cache).shape}

    async def probe(self, request: web.BaseRequest) -> web.Response:
        """`/health/live` or `/health/ready` (one of `PROBES`), the same answer as on the main port."""
        if request.method not in ("GET", "HEAD"):
            return json_response(405, {"error": "method_not_allowed"}, {"Allow": "GET, HEAD"})
        return await (self.live if request.path == "/health/live" else self.ready)(request)

    async def live(self, request: web.BaseRequest) -> web.Response:
        return json_response(200, {"status": "alive"})

    async def ready(self, request: web.BaseRequest) -> web.Response:
        if not self._is_ready():
            return json_response(503, {"status": "starting"})
        return json_response(200, {"status": "ready", "config": self._runtime().config.source})

    async def integrations(self, request: web.BaseRequest) -> web.Response:
        return json_response(200, {"services": self._services(),
                                   "timestamp": now_iso(self._runtime().clock.time())})

    async def circuits(self, request: web.BaseRequest) -> web.Response:
        runtime = self._runtime()
        now = runtime.clock.time()
        shared = self._shared()
        circuits = []
        for upstream in runtime.config.upstreams():
            breaker = runtime.breakers[upstream.name]
            circuit = breaker.snapshot()
            circuit["sinceChangeSeconds"] = round(max(0.0, now - breaker.changed_at), 3)
            if upstream.breaker.shared and shared is not None:  # fleet: the fleet's state; local: Redis unreachable
                circuit["shared"] = "fleet" if shared.connected else "local"
            ring = runtime.keyrings.get(upstream.name)
            if ring is not None:  # fingerprints only: key values never leave the process
                circuit["keys"] = [{**k, "spentUntil": now_iso(k["spentUntil"]) if k["spentUntil"] else None}
                                   for k in ring.snapshot()]
            # What HAProxy's and Envoy's pages show per backend: connections in use, requests in flight.
            circuit["pool"] = runtime.transport.pool_usage(upstream.name)
            circuit["inFlight"] = runtime.transport.in_flight(upstream.name)
            limiter = runtime.limiters.get(upstream.name)
            circuit["rateLimit"] = limiter.snapshot() if limiter is not None else None
            circuits.append(circuit)
        return json_response(200, {"circuits": circuits})

    async def about(self, request: web.BaseRequest) -> web.Response:
        """The running proxy: version, uptime, the route table's hash and its last reload."""
        runtime = self._runtime()
        facts = self._facts()
        now = runtime.clock.time()
        reload = facts.last_reload
        return json_response(200, {
            "version": proxy.__version__, "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "startedAt": now_iso(facts.started_at), "uptimeSeconds": round(max(0.0, now - facts.started_at), 3),
            "config": {"source": runtime.config.source, "sha256": facts.config_sha256,
                       "lastReload": None if reload is None else {**reload, "at": now_iso(reload["at"])}},
            "timestamp": now_iso(now)})

    async def stats(self, request: web.BaseRequest) -> web.Response:
        text = request.query.get("minutes", "60")
        if not text.isdigit() or not 1 <= int(text) <= 1440:
            return json_response(400, {"error": "bad_request", "detail": "minutes must be a whole number from 1 to 1440"})
        return json_response(200, self._stats.window(int(text)))

    async def cache(self, request: web.BaseRequest) -> web.Response:
        runtime = self._runtime()
        window = self._stats.window(5)
        body = dict(runtime.store.describe())
        body["hitRate"] = {name: s.get("cacheHitRate") for name, s in window["services"].items()}
        return json_response(200, body)

    async def outbox(self, request: web.BaseRequest) -> web.Response:
        return json_response(200, await self._describe_events())

    async def metrics(self, request: web.BaseRequest) -> web.Response:
        body, content_type = self._metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def ui(self, request: web.BaseRequest) -> web.Response:
        body, headers = status_page()
        return web.Response(body=body, headers=headers)

    _reads: dict[str, Callable[["Health", web.BaseRequest], Awaitable[web.StreamResponse]]] = {
        "/health": health, "/health/live": live, "/health/ready": ready,
        "/health/integrations": integrations, "/health/integrations/circuits": circuits,
        "/health/integrations/stats": stats, "/health/integrations/cache": cache, "/health/integrations/outbox": outbox, "/health/metrics": metrics,
        "/health/integrations/proxy": about,
        "/health/ui": ui,
    }

    def _services(self) -> dict[str, Any]:
        runtime = self._runtime()
        stats = self._stats
        out: dict[str, Any] = {}
        for service in runtime.config.services.values():
            providers = []
            for upstream in service.upstreams:
                breaker = runtime.breakers[upstream.name]
                state = breaker.state
                error_rate = stats.recent_error_rate(upstream.name)
                resting_until = breaker.resting_until
                if state is State.OPEN:
                    status = "DOWN"
                elif state is State.HALF_OPEN or resting_until is not None or \
                        (error_rate is not None and error_rate > DEGRADED_ERROR_RATE):
                    status = "DEGRADED"
                else:
                    status = "HEALTHY"
                provider = {"providerName": upstream.name, "status": status, "circuitState": state.value,
                            "isHealthy": status == "HEALTHY"}
                if resting_until is not None:  # asked for a rest (Retry-After): skipped until then
                    provider["restingUntil"] = now_iso(resting_until)
                providers.append(provider)
            statuses = [p["status"] for p in providers]
            if statuses and all(s == "DOWN" for s in statuses):
                overall = "DOWN"
            elif all(s == "HEALTHY" for s in statuses):
                overall = "HEALTHY"
            else:
                overall = "DEGRADED"
            out[service.name] = {"service": service.name, "providers": providers, "overall": overall}
        return out

    # --- admin --------------------------------------------------------------------------

    def _admin_route(self, method: str, parts: list[str]) -> Callable[[web.BaseRequest], Awaitable[web.Response]] | None:
        if method == "POST" and parts == ["health", "reload"]:
            return self._reload
        if method == "POST" and len(parts) == 5 and parts[:3] == ["health", "integrations", "circuits"] \
                and parts[4] in ("reset", "open"):
            provider, action = parts[3], parts[4]
            return lambda request: self._circuit(provider, action)
        if method == "DELETE" and len(parts) == 4 and parts[:3] == ["health", "integrations", "cache"]:
            service = parts[3]
            return lambda request: self._purge(service)
        return None

    def _authorize(self, request: web.BaseRequest, request_id: str) -> web.Response | None:
        token = self._admin_token
        if token:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                return json_response(401, {"error": "unauthorized", "request_id": request_id},
                                     {"WWW-Authenticate": 'Bearer realm="resilience-proxy"'})
            return None
        if not _is_loopback(request):
            return _forbidden("admin actions need ADMIN_TOKEN or a loopback caller", request_id)
        # A loopback caller may still be a browser running someone else's page: refuse what a
        # cross-site form or a DNS-rebound name sends, which a person or a script on this host never does.
        host = request.headers.get("Host")
        if host is None or not _names_this_host(host):
            return _forbidden("without ADMIN_TOKEN, admin actions need a Host that is an IP address or localhost "
                              "(a DNS name may have been rebound to this host)", request_id)
        origin = request.headers.get("Origin")
        if origin is not None and not _same_origin(origin, host):
            return _forbidden("without ADMIN_TOKEN, admin actions are refused from another origin "
                              "(a cross-site request)", request_id)
        return None

    async def _circuit(self, provider: str, action: str) -> web.Response:
        breaker = self._runtime().breakers.get(provider)
        if breaker is None or self._runtime().upstream(provider) is None:
            return json_response(404, {"error": "unknown_provider", "provider": provider})
        if action == "reset":
            breaker.reset()
        else:
            breaker.force_open()
        body = breaker.snapshot()
        shared = self._shared()
        if breaker.policy.shared and shared is not None:  # every replica, or this one only when Redis is away
            body["shared"] = "fleet" if await shared.act(provider, action) else "local"
        return json_response(200, body)

    async def _purge(self, service: str) -> web.Response:
        runtime = self._runtime()
        if service not in runtime.config.services:
            return json_response(404, {"error": "unknown_service", "service": service})
        if not runtime.store.connected:
            return json_response(503, {"error": "cache_unavailable", "service": service,
                                       "detail": "the cache backend is unreachable; nothing was purged"})
        removed = await runtime.store.purge(service)
        return json_response(200, {"service": service, "purged": removed})

    async def _reload(self, request: web.BaseRequest) -> web.Response:
        problems = await self._reload_table("admin")
        if problems:
            return json_response(400, {"error": "invalid_config", "problems": problems})
        return json_response(200, {"status": "reloaded", "config": self._runtime().config.source})
