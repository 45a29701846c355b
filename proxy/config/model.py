"""The validated route table as frozen, typed values: what the rest of the proxy reads.

Nothing here parses or checks: `proxy.config.parse` builds these from routes.yaml, and
`proxy.config.effective` prints them for `resilience-proxy check`. The printed form follows the
fields: a field shows up under its own name, in the order declared here, unless effective.py
renames, formats or hides it (see docs/config-internals.md, "Adding a config key").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

from proxy.adapters.quota import RateLimit
from proxy.adapters.vendor_codes import ResultCodes
from proxy.config.routing import MatchPattern, Template
from proxy.resilience.breaker_policy import PROFILES, BreakerPolicy
from proxy.resilience.hedging import HEDGE_AUTO, HedgePolicy
from proxy.resilience.retry_policy import POLICIES, RetryPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheRule:
    """How answers of a service or route are cached."""

    ttl: float = 0.0
    stale: float = 7 * 86400.0
    statuses: frozenset[int] = frozenset({200})
    vary: tuple[str, ...] = ()
    key_by_credential: bool = False
    # A copy past its ttl but inside its stale window is served after at most this long a wait for
    # its refresh, which goes on in the background; 0 serves it at once (stale-while-revalidate);
    # None waits for the refresh however long it takes and serves the copy only if it fails.
    stale_if_slow: float | None = 0.25
    coalesce: str = "local"  # local: one upstream call per replica; cluster: one per replicas sharing Redis

    @property
    def enabled(self) -> bool:
        return self.ttl > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AsWritten:
    """An upstream's url, query and headers as the file wrote them, each `${VAR}` shown as `***`.

    `check` prints these rather than the typed values: those hold the secrets themselves, and a
    query value decoded once, where the file may have written `%2F` or a bare number.
    """

    url: str | None = None                      # only when the URL had a ${VAR}; else the typed URL is shown
    query: tuple[tuple[str, Any], ...] = ()
    headers: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """One endpoint of a service (Envoy's *endpoint*), tried in list order."""

    name: str
    service: str
    url: URL
    path: Template | None
    query: tuple[tuple[str, Template], ...]
    headers: tuple[tuple[str, Template], ...]
    timeout: float
    breaker: BreakerPolicy
    retry: RetryPolicy
    hedge: HedgePolicy | None = HEDGE_AUTO       # when a late attempt is hedged to the next upstream; None: never
    result_codes: ResultCodes | None = None      # what codes inside its answers mean (200-with-error vendors)
    secret_query: frozenset[str] = frozenset()  # query names whose values came from ${VAR}
    secrets: frozenset[str] = frozenset()       # values from ${VAR} in its url, path, query, headers, keys
    transform: str | None = None                 # JMESPath normalising a JSON answer
    rate_limit: RateLimit | None = None
    keys: tuple[str, ...] = ()                   # API keys, used in order as {key}; rotated when refused
    key_cooldown: float = 3600.0                 # how long a refused key rests when no Retry-After says
    as_written: AsWritten = AsWritten()          # for `check`: url, query and headers with secrets masked

    @property
    def placeholders(self) -> frozenset[str]:
        """Every {name} its path, query and header templates need."""
        names = set(self.path.names if self.path else ())
        names.update(n for _, t in self.query for n in t.names)
        names.update(n for _, t in self.headers for n in t.names)
        return frozenset(names)


@dataclass(frozen=True, slots=True, kw_only=True)
class Watch:
    """Poll a route for subscribed topics and emit an event when the selected fields change."""

    interval: float
    fields: str                      # JMESPath selecting what counts as a change
    webhook: URL | None = None       # optional delivery of every event of this watch
    secret: str | None = None        # HMAC key for the webhook signature
    attempts: int = 5                # webhook attempts before the dead-letter stream
    topics: tuple[str, ...] = ()     # always polled, subscribers or not (for webhook-only consumers)


@dataclass(frozen=True, slots=True, kw_only=True)
class Derive:
    """A route answered from another route's answer plus a transform (no upstream call of its own)."""

    source: Template   # the other route's path, e.g. /fx/latest/{base}
    transform: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """A path pattern inside a service with its own cache rule and upstream paths."""

    name: str
    pattern: MatchPattern
    cache: CacheRule
    paths: Mapping[str, Template]
    derive: Derive | None = None
    watch: Watch | None = None
    queries: Mapping[str, tuple[tuple[str, Template], ...]] = field(default_factory=dict)  # per upstream, from `paths`
    skipped: frozenset[str] = frozenset()  # upstreams that do not serve this route (`paths: {name: off}`)


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """A logical API (Envoy's *cluster*) apps reach at `/<prefix>/...`."""

    name: str
    prefix: str
    deadline: float
    retry_non_idempotent: bool
    fallback_first: bool = True      # every upstream's first try before any retry (False: retries, then fallback)
    cache: CacheRule
    routes: tuple[Route, ...]
    upstreams: tuple[Upstream, ...]
    forward_headers: frozenset[str]  # lower-cased caller headers allowed through despite `strip_headers`

    def route_for(self, decoded_path: str) -> tuple[Route | None, dict[str, str]]:
        for route in self.routes:
            params = route.pattern.match(decoded_path)
            if params is not None:
                return route, params
        return None, {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Defaults:
    """Settings that `defaults`, a service and an upstream may each set: the nearest wins."""

    timeout: float = 5.0
    deadline: float = 15.0
    fallback_first: bool = True
    hedge: HedgePolicy | None = HEDGE_AUTO
    breaker: BreakerPolicy = PROFILES["STANDARD"]
    retry: RetryPolicy = POLICIES["DEFAULT"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudgetSettings:
    """`defaults.retry_budget`: retries allowed as a share of requests, across all upstreams."""

    enabled: bool = True
    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """`server:` the downstream listener and the limits on what callers send."""

    listen: tuple[str, int] = ("0.0.0.0", 8080)
    metrics_listen: tuple[str, int] | None = ("0.0.0.0", 9090)
    max_request_body: int = 10 * 1024 * 1024
    replay_buffer: int = 1024 * 1024
    max_header_bytes: int = 16 * 1024
    drain_timeout: float = 10.0
    strip_headers: frozenset[str] = frozenset({"cookie", "authorization"})
    max_response_buffer: int = 8 * 1024 * 1024
    header_timeout: float = 10.0     # a request's head must arrive whole within this (nginx client_header_timeout)
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this (nginx keepalive_timeout)
    max_connections: int | None = None  # open downstream connections; None: sized below the fd limit at start
    front: str = "lean"  # who parses the proxy port's requests: "lean" (plain GETs ours) or "aiohttp" (all)


@dataclass(frozen=True, slots=True, kw_only=True)
class SentinelSettings:
    """`cache.sentinel`: the Sentinels to ask and the master's name there."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    password: str = ""  # the data nodes' password
    sentinel_password: str = ""  # the Sentinels' own (`requirepass` on them); empty: they are asked without one


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """`cache.tls`: files for a `rediss://` connection (`check` makes sure they exist)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSettings:
    """`cache:` where answers are kept (memory or Redis) and how much of them."""

    backend: str = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    max_stale: float = 7 * 86400.0
    max_bytes: int = 64 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    prefix: str = "rp:"
    op_timeout: float = 0.05
    local_ttl: float = 1.0
    cluster: bool = False                     # url is a seed node of a Redis Cluster
    sentinel: SentinelSettings | None = None  # the master is whichever the Sentinels name (url unused)
    tls: TlsSettings | None = None            # files for rediss://


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsSettings:
    """The outbox and WebSocket delivery of watch events."""

    stream: str = "events"           # Redis stream name (under cache.prefix); one per deployment
    maxlen: int = 100_000            # the outbox keeps about this many events
    ack_timeout: float = 30.0        # unacknowledged events are sent again after this (then backing off)
    client_queue: int = 1000         # events waiting for one client; past it the client is told and closed
    max_frame: int = 64 * 1024       # largest frame a client may send
    max_topics: int = 1000           # topics watched at once (each is an upstream call per interval)
    max_topics_per_connection: int = 100  # topics one WebSocket connection may hold
    max_topics_per_peer: int = 250   # distinct topics one client address may hold across its connections


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSettings:
    """`metrics:` how the metrics port names what it exports."""

    prefix: str = ""  # prepended to every metric name, with `_`, on the metrics port


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSettings:
    """`tracing:` where spans go (docs/observability.md)."""

    otlp_endpoint: str | None = None  # OTLP/HTTP traces URL (`/v1/traces` added to a bare origin); None: off
    service_name: str = "resilience-proxy"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A complete, validated route table."""

    source: str
    server: ServerSettings
    cache: CacheSettings
    defaults: Defaults = Defaults()
    retry_budget: RetryBudgetSettings
    services: Mapping[str, Service]
    events: EventsSettings = EventsSettings()
    upstream_client: str = "http1"  # who speaks HTTP to upstreams: "http1" (ours) or "aiohttp" (its ClientSession)
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    secrets: frozenset[str] = frozenset()
    effective: Mapping[str, Any] = field(default_factory=dict)  # for `check`, secrets masked

    def watched_routes(self) -> list[tuple[Service, Route]]:
        return [(s, r) for s in self.services.values() for r in s.routes if r.watch is not None]

    def upstreams(self) -> list[Upstream]:
        return [u for s in self.services.values() for u in s.upstreams]

    def service_for(self, decoded_path: str) -> Service | None:
        for service in self.services.values():
            if service.prefix == "/" or decoded_path == service.prefix or decoded_path.startswith(service.prefix + "/"):
                return service
        return None
