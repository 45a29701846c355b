"""The running proxy: listeners, the current Runtime, reloads and a clean drain on SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from proxy import signals
from proxy.background import cancel_and_wait
from proxy.chain.build import Runtime
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.model import Config, ServerSettings, Upstream
from proxy.config.parse import ConfigError, load_config
from proxy.downstream.front import LeanFront
from proxy.downstream.handler import Downstream
from proxy.downstream.hit import HitStage
from proxy.downstream.server_name import request_factory
from proxy.fleet.breakers import SharedBreakers
from proxy.fleet.connection import target_of
from proxy.fleet.link import FleetLink
from proxy.fleet.rests import SharedRests
from proxy.downstream.admin import PROBES, Health, ProcessFacts
from proxy.observability.logs import REDACTOR, EventLog
from proxy.observability.metrics import Metrics
from proxy.observability.stats import Stats
from proxy.ops.startup import announce
from proxy.watch.system import EventsSystem

if TYPE_CHECKING:
    from proxy.observability.otlp import SpanExport

log = structlog.get_logger("resilience-proxy")

# aiohttp refuses header lines past these with a 400; our own, lower limit answers 431 first.
_PARSER_LIMITS = {"max_line_size": 65536, "max_field_size": 65536, "max_headers": 256}


class ProxyProcess:
    """Owns everything that lives as long as the process: bus, stats, metrics, listeners."""

    def __init__(self, config: Config, *, clock: Clock = SYSTEM_CLOCK, env: Mapping[str, str] | None = None,
                 log_events: bool = True) -> None:
        self.env = os.environ if env is None else env
        self.clock = clock
        self.bus = signals.EventBus(later=signals.PER_REQUEST, hold=signals.PER_REQUEST_HOLD)
        self.stats = Stats(clock)
        self.metrics = Metrics(clock, prefix=config.metrics.prefix)
        self.bus.subscribe(self.metrics)
        self.bus.subscribe(self.stats)
        if log_events:
            self.bus.subscribe(EventLog(clock=clock))
        self.started_at = clock.time()
        self.last_reload: dict[str, Any] | None = None  # when, how (sighup, file_change, admin) and whether it took
        # Spans over OTLP only when configured: otherwise OpenTelemetry is never imported.
        self.spans: SpanExport | None = None
        if config.tracing.otlp_endpoint:
            from proxy.observability.otlp import SpanExport
            self.spans = SpanExport(config.tracing.otlp_endpoint, config.tracing.service_name)
            self.bus.subscribe(self.spans)
        recording = self.spans is not None
        self.admin_token = self.env.get("ADMIN_TOKEN") or None
        REDACTOR.add_secrets(config.secrets | ({self.admin_token} if self.admin_token else set()))
        self._hit = HitStage.factory(metrics=self.metrics, stats=self.stats, recording=recording)  # every Runtime's stage 0
        self.runtime = Runtime(config, clock=clock, bus=self.bus, hit=self._hit, probe_lease=self._claim_probe)
        self._register(config)
        self.ready = False
        self._config_digest = _digest(config.source)
        self._reload_lock = asyncio.Lock()
        # With a shared Redis, a rest one replica is told of (Retry-After, a refused key) holds for all,
        # and so does a shared breaker's OPEN state; both travel on one link per replica.
        self.fleet: SharedRests | None = None
        self.fleet_breakers: SharedBreakers | None = None
        self._fleet_link: FleetLink | None = None
        self._open_fleet(config)
        self.health = Health(current_runtime=self.current_runtime, deliver_waiting=self.bus.deliver_waiting,
                             stats=self.stats, metrics=self.metrics, admin_token=self.admin_token,
                             is_ready=lambda: self.ready, reload=self.reload,
                             describe_events=lambda: self.events.describe(), facts=self.facts,
                             shared_breakers=lambda: self.fleet_breakers)
        self._runners: list[web.BaseRunner] = []
        self._front: LeanFront | None = None
        self._listener: asyncio.AbstractServer | None = None
        self.addresses: dict[str, tuple[str, int]] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self.events = EventsSystem(config, current_runtime=self.current_runtime, clock=clock, emit=self.bus.emit)
        # The one way in, for both kinds of connection (see proxy/downstream/handler.py).
        self.downstream = Downstream(self.current_runtime, emit=self.bus.emit, health=self.health,
                                     events=self.events.hub.handle, recording=recording)
        self._retiring: set[asyncio.Task[None]] = set()

    def _open_fleet(self, config: Config) -> None:
        """With a shared Redis: the link that rests and shared breakers travel on (`start` starts it)."""
        if config.cache.backend != "redis":
            return
        link = self._fleet_link = FleetLink(target_of(config.cache), emit=self.bus.emit)
        self.fleet = SharedRests(link, config.cache.prefix, runtime=self.current_runtime, clock=self.clock,
                                 emit=self.bus.emit)
        self.fleet_breakers = SharedBreakers(link, config.cache.prefix, runtime=self.current_runtime,
                                             clock=self.clock, emit=self.bus.emit)
        self.bus.subscribe(self.fleet)
        self.bus.subscribe(self.fleet_breakers)
        link.on_change(lambda up, error: self.bus.emit(signals.FleetLinkChanged(
            up, self.fleet_breakers.count() if self.fleet_breakers else 0, error)))

    async def _close_fleet(self) -> None:
        """Leave the fleet: nothing more is told or heard, and the link's connection is closed."""
        for part in (self.fleet, self.fleet_breakers):
            if part is not None:
                self.bus.unsubscribe(part)
                await part.stop()
        if self._fleet_link is not None:
            await self._fleet_link.stop()
        self.fleet = self.fleet_breakers = self._fleet_link = None

    async def _claim_probe(self, upstream: Upstream) -> bool:
        """Whether this replica sends a shared breaker's half-open probe (see SharedBreakers.claim_probe)."""
        return True if self.fleet_breakers is None else await self.fleet_breakers.claim_probe(upstream)

    def _register(self, config: Config, breakers: dict[str, Any] | None = None) -> None:
        for upstream in config.upstreams():
            state = breakers[upstream.name].state.value if breakers else None
            self.metrics.register_provider(upstream.service, upstream.name, state=state)
            self.stats.register(upstream.service, upstream.name)

    # --- requests ---------------------------------------------------------------------------

    def current_runtime(self) -> Runtime:
        """The route table in force; a reload swaps it whole, and each request reads it once."""
        return self.runtime

    def facts(self) -> ProcessFacts:
        """What the status page tells of the process: its start, the route table's hash and last reload."""
        return ProcessFacts(started_at=self.started_at, config_sha256=self._config_digest,
                            last_reload=self.last_reload)

    async def handle_metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path in PROBES:
            # Kubernetes probes the pod IP; the main port may listen on the pod's loopback only.
            return await self.health.probe(request)
        if request.path != "/metrics":
            return web.Response(status=404, text="only /metrics, /health/live and /health/ready here\n")
        self.bus.deliver_waiting()  # a scrape counts every request answered before it
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, listen: tuple[str, int] | None = None,
                    metrics_listen: tuple[str, int] | None | bool = True) -> None:
        """Bind the listeners (port 0 picks a free one; see `addresses`)."""
        await self.runtime.store.ping()  # learn the cache backend's state before the first request
        self.events.start()
        if self._fleet_link is not None:
            self._fleet_link.start()
        settings = self.runtime.config.server
        # Connections start on the lean front end (plain GETs); aiohttp's server takes every other one
        # (all of them with `server.front: aiohttp`).
        self._front = LeanFront(self.downstream.answer, self.downstream.hit, **_bounds(settings), **_PARSER_LIMITS)
        main = web.ServerRunner(self._front.aiohttp, shutdown_timeout=settings.drain_timeout)
        await main.setup()
        host, port = listen or settings.listen
        # backlog: bursts of new connections must not wait for SYN retries
        self._listener = await asyncio.get_running_loop().create_server(self._front, host, port, backlog=1024)
        self._runners.append(main)
        self.addresses["main"] = self._listener.sockets[0].getsockname()[:2]
        target = settings.metrics_listen if metrics_listen is True else metrics_listen
        if target:
            metrics = web.ServerRunner(web.Server(self.handle_metrics, access_log=None, request_factory=request_factory(),
                                                  keepalive_timeout=settings.keepalive_timeout))
            await metrics.setup()
            await web.TCPSite(metrics, target[0], target[1]).start()
            self._runners.append(metrics)
            self.addresses["metrics"] = metrics.addresses[0][:2]
        self.ready = True

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout), close pools."""
        self.ready = False
        await cancel_and_wait(self._watch_task)
        # WebSocket clients are told first (1001, going away) so they reconnect elsewhere instead of
        # holding the drain open until its timeout.
        await self.events.stop()
        await self._close_fleet()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        waits = [runner.cleanup() for runner in self._runners]
        if self._front is not None:
            waits.append(self._front.shutdown(self.runtime.config.server.drain_timeout))
        await asyncio.gather(*waits)
        self._runners.clear()
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        try:
            await self.runtime.close()
            if self.spans is not None:
                await asyncio.to_thread(self.spans.shutdown)  # sends what is still queued
        finally:
            # Last: background work may finish a request while the table closes, and held counts
            # and log lines would otherwise wait for a timer the ending loop never runs.
            self.bus.deliver_waiting()

    # --- reload -----------------------------------------------------------------------------

    async def reload(self, source: str) -> list[str]:
        """Re-read the route table; swap it in whole, or keep the old one and return the problems."""
        async with self._reload_lock:
            path = self.runtime.config.source
            try:
                config = load_config(path, self.env)
            except ConfigError as exc:
                self.last_reload = {"at": self.clock.time(), "source": source, "ok": False}
                self.bus.emit(signals.ConfigReloaded(False, source, tuple(exc.problems)))
                return exc.problems
            self._config_digest = _digest(path)
            old = self.runtime
            kept_breakers = {}
            for upstream in config.upstreams():
                previous = old.upstream(upstream.name)
                if previous is not None and previous.breaker == upstream.breaker and upstream.name in old.breakers:
                    kept_breakers[upstream.name] = old.breakers[upstream.name]
            kept_budgets = {n: b for n, b in old.budgets.items() if n in kept_breakers}
            kept_latencies = {n: w for n, w in old.latencies.items() if n in kept_breakers}
            same_cache = config.cache == old.config.cache
            store = old.store if same_cache else None
            if self._front is not None:
                self._front.set_bounds(**_bounds(config.server))
            if config.server.listen != old.config.server.listen or \
                    config.server.metrics_listen != old.config.server.metrics_listen:
                log.warning("server.listen / metrics_listen changes take effect at the next restart", kind="reload")
            if config.tracing != old.config.tracing:
                log.warning("tracing changes take effect at the next restart", kind="reload")
            self.metrics.exposition.prefix = config.metrics.prefix
            runtime = Runtime(config, clock=self.clock, bus=self.bus, store=store,
                              transport=old.transport.with_settings(config.server, config.upstream_client),
                              breakers=kept_breakers, budgets=kept_budgets, latencies=kept_latencies, previous=old,
                              hit=self._hit, probe_lease=self._claim_probe)
            REDACTOR.add_secrets(config.secrets)
            removed_upstreams = {u.name for u in old.config.upstreams()} - {u.name for u in config.upstreams()}
            for name in removed_upstreams:
                upstream = old.upstream(name)
                if upstream is not None:
                    self.metrics.forget_provider(upstream.service, name)
                    self.stats.forget(name)
            for service in old.config.services.keys() - config.services.keys():
                self.metrics.forget_service(service)
                self.stats.forget_service(service)
            self._register(config, runtime.breakers)  # a replaced breaker starts CLOSED: say so
            self.runtime = runtime  # atomic for requests: each reads `runtime` once
            if _fleet_of(config.cache) != _fleet_of(old.config.cache):
                # Another Redis (or prefix, or none): rests and shared breakers follow the new table.
                await self._close_fleet()
                self._open_fleet(config)
                if self._fleet_link is not None and self.ready:
                    self._fleet_link.start()
            self.events.config_changed()
            if same_cache:
                for service in old.config.services.keys() - config.services.keys():
                    await store.purge(service)
            self._retire(old, keep_store=same_cache, keep_sessions={u.name for u in config.upstreams()})
            self.last_reload = {"at": self.clock.time(), "source": source, "ok": True}
            self.bus.emit(signals.ConfigReloaded(True, source))
            return []

    def _retire(self, old: Runtime, *, keep_store: bool, keep_sessions: set[str]) -> None:
        """Close what only the old table used, once the requests still running on it are done."""
        grace = max((s.deadline for s in old.config.services.values()), default=0.0) + old.config.server.drain_timeout

        async def retire() -> None:
            deadline = asyncio.get_running_loop().time() + grace
            while old.active and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            if not keep_store:
                await old.cache.close()
            await old.transport.close(keep=keep_sessions)

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def file_changed(self) -> bool:
        return _digest(self.runtime.config.source) != self._config_digest

    async def watch(self, interval: float = 2.0) -> None:
        """Poll the route table's content hash and reload when it changes (ConfigMap updates)."""
        while True:
            await asyncio.sleep(interval)
            if self.file_changed():
                await self.reload("file_change")
                self._config_digest = _digest(self.runtime.config.source)  # don't retry a bad file every poll

    def start_watching(self, interval: float = 2.0) -> None:
        self._watch_task = asyncio.get_running_loop().create_task(self.watch(interval))


def _fleet_of(cache: Any) -> tuple[Any, ...] | None:
    """Which fleet a cache section joins: the shared Redis and the key prefix, or None (memory)."""
    return (target_of(cache), cache.prefix) if cache.backend == "redis" else None


# Connections the proxy port takes by default: an idle one costs about 3 KiB in the process (more
# once aiohttp's), so 4096 stay small against the container's memory limit; and a quarter of the
# descriptors is left for upstream pools, Redis and files.
_DEFAULT_MAX_CONNECTIONS = 4096


def _fd_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connections_room() -> int:
    """Connections the fd limit leaves room for: three quarters of it."""
    return max(16, _fd_limit() * 3 // 4)


def default_max_connections() -> int:
    """`server.max_connections` when not set."""
    return min(_DEFAULT_MAX_CONNECTIONS, connections_room())


def _bounds(settings: ServerSettings) -> dict[str, Any]:
    """The lean front end's bounds from the server settings (see `LeanFront`)."""
    if settings.max_connections is not None and settings.max_connections > connections_room():
        log.warning("server.max_connections leaves too few file descriptors for upstream connections; "
                    "past the fd limit, new callers wait instead of idle connections being closed",
                    kind="connections", max_connections=settings.max_connections, fd_limit=_fd_limit())
    return {"header_timeout": settings.header_timeout, "keepalive_timeout": settings.keepalive_timeout,
            "max_connections": settings.max_connections or default_max_connections(),
            "lean": settings.front == "lean"}  # `server.front`: applies to the connections made from then on


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one where allowed; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit", kind="connections", soft=soft, hard=hard, error=str(exc))
    return _fd_limit()


def _digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


async def serve(config: Config, *, listen: tuple[str, int] | None = None,
                metrics_listen: tuple[str, int] | None = None) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the route table."""
    raise_fd_limit()  # before the default connection cap is sized from it
    process = ProxyProcess(config)
    await process.start(listen, metrics_listen if metrics_listen else True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task[list[str]]] = set()  # keep a reference, or the task may be collected mid-run

    def on_sighup() -> None:
        task = loop.create_task(process.reload("sighup"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    process.start_watching()
    announce(config, process.addresses.get("main"), process.addresses.get("metrics"))
    await stop.wait()
    log.info("draining: no new connections, finishing in-flight requests",
             drain_timeout=config.server.drain_timeout)
    await process.stop()
    log.info("stopped")
