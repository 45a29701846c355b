"""routes.yaml → frozen, typed config, or every problem as `file:line: message`.

The whole file is checked before anything is built, so a bad file never half-applies:
`load_config` either returns a complete `Config` or raises `ConfigError` listing all
problems it found (not only the first).
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote

from redis.asyncio.connection import Connection as RedisConnection
from redis.asyncio.connection import parse_url as parse_redis_url
from yarl import URL

from proxy.adapters.quota import DailyReset, RateLimit
from proxy.adapters.transform import check_expression
from proxy.adapters.transform import placeholders as expression_placeholders
from proxy.adapters.vendor_codes import MEANINGS, Meaning, ResultCodes
from proxy.config.routing import MatchPattern, Template, prefixes_overlap
from proxy.config.telemetry import MetricsSettings, TracingSettings, parse_metrics, parse_tracing
from proxy.config.telemetry import effective as telemetry_effective
from proxy.config.yaml_source import MAX_BYTES, LineDict, LineList, Substituted, line_of, load
from proxy.masking import Masker
from proxy.resilience.breaker import PROFILES, BreakerPolicy
from proxy.resilience.hedging import HEDGE_AUTO, HedgePolicy
from proxy.resilience.outcome import RETRY_CLASSES
from proxy.resilience.retry_policy import POLICIES, RetryPolicy

# --- value types ------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3, None: 1}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}\Z")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# Nothing the proxy times needs longer; far larger values overflow clocks, dates and Redis TTLs.
MAX_DURATION = 3650 * 86400.0
MAX_SIZE = 1024**4     # 1 TiB: sizes past it are typing mistakes, and overflow what they are handed to
MAX_COUNT = 10**9      # the same for counts (thresholds, queue lengths, topics)
_CONTROL = {code: repr(chr(code))[1:-1] for code in (*range(0x20), 0x7F)}  # shown escaped in messages
RESERVED_PREFIXES = ("/health", "/metrics", "/events")
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})


class ConfigError(Exception):
    """The route table is invalid; `problems` holds one `file:line: message` per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: Any) -> float:
    """`500ms`, `30s`, `5m`, `1h`, `7d` or a number of seconds → seconds, at most `MAX_DURATION`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 30s, 5m, 1h, 7d")
    seconds: float | None = None
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        seconds = float(value)
    elif isinstance(value, str):
        found = _DURATION.match(value)
        if found:
            seconds = float(found.group(1)) * _DURATION_UNITS[found.group(2)]
    if seconds is None:
        raise ValueError(f"bad duration {value!r}: use 500ms, 30s, 5m, 1h, 7d or a number of seconds")
    if not seconds <= MAX_DURATION:  # NaN too
        raise ValueError(f"bad duration {value!r}: at most 3650d")
    return seconds


def parse_size(value: Any) -> int:
    """`512KiB`, `1MiB`, `10MB` or a number of bytes → bytes, at most `MAX_SIZE`."""
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    elif isinstance(value, str):
        found = _SIZE.match(value)
        if found:
            unit = found.group(2).lower() if found.group(2) else None
            size = int(found.group(1)) * _SIZE_UNITS[unit]
    if size is None:
        raise ValueError(f"bad size {value!r}: use a number of bytes or 512KiB, 1MiB, 10MB")
    if size > MAX_SIZE:
        raise ValueError(f"bad size {value!r}: at most 1TiB")
    return size


_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?\Z")


def valid_host(host: str) -> bool:
    """An IP address or a host name (letters, digits, `-` and `_` in dot-separated labels), not a mistyped IPv4."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return len(host) <= 253 and bool(_HOSTNAME.match(host)) and not host.rstrip(".").replace(".", "").isdigit()


def parse_listen(value: Any) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or `:PORT` → (host, port)."""
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT")
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"bad listen address {value!r}: expected HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port {port} in {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host and not valid_host(host):
        raise ValueError(f"bad listen address {value!r}: {host!r} is neither an IP address nor a host name")
    return host or "0.0.0.0", port


# --- typed config ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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
    secret_query: frozenset[str] = frozenset()  # query names whose values came from ${VAR}
    secrets: frozenset[str] = frozenset()       # values from ${VAR} in its url, path, query, headers, keys
    transform: str | None = None                 # JMESPath normalising a JSON answer
    rate_limit: RateLimit | None = None
    keys: tuple[str, ...] = ()                   # API keys, used in order as {key}; rotated when refused
    key_cooldown: float = 3600.0                 # how long a refused key rests when no Retry-After says
    hedge: HedgePolicy | None = HEDGE_AUTO       # when a late attempt is hedged to the next upstream; None: never
    result_codes: ResultCodes | None = None      # what codes inside its answers mean (200-with-error vendors)

    @property
    def placeholders(self) -> frozenset[str]:
        """Every {name} its path, query and header templates need."""
        names = set(self.path.names if self.path else ())
        names.update(n for _, t in self.query for n in t.names)
        names.update(n for _, t in self.headers for n in t.names)
        return frozenset(names)


@dataclass(frozen=True, slots=True)
class Route:
    """A path pattern inside a service with its own cache rule and upstream paths."""

    name: str
    pattern: MatchPattern
    cache: CacheRule
    paths: Mapping[str, Template]
    derive: "Derive | None" = None
    watch: Watch | None = None
    queries: Mapping[str, tuple[tuple[str, Template], ...]] = field(default_factory=dict)  # per upstream, from `paths`
    skipped: frozenset[str] = frozenset()  # upstreams that do not serve this route (`paths: {name: off}`)


@dataclass(frozen=True, slots=True)
class Watch:
    """Poll a route for subscribed topics and emit an event when the selected fields change."""

    interval: float
    fields: str                      # JMESPath selecting what counts as a change
    webhook: URL | None = None       # optional delivery of every event of this watch
    secret: str | None = None        # HMAC key for the webhook signature
    attempts: int = 5                # webhook attempts before the dead-letter stream
    topics: tuple[str, ...] = ()     # always polled, subscribers or not (for webhook-only consumers)


@dataclass(frozen=True, slots=True)
class Derive:
    """A route answered from another route's answer plus a transform (no upstream call of its own)."""

    source: Template   # the other route's path, e.g. /fx/latest/{base}
    transform: str


@dataclass(frozen=True, slots=True)
class Service:
    """A logical API (Envoy's *cluster*) apps reach at `/<prefix>/...`."""

    name: str
    prefix: str
    upstreams: tuple[Upstream, ...]
    routes: tuple[Route, ...]
    cache: CacheRule
    deadline: float
    retry_non_idempotent: bool
    forward_headers: frozenset[str]  # lower-cased caller headers allowed through despite `strip_headers`
    fallback_first: bool = True      # every upstream's first try before any retry (False: retries, then fallback)

    def route_for(self, decoded_path: str) -> tuple[Route | None, dict[str, str]]:
        for route in self.routes:
            params = route.pattern.match(decoded_path)
            if params is not None:
                return route, params
        return None, {}


@dataclass(frozen=True, slots=True)
class RetryBudgetSettings:
    enabled: bool = True
    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class ServerSettings:
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


@dataclass(frozen=True, slots=True)
class CacheSettings:
    backend: str = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    max_stale: float = 7 * 86400.0
    max_bytes: int = 64 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    prefix: str = "rp:"
    op_timeout: float = 0.05
    local_ttl: float = 1.0


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Config:
    """A complete, validated route table."""

    source: str
    server: ServerSettings
    cache: CacheSettings
    services: Mapping[str, Service]
    retry_budget: RetryBudgetSettings
    events: EventsSettings = EventsSettings()
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


# --- validation ----------------------------------------------------------------------------

class _Checker:
    """Walks the parsed YAML, collecting problems with their lines instead of stopping at the first."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[tuple[int, str]] = []
        self.secrets: set[str] = set()
        self.masker = Masker()  # every value from the environment: no message quotes one

    def problem(self, line: int, message: str) -> None:
        self.problems.append((line, message))

    def mapping(self, value: Any, where: str, line: int) -> LineDict | None:
        if value is None:
            empty = LineDict()
            empty.line, empty.key_lines = line, {}
            return empty
        if not isinstance(value, LineDict):
            self.problem(line, f"{where}: expected a mapping, got {_type_name(value)}")
            return None
        return value

    def known_keys(self, data: LineDict, allowed: set[str], where: str) -> None:
        for key in data:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.problem(line_of(data, key), f"{where}: unknown key {key!r} (allowed: {hint})")

    def get(self, data: LineDict, key: str, where: str, convert: Callable[[Any], Any], default: Any) -> Any:
        if key not in data:
            return default
        try:
            return convert(data[key])
        except (ValueError, TypeError) as exc:
            self.problem(line_of(data, key), f"{where}.{key}: {exc}")
            return default

    def secret(self, value: Any) -> None:
        # A key pasted percent-encoded is sent decoded (then encoded once): both forms are secrets.
        self.secrets.update(form for v in environment_values(value) for form in (v, decoded_once(v)))


_SECRET_MIN = 4  # shorter values are not masked: hiding every "1" or "ab" would garble every line


def environment_values(value: Any) -> set[str]:
    """The values `${VAR}` substituted anywhere in `value` (a scalar, mapping or list), long enough to mask."""
    if isinstance(value, Substituted):
        return {v for v in value.values if len(v) >= _SECRET_MIN}
    if isinstance(value, dict):
        return environment_values(list(value)) | environment_values(list(value.values()))
    if isinstance(value, list):
        return set().union(*map(environment_values, value))
    return set()


def _type_name(value: Any) -> str:
    return {LineDict: "a mapping", LineList: "a list", str: "a string", Substituted: "a string",
            int: "a number", float: "a number", bool: "a boolean", type(None): "nothing"}.get(type(value), type(value).__name__)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_type_name(value)}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {_type_name(value)}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise ValueError(f"expected a whole number from 1 to {MAX_COUNT}, got {value!r}")
    return value


def _retry_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise ValueError(f"expected 0..20 retries, got {value!r}")
    return value


def _non_negative(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_COUNT:  # NaN too
        raise ValueError(f"expected a number from 0 to {MAX_COUNT}, got {value!r}")
    return float(value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {_type_name(value)}")
    if isinstance(value, (int, float)) and value > 1:
        value = value / 100.0  # 50 means 50 %
    if not 0 < value <= 1:
        raise ValueError(f"expected a rate between 0 and 1 (or a percent), got {value!r}")
    return float(value)


def _off(value: Any) -> bool:
    """`off` (or false): a setting that is switched off rather than given a value."""
    return value is False or (isinstance(value, str) and value.strip().lower() == "off")


def _status_list(value: Any) -> frozenset[int]:
    if not isinstance(value, list) or not value:
        raise TypeError("expected a list of HTTP status codes")
    codes = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
            raise ValueError(f"bad HTTP status {item!r}")
        codes.add(item)
    return frozenset(codes)


def _name_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and _HEADER_NAME.match(v) for v in value):
        raise TypeError("expected a list of header names")
    return tuple(v.lower() for v in value)


_BAD = object()  # what `check.get` hands back for a value it reported


def _changes(check: _Checker, data: LineDict, where: str, fields: tuple[tuple[str, Callable[[Any], Any]], ...]) -> dict[str, Any]:
    """The fields a mapping sets, converted; a bad value is reported and left out."""
    changes: dict[str, Any] = {}
    for key, convert in fields:
        if key in data:
            converted = check.get(data, key, where, convert, _BAD)
            if converted is not _BAD:
                changes[key] = converted
    return changes


def _named_or_custom(check: _Checker, value: Any, where: str, line: int, base: Any, *, named: Mapping[str, Any],
                     kind: str, start_key: str, fields: tuple[tuple[str, Callable[[Any], Any]], ...]) -> Any:
    """A breaker profile or retry policy: a name, or a mapping of fields (optionally starting from a name)."""
    if isinstance(value, str):
        if value.upper() not in named:
            check.problem(line, f"{where}: unknown {kind} {value!r} (use {', '.join(named)} or a mapping)")
            return base
        return named[value.upper()]
    data = check.mapping(value, where, line)
    if data is None:
        return base
    check.known_keys(data, {start_key, *(key for key, _ in fields)}, where)
    start = base
    if start_key in data:
        start = _named_or_custom(check, data[start_key], f"{where}.{start_key}", line_of(data, start_key), base,
                                 named=named, kind=kind, start_key=start_key, fields=fields)
    try:
        return replace(start, **_changes(check, data, where, fields))
    except (ValueError, TypeError) as exc:
        check.problem(line, f"{where}: {exc}")
        return base


def _fraction_or_off(value: Any) -> float | None:
    """A rate, or `off` to turn a rate-based trip off."""
    return None if _off(value) else _fraction(value)


_BREAKER_FIELDS = (("fail_threshold", _positive_int), ("open_timeout", parse_duration),
                   ("half_open_max_calls", _positive_int), ("failure_rate", _fraction_or_off),
                   ("window", parse_duration), ("min_calls", _positive_int), ("min_failures", _positive_int),
                   ("slow_call_duration", parse_duration), ("slow_call_rate", _fraction),
                   ("trip_on_429", _boolean), ("trip_on_refused", _boolean), ("max_rest", parse_duration))


def _breaker(check: _Checker, value: Any, where: str, line: int, base: BreakerPolicy) -> BreakerPolicy:
    return _named_or_custom(check, value, where, line, base, named=PROFILES, kind="breaker profile",
                            start_key="profile", fields=_BREAKER_FIELDS)


def _retry_on(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise TypeError(f"expected a list of {', '.join(RETRY_CLASSES)} or status codes")
    names = set()
    for item in value:
        text = str(item).lower() if not isinstance(item, bool) else ""
        if text in RETRY_CLASSES or (text.isdigit() and 500 <= int(text) <= 599) or text == "429":
            names.add(text)
        else:
            raise ValueError(f"bad retry_on entry {item!r}: use {', '.join(RETRY_CLASSES)} or a 5xx/429 status")
    return frozenset(names)


_RETRY_FIELDS = (("retries", _retry_count), ("base_delay", parse_duration), ("max_delay", parse_duration),
                 ("retry_on", _retry_on))


def _retry(check: _Checker, value: Any, where: str, line: int, base: RetryPolicy) -> RetryPolicy:
    return _named_or_custom(check, value, where, line, base, named=POLICIES, kind="retry policy",
                            start_key="policy", fields=_RETRY_FIELDS)


_CACHE_RULE_KEYS = {"ttl", "stale", "statuses", "vary", "key_by_credential", "stale_while_revalidate",
                    "stale_if_slow", "coalesce"}


def _stale_if_slow(value: Any) -> float | None:
    """A duration (0: serve the stale copy at once), or `off`: wait for the refresh however long it takes."""
    return None if _off(value) else parse_duration(value)


def _hedge_after(value: Any) -> HedgePolicy | None:
    """`auto` (the upstream's recent p95, at least 100 ms), a duration, or `off`."""
    if _off(value):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return HEDGE_AUTO
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("expected auto, off or a duration above 0")
    return HedgePolicy(after=seconds)


def _coalesce_mode(value: Any) -> str:
    if value not in ("local", "cluster"):
        raise ValueError(f"expected local or cluster, got {value!r}")
    return value


def _cache_rule(check: _Checker, value: Any, where: str, line: int, base: CacheRule, cache: CacheSettings) -> CacheRule:
    data = check.mapping(value, where, line)
    if data is None:
        return base
    check.known_keys(data, _CACHE_RULE_KEYS, where)
    rule = replace(base, **_changes(check, data, where, (
        ("ttl", parse_duration), ("stale", parse_duration), ("statuses", _status_list), ("vary", _name_list),
        ("key_by_credential", _boolean), ("coalesce", _coalesce_mode))))
    if "stale_while_revalidate" in data and "stale_if_slow" in data:
        check.problem(line_of(data, "stale_while_revalidate"), f"{where}: set stale_if_slow or stale_while_revalidate, "
                      "not both (stale_while_revalidate: true is stale_if_slow: 0, false is stale_if_slow: off)")
    elif "stale_while_revalidate" in data:
        revalidate = check.get(data, "stale_while_revalidate", where, _boolean, None)
        if revalidate is not None:
            rule = replace(rule, stale_if_slow=0.0 if revalidate else None)
    elif "stale_if_slow" in data:
        rule = replace(rule, stale_if_slow=check.get(data, "stale_if_slow", where, _stale_if_slow, rule.stale_if_slow))
    max_stale = cache.max_stale
    if rule.stale > max_stale:
        check.problem(line_of(data, "stale"), f"{where}.stale: {rule.stale:g}s is longer than cache.max_stale ({max_stale:g}s)")
        rule = replace(rule, stale=max_stale)
    if "coalesce" in data and rule.coalesce == "cluster" and cache.backend != "redis":
        check.problem(line_of(data, "coalesce"), f"{where}.coalesce: cluster needs cache.backend: redis (replicas share the lock there)")
    return rule


# What a URL path may carry literally (RFC 3986 pchar and /), an escape, or a {placeholder}.
_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2}|\{[A-Za-z_][A-Za-z0-9_]*\})*\Z")


def _upstream_path(value: Any) -> str:
    """A path template: absolute, and nothing a request line cannot carry (a space: use %20)."""
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError("must start with /")
    if not _PATH.match(text):
        raise ValueError(f"{text!r} has characters a URL path cannot carry (percent-encode them, e.g. %20)")
    return text


def _has_control(text: str) -> bool:
    """A control character other than a tab (which header values and YAML may hold)."""
    return any(ord(char) < 0x20 and char != "\t" or char == "\x7f" for char in text)


def _upstream_url(value: Any) -> URL:
    text = _string(value)
    if any(char.isspace() or _has_control(char) for char in text):
        raise ValueError(f"bad URL {text!r}: whitespace or a control character (yarl would drop some silently)")
    try:
        url = URL(text)
        port = url.port
    except ValueError as exc:
        raise ValueError(f"bad URL {text!r}: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"upstream URL must be http:// or https://, got {text!r}")
    if not url.host:
        raise ValueError(f"upstream URL has no host: {text!r}")
    if not valid_host(url.raw_host or "") or port == 0:  # raw_host: an international name in its IDNA form
        raise ValueError(f"bad URL {text!r}: {url.host!r} port {port} is no address to connect to")
    if url.user or url.password:
        raise ValueError("credentials in the upstream URL are not allowed; use headers with ${VAR}")
    if url.query_string or url.fragment:
        raise ValueError("the upstream URL must not carry a query or fragment; use `query:`")
    return url


def _password(url: str) -> str:
    """The password in a Redis URL, "" when there is none (or the URL does not parse)."""
    try:
        return URL(url).password or ""
    except ValueError:
        return ""


def _redis_url_problem(url: str) -> str | None:
    """Why redis-py would fail on `url` at start or at every call, found now; None when it would not."""
    if url.partition("://")[0] not in ("redis", "rediss", "unix"):
        return "expected a redis://, rediss:// or unix:// URL"
    try:
        parsed = URL(url)
        port = parsed.port
        options = parse_redis_url(url)  # redis-py's own reading, as Redis.from_url makes it
    except (ValueError, TypeError) as exc:
        return f"bad URL: {exc}"
    if parsed.scheme == "unix":
        if not parsed.path or parsed.path == "/":
            return "a unix:// URL names the socket's path"
    elif not parsed.host or not valid_host(parsed.raw_host or "") or port == 0:
        return f"{parsed.host!r} port {port} is no address to connect to"
    elif parsed.path not in ("", "/") and not (parsed.path[1:].isdigit() and parsed.path[1:].isascii()):
        return f"the database after the host is a number such as /0, got {parsed.path!r}"
    unknown = set(parsed.query) - _connection_options(options.get("connection_class", RedisConnection))
    if unknown:
        return f"unknown connection option {sorted(unknown)[0]!r}"
    return None


@functools.cache
def _connection_options(connection_class: type) -> frozenset[str]:
    """The keywords a redis-py connection class takes: what a URL's query may set."""
    names: set[str] = set()
    for klass in connection_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(p.name for p in inspect.signature(init).parameters.values()
                         if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    return frozenset(names - {"self"})


def _templates(check: _Checker, value: Any, where: str, line: int, *, headers: bool) -> tuple[tuple[tuple[str, Template], ...], set[str]]:
    data = check.mapping(value, where, line)
    if data is None:
        return (), set()
    items: list[tuple[str, Template]] = []
    secret_names: set[str] = set()
    for key, raw in data.items():
        key_line = line_of(data, key)
        if headers and not _HEADER_NAME.match(key):
            check.problem(key_line, f"{where}: bad header name {key!r}")
            continue
        if headers and key.lower() in HOP_BY_HOP | {"host", "content-length"}:
            check.problem(key_line, f"{where}: header {key!r} is managed by the proxy and cannot be set")
            continue
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            check.problem(key_line, f"{where}.{key}: expected a string, got {_type_name(raw)}")
            continue
        text = raw if isinstance(raw, str) else str(raw)
        if headers and ("\r" in text or "\n" in text):
            check.problem(key_line, f"{where}.{key}: header values cannot contain line breaks")
            continue
        if headers and _has_control(text):
            check.problem(key_line, f"{where}.{key}: header values cannot contain control characters")
            continue
        if not headers:
            text = decoded_once(text)  # a query value is sent percent-encoded once, however it was written
        check.secret(raw)
        if isinstance(raw, Substituted):
            secret_names.add(key)
        items.append((key, Template.parse(text)))
    return tuple(items), secret_names


def _route_path(check: _Checker, text: str, where: str, line: int) -> tuple[Template, tuple[tuple[str, Template], ...]]:
    """A route's path for one upstream, and the query written after its `?` (read as a URL's: decoded once)."""
    path, _, query = text.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        check.problem(line, f"{where}: the query after ? must be name=value pairs joined by &")
        pairs = []
    return Template.parse(path), tuple((name, Template.parse(value)) for name, value in pairs)


def decoded_once(text: str) -> str:
    """`text` percent-decoded once if it holds escapes (a key pasted in its "encoded" form), else as it is.

    The URL encodes it once again when it is sent, so both forms of a key give the same request.
    """
    if not _ESCAPE.search(text):
        return text
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        return text  # escapes that are not UTF-8 text: not an encoded key, keep what was written


_RESULT_CODES_KEYS = {"code", "message", "codes", "daily_reset"}


def _result_codes(check: _Checker, value: Any, where: str, line: int) -> ResultCodes | None:
    """`result_codes: {code, message, codes: {"00": success, ...}, daily_reset}`."""
    data = check.mapping(value, where, line)
    if data is None:
        return None
    check.known_keys(data, _RESULT_CODES_KEYS, where)
    code = check.get(data, "code", where, _string, None)
    message = check.get(data, "message", where, _string, None)
    for key, expression in (("code", code), ("message", message)):
        problem = check_expression(expression, set()) if expression is not None else None
        if problem:
            check.problem(line_of(data, key), f"{where}.{key}: {problem}")
    if "code" not in data:
        check.problem(line, f"{where}: `code` is required (a JMESPath to the code in the answer, "
                            "such as response.header.resultCode)")
    meanings: dict[str, Meaning] = {}
    codes = check.mapping(data.get("codes"), f"{where}.codes", line_of(data, "codes") if "codes" in data else line)
    if codes is not None and not codes:
        check.problem(line_of(data, "codes") if "codes" in data else line,
                      f"{where}.codes: expected a mapping of code to meaning, such as \"00\": success")
    for value_code, meaning in (codes or {}).items():
        if meaning not in {m.value for m in Meaning}:
            check.problem(line_of(codes, value_code), f"{where}.codes.{value_code}: unknown meaning {meaning!r} "
                                                      f"(use {MEANINGS})")
        elif value_code.strip() != value_code or not value_code:
            check.problem(line_of(codes, value_code), f"{where}.codes: code {value_code!r} has spaces around it; "
                                                      "codes are matched as the answer gives them, trimmed")
        else:
            meanings[value_code] = Meaning(meaning)
    reset = check.get(data, "daily_reset", where, DailyReset.parse, None)
    if code is None:
        return None
    return ResultCodes(code=code, meanings=meanings, message=message, daily_reset=reset)


def _key_query(query: tuple[tuple[str, Template], ...]) -> frozenset[str]:
    """Query parameters filled with {key}: their values are API keys, masked in logs."""
    return frozenset(name for name, template in query if "key" in template.names)


def _derive(check: _Checker, value: Any, where: str, line: int, pattern: MatchPattern) -> Derive | None:
    data = check.mapping(value, where, line)
    if data is None:
        return None
    check.known_keys(data, {"from", "transform"}, where)
    source = check.get(data, "from", where, _string, None)
    transform = check.get(data, "transform", where, _string, None)
    if source is None or transform is None:
        check.problem(line, f"{where}: both `from` (a path of another route) and `transform` are required")
        return None
    template = Template.parse(source)
    for missing in sorted(set(template.names) - set(pattern.names)):
        check.problem(line_of(data, "from"), f"{where}.from: {{{missing}}} is not in this route's match")
    problem = check_expression(transform, set(pattern.names))
    if problem:
        check.problem(line_of(data, "transform"), f"{where}.transform: {problem}")
    return Derive(source=template, transform=transform)


def _masked(value: Any) -> Any:
    return value.masked if isinstance(value, Substituted) else value


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a route table file; raises ConfigError with every problem found."""
    filename = str(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)  # never more: a huge file is refused, not read whole
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{filename}:1: cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{filename}:{line}: the file is not UTF-8 text"]) from None
    return parse_config(text, filename, os.environ if env is None else env)


def parse_config(text: str, filename: str, env: Mapping[str, str]) -> Config:
    """Validate route table text (see `load_config`)."""
    document, yaml_problems = load(text, env)
    return check_document(document, filename, yaml_problems)


def check_document(document: Any, filename: str, yaml_problems: list[tuple[int, str]]) -> Config:
    """Validate a route table as `yamlsrc.load` read it (its document and problems); see `load_config`."""
    check = _Checker(filename)
    check.problems.extend(yaml_problems)
    check.masker = Masker(environment_values(document))
    if document is None:
        if not check.problems:
            check.problem(1, "the file holds no route table (`null`): expected a mapping starting with `version: 1`")
        raise ConfigError(_format(check))
    root = check.mapping(document, "the file", 1)
    if root is None:
        raise ConfigError(_format(check))
    check.known_keys(root, {"version", "server", "cache", "defaults", "services", "events", "metrics", "tracing"},
                     "top level")
    effective: dict[str, Any] = {"version": 1}

    if root.get("version") != 1 or isinstance(root.get("version"), bool):
        check.problem(line_of(root, "version") if "version" in root else 1,
                      f"version: expected 1, got {root.get('version')!r}" if "version" in root else "version: missing (use `version: 1`)")

    # server
    server_data = check.mapping(root.get("server"), "server", line_of(root, "server"))
    server = ServerSettings()
    if server_data is not None:
        check.known_keys(server_data, {"listen", "metrics_listen", "max_request_body", "replay_buffer",
                                       "max_header_bytes", "drain_timeout", "strip_headers", "max_response_buffer",
                                       "header_timeout", "keepalive_timeout", "max_connections"}, "server")
        metrics_listen = server.metrics_listen
        if "metrics_listen" in server_data:
            metrics_listen = None if server_data["metrics_listen"] in (None, False, "off") else \
                check.get(server_data, "metrics_listen", "server", parse_listen, server.metrics_listen)
        server = ServerSettings(
            listen=check.get(server_data, "listen", "server", parse_listen, server.listen),
            metrics_listen=metrics_listen,
            max_request_body=check.get(server_data, "max_request_body", "server", parse_size, server.max_request_body),
            replay_buffer=check.get(server_data, "replay_buffer", "server", parse_size, server.replay_buffer),
            max_header_bytes=check.get(server_data, "max_header_bytes", "server", _header_budget, server.max_header_bytes),
            drain_timeout=check.get(server_data, "drain_timeout", "server", parse_duration, server.drain_timeout),
            strip_headers=frozenset(check.get(server_data, "strip_headers", "server", _name_list, tuple(server.strip_headers))),
            max_response_buffer=check.get(server_data, "max_response_buffer", "server", parse_size, server.max_response_buffer),
            header_timeout=check.get(server_data, "header_timeout", "server", parse_duration, server.header_timeout),
            keepalive_timeout=check.get(server_data, "keepalive_timeout", "server", parse_duration, server.keepalive_timeout),
            max_connections=check.get(server_data, "max_connections", "server", _positive_int, server.max_connections),
        )
        for key in ("header_timeout", "keepalive_timeout"):
            if not 0 < getattr(server, key) <= 86400:
                check.problem(line_of(server_data, key), f"server.{key}: must be more than 0s and at most 1d")
        if server.metrics_listen is not None and server.metrics_listen[1] == server.listen[1] != 0:
            check.problem(line_of(server_data, "metrics_listen"), "server.metrics_listen: must use another port than server.listen")
    effective["server"] = {
        "listen": f"{server.listen[0]}:{server.listen[1]}",
        "metrics_listen": None if server.metrics_listen is None else f"{server.metrics_listen[0]}:{server.metrics_listen[1]}",
        "max_request_body": server.max_request_body, "replay_buffer": server.replay_buffer,
        "max_header_bytes": server.max_header_bytes, "drain_timeout": server.drain_timeout,
        "strip_headers": sorted(server.strip_headers), "max_response_buffer": server.max_response_buffer,
        "header_timeout": server.header_timeout, "keepalive_timeout": server.keepalive_timeout,
        "max_connections": server.max_connections,
    }

    # cache
    cache_data = check.mapping(root.get("cache"), "cache", line_of(root, "cache"))
    cache = CacheSettings()
    if cache_data is not None:
        check.known_keys(cache_data, {"backend", "url", "max_stale", "max_bytes", "max_body_bytes", "prefix",
                                      "op_timeout", "local_ttl"}, "cache")
        backend = check.get(cache_data, "backend", "cache", _string, cache.backend)
        if backend not in ("memory", "redis"):
            check.problem(line_of(cache_data, "backend"), f"cache.backend: expected memory or redis, got {backend!r}")
            backend = "memory"
        url = check.get(cache_data, "url", "cache", _string, cache.url)
        problem = _redis_url_problem(url) if backend == "redis" else None
        if problem is not None:
            check.problem(line_of(cache_data, "url") if "url" in cache_data else line_of(root, "cache"),
                          f"cache.url: {problem}")
        if isinstance(cache_data.get("url"), Substituted):
            check.secret(_password(url))
        cache = CacheSettings(
            backend=backend, url=url,
            max_stale=check.get(cache_data, "max_stale", "cache", parse_duration, cache.max_stale),
            max_bytes=check.get(cache_data, "max_bytes", "cache", _positive_size, cache.max_bytes),
            max_body_bytes=check.get(cache_data, "max_body_bytes", "cache", parse_size, cache.max_body_bytes),
            prefix=check.get(cache_data, "prefix", "cache", _string, cache.prefix),
            op_timeout=check.get(cache_data, "op_timeout", "cache", _positive_duration, cache.op_timeout),
            local_ttl=check.get(cache_data, "local_ttl", "cache", parse_duration, cache.local_ttl),
        )
    masked_url = str(URL(cache.url).with_password("***")) if _password(cache.url) else cache.url
    effective["cache"] = {"backend": cache.backend, "url": masked_url, "max_stale": cache.max_stale,
                          "max_bytes": cache.max_bytes, "max_body_bytes": cache.max_body_bytes, "prefix": cache.prefix}

    # defaults
    defaults_data = check.mapping(root.get("defaults"), "defaults", line_of(root, "defaults"))
    defaults = _Nearest()
    budget = RetryBudgetSettings()
    if defaults_data is not None:
        check.known_keys(defaults_data, _NEAREST_KEYS | {"retry_budget"}, "defaults")
        defaults = _nearest(check, defaults_data, "defaults", defaults)
        if "retry_budget" in defaults_data:
            budget = _budget(check, defaults_data["retry_budget"], line_of(defaults_data, "retry_budget"))

    # services
    services: dict[str, Service] = {}
    upstream_lines: dict[str, int] = {}
    services_data = check.mapping(root.get("services"), "services", line_of(root, "services"))
    if services_data is not None and not services_data:
        check.problem(line_of(root, "services") if "services" in root else 1, "services: at least one service is needed")
    effective_services: dict[str, Any] = {}
    for service_name, service_value in (services_data or {}).items():
        service_line = line_of(services_data, service_name)
        where = f"services.{service_name}"
        if not _NAME.match(service_name):
            check.problem(service_line, f"{where}: service names are letters, digits, _ and - (starting with a letter)")
            continue
        data = check.mapping(service_value, where, service_line)
        if data is None:
            continue
        service = _service(check, service_name, data, where, service_line, cache, defaults, upstream_lines)
        if service is None:
            continue
        for other in services.values():
            if prefixes_overlap(other.prefix, service.prefix):
                check.problem(line_of(data, "prefix") if "prefix" in data else service_line,
                              f"{where}.prefix: {service.prefix!r} overlaps the prefix {other.prefix!r} of service {other.name!r}")
        services[service_name] = service
        if not check.problems:  # only a valid table's is printed; a refused one's parts may have any shape
            effective_services[service_name] = _effective_service(service, data)

    effective["defaults"] = {"timeout": defaults.timeout, "deadline": defaults.deadline,
                             "fallback_before_retry": defaults.fallback_first, "hedge_after": _hedge_text(defaults.hedge),
                             "retry_budget": {"enabled": budget.enabled, "ratio": budget.ratio,
                                              "min_per_second": budget.min_per_second, "window": budget.window}}
    effective["services"] = effective_services
    events_settings = _events(check, root.get("events"), line_of(root, "events")) if "events" in root else EventsSettings()
    metrics, tracing = parse_metrics(check, root), parse_tracing(check, root)
    effective.update(telemetry_effective(metrics, tracing))
    if check.problems:
        raise ConfigError(_format(check))
    return Config(source=filename, server=server, cache=cache, services=services, retry_budget=budget,
                  events=events_settings, metrics=metrics, tracing=tracing, secrets=frozenset(check.secrets),
                  effective=_plain(effective, check.masker))


def _events(check: _Checker, value: Any, line: int) -> EventsSettings:
    data = check.mapping(value, "events", line)
    defaults = EventsSettings()
    if data is None:
        return defaults
    check.known_keys(data, {"stream", "maxlen", "ack_timeout", "client_queue", "max_frame", "max_topics",
                            "max_topics_per_connection", "max_topics_per_peer"}, "events")
    return EventsSettings(
        stream=check.get(data, "stream", "events", _string, defaults.stream),
        maxlen=check.get(data, "maxlen", "events", _positive_int, defaults.maxlen),
        ack_timeout=check.get(data, "ack_timeout", "events", _positive_duration, defaults.ack_timeout),
        client_queue=check.get(data, "client_queue", "events", _positive_int, defaults.client_queue),
        max_frame=check.get(data, "max_frame", "events", _positive_size, defaults.max_frame),
        max_topics=check.get(data, "max_topics", "events", _positive_int, defaults.max_topics),
        max_topics_per_connection=check.get(data, "max_topics_per_connection", "events", _positive_int,
                                            defaults.max_topics_per_connection),
        max_topics_per_peer=check.get(data, "max_topics_per_peer", "events", _positive_int, defaults.max_topics_per_peer))


def _watch(check: _Checker, value: Any, where: str, line: int, names: set[str]) -> Watch | None:
    data = check.mapping(value, where, line)
    if data is None:
        return None
    check.known_keys(data, {"interval", "fields", "deliver", "topics"}, where)
    topics = check.get(data, "topics", where, _topic_list, ())
    interval = check.get(data, "interval", where, parse_duration, 300.0)
    if interval < 1:
        check.problem(line_of(data, "interval"), f"{where}.interval: poll at most once a second")
    fields = check.get(data, "fields", where, _string, "@")
    problem = check_expression(fields, names)
    if problem:
        check.problem(line_of(data, "fields"), f"{where}.fields: {problem}")
    webhook = secret = None
    attempts = 5
    if "deliver" in data:
        deliver = check.mapping(data["deliver"], f"{where}.deliver", line_of(data, "deliver"))
        if deliver is not None:
            check.known_keys(deliver, {"webhook", "secret", "attempts"}, f"{where}.deliver")
            webhook = check.get(deliver, "webhook", f"{where}.deliver", _upstream_url, None)
            secret = check.get(deliver, "secret", f"{where}.deliver", _string, None)
            check.secret(deliver.get("secret"))
            attempts = check.get(deliver, "attempts", f"{where}.deliver", _positive_int, 5)
            if webhook is None:
                check.problem(line_of(data, "deliver"), f"{where}.deliver: `webhook` (an http(s) URL) is required")
    return Watch(interval=interval, fields=fields, webhook=webhook, secret=secret, attempts=attempts, topics=topics)


def _topic_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TypeError("expected a list of topics such as flights/status/KE001")
    return tuple(value)


def _budget(check: _Checker, value: Any, line: int) -> RetryBudgetSettings:
    if value is False:
        return RetryBudgetSettings(enabled=False)
    data = check.mapping(value, "defaults.retry_budget", line)
    if data is None:
        return RetryBudgetSettings()
    check.known_keys(data, {"ratio", "min_per_second", "window"}, "defaults.retry_budget")
    return RetryBudgetSettings(
        ratio=check.get(data, "ratio", "defaults.retry_budget", _fraction, 0.2),
        min_per_second=check.get(data, "min_per_second", "defaults.retry_budget", _non_negative, 10.0),
        window=check.get(data, "window", "defaults.retry_budget", _positive_duration, 10.0),
    )


@dataclass(frozen=True, slots=True)
class _Nearest:
    """Settings that `defaults`, a service and an upstream may each set: the nearest wins."""

    timeout: float = 5.0
    deadline: float = 15.0
    breaker: BreakerPolicy = PROFILES["STANDARD"]
    retry: RetryPolicy = POLICIES["DEFAULT"]
    hedge: HedgePolicy | None = HEDGE_AUTO
    fallback_first: bool = True


def _nearest(check: _Checker, data: LineDict, where: str, base: _Nearest) -> _Nearest:
    """`base` with what `data` sets of the nearest-wins settings."""
    changes: dict[str, Any] = {}
    for key, name, convert in (("timeout", "timeout", _positive_duration), ("deadline", "deadline", _positive_duration),
                               ("fallback_before_retry", "fallback_first", _boolean)):
        if key in data:
            changes[name] = check.get(data, key, where, convert, getattr(base, name))
    if "hedge_after" in data:
        changes["hedge"] = check.get(data, "hedge_after", where, _hedge_after, base.hedge)
    if "breaker" in data:
        changes["breaker"] = _breaker(check, data["breaker"], f"{where}.breaker", line_of(data, "breaker"), base.breaker)
    if "retry" in data:
        changes["retry"] = _retry(check, data["retry"], f"{where}.retry", line_of(data, "retry"), base.retry)
    return replace(base, **changes)


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0")
    return seconds


def _positive_size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError("must be more than 0 bytes")
    return size


def _header_budget(value: Any) -> int:
    """`server.max_header_bytes`: below 1 KiB even a bare request's head would get 431."""
    size = parse_size(value)
    if size < 1024:
        raise ValueError("must be at least 1KiB")
    return size


_NEAREST_KEYS = {"timeout", "deadline", "breaker", "retry", "hedge_after", "fallback_before_retry"}
_SERVICE_KEYS = {"prefix", "cache", "routes", "upstreams", "watch", "retry_non_idempotent",
                 "forward_headers"} | _NEAREST_KEYS
_UPSTREAM_KEYS = {"name", "url", "path", "query", "headers", "timeout", "breaker", "retry", "hedge_after",
                  "transform", "rate_limit", "keys", "key_cooldown", "result_codes"}
_ROUTE_KEYS = {"match", "name", "cache", "paths", "derive", "watch"}
BUILT_IN_PLACEHOLDERS = frozenset({"upstream"})  # plus {key} where an upstream lists keys
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h|second|minute|hour)\s*$")


def _rate_limit(value: Any) -> RateLimit:
    """`10/s`, `600/m`, `1000/h` or {rate, per, burst}."""
    if isinstance(value, str):
        found = _RATE.match(value)
        if not found:
            raise ValueError(f"bad rate limit {value!r}: use 10/s, 600/m, 1000/h or {{rate, per, burst}}")
        rate = float(found.group(1))
        per = {"s": 1.0, "second": 1.0, "m": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}[found.group(2)]
        burst = rate
    elif isinstance(value, dict):
        unknown = set(value) - {"rate", "per", "burst"}
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} (allowed: burst, per, rate)")
        rate = value.get("rate")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise ValueError("rate must be a number of requests")
        per = parse_duration(value.get("per", 1))
        burst = value.get("burst", rate)
        if isinstance(burst, bool) or not isinstance(burst, (int, float)):
            raise ValueError("burst must be a number of requests")
    else:
        raise TypeError(f"expected 10/s or a mapping, got {_type_name(value)}")
    if not (0 < rate <= MAX_COUNT and per > 0 and 1 <= burst <= MAX_COUNT):  # NaN and inf too
        raise ValueError("rate and per must be positive and burst at least 1")
    return RateLimit(rate=float(rate), per=per, burst=float(burst))


def _service(check: _Checker, name: str, data: LineDict, where: str, line: int, cache: CacheSettings,
             inherited: _Nearest, upstream_lines: dict[str, int]) -> Service | None:
    check.known_keys(data, _SERVICE_KEYS, where)
    prefix = check.get(data, "prefix", where, _string, f"/{name}")
    prefix_line = line_of(data, "prefix") if "prefix" in data else line
    if not prefix.startswith("/") or "//" in prefix or "/../" in prefix + "/" or "/./" in prefix + "/" or "?" in prefix \
            or "#" in prefix or any(char.isspace() or _has_control(char) for char in prefix):
        check.problem(prefix_line, f"{where}.prefix: {prefix!r} must be a clean absolute path such as /fx")
    prefix = prefix.rstrip("/") or "/"
    for reserved in RESERVED_PREFIXES:
        if prefixes_overlap(reserved, prefix):
            check.problem(prefix_line, f"{where}.prefix: {prefix!r} collides with the proxy's own {reserved} endpoints")
    nearest = _nearest(check, data, where, inherited)
    rule = CacheRule(stale=cache.max_stale)
    if "cache" in data:
        rule = _cache_rule(check, data["cache"], f"{where}.cache", line_of(data, "cache"), rule, cache)
    forward = check.get(data, "forward_headers", where, _name_list, ())

    upstreams: list[Upstream] = []
    upstream_values = data.get("upstreams")
    if not isinstance(upstream_values, LineList) or not upstream_values:
        check.problem(line_of(data, "upstreams") if "upstreams" in data else line,
                      f"{where}.upstreams: expected a non-empty list of upstreams")
        upstream_values = LineList()
        upstream_values.line, upstream_values.item_lines = line, []
    for index, value in enumerate(upstream_values):
        u_where = f"{where}.upstreams[{index}]"
        u_line = line_of(upstream_values, index)
        u_data = check.mapping(value, u_where, u_line)
        if u_data is None:
            continue
        check.known_keys(u_data, _UPSTREAM_KEYS, u_where)
        u_name = check.get(u_data, "name", u_where, _string, None)
        if u_name is None:
            check.problem(u_line, f"{u_where}: `name` is required")
            continue
        if not _NAME.match(u_name):
            check.problem(line_of(u_data, "name"), f"{u_where}.name: {u_name!r}: use letters, digits, _ and -")
        if u_name in upstream_lines:
            check.problem(line_of(u_data, "name"), f"{u_where}.name: duplicate upstream name {u_name!r} (first at line {upstream_lines[u_name]})")
        upstream_lines.setdefault(u_name, line_of(u_data, "name"))
        if "url" not in u_data:
            check.problem(u_line, f"{u_where}: `url` is required")
        url = check.get(u_data, "url", u_where, _upstream_url, None)
        path = check.get(u_data, "path", u_where, _upstream_path, None)
        check.secret(u_data.get("url"))
        check.secret(u_data.get("path"))
        query, secret_query = _templates(check, u_data.get("query"), f"{u_where}.query", line_of(u_data, "query"), headers=False)
        headers, _ = _templates(check, u_data.get("headers"), f"{u_where}.headers", line_of(u_data, "headers"), headers=True)
        u_nearest = _nearest(check, u_data, u_where, nearest)
        transform = check.get(u_data, "transform", u_where, _string, None)
        keys: list[str] = []
        key_values = u_data.get("keys")
        if key_values is not None:
            if not isinstance(key_values, LineList) or not key_values:
                check.problem(line_of(u_data, "keys"), f"{u_where}.keys: expected a non-empty list of keys")
            else:
                for k_index, key in enumerate(key_values):
                    if not isinstance(key, str):
                        check.problem(line_of(key_values, k_index), f"{u_where}.keys[{k_index}]: expected a string")
                    elif _has_control(key) or "\t" in key:
                        # It is put in headers as it is: a secret file's trailing newline would split the request.
                        check.problem(line_of(key_values, k_index), f"{u_where}.keys[{k_index}]: a key cannot "
                                      "contain control characters (a trailing newline from the secret's file?)")
                    elif key:  # an unset optional key (${KEY_2:-}) is simply not there
                        check.secret(key)
                        keys.append(decoded_once(str(key)))
        result_codes = None
        if "result_codes" in u_data:
            result_codes = _result_codes(check, u_data["result_codes"], f"{u_where}.result_codes",
                                         line_of(u_data, "result_codes"))
        if url is None:
            continue
        upstreams.append(Upstream(
            name=u_name, service=name, url=url, path=Template.parse(path) if path else None,
            query=query, headers=headers, timeout=u_nearest.timeout, breaker=u_nearest.breaker, retry=u_nearest.retry,
            hedge=u_nearest.hedge, secret_query=frozenset(secret_query) | _key_query(query),
            secrets=frozenset(environment_values([u_data.get(k) for k in ("url", "path", "query", "headers", "keys")])),
            transform=transform, rate_limit=check.get(u_data, "rate_limit", u_where, _rate_limit, None),
            keys=tuple(keys), key_cooldown=check.get(u_data, "key_cooldown", u_where, parse_duration, 3600.0),
            result_codes=result_codes))
        if isinstance(key_values, LineList) and key_values and all(key == "" for key in key_values):
            check.problem(line_of(u_data, "keys"), f"{u_where}.keys: every key is empty (unset variables)")

    routes: list[Route] = []
    names = {u.name for u in upstreams}
    route_values = data.get("routes")
    if route_values is not None and not isinstance(route_values, LineList):
        check.problem(line_of(data, "routes"), f"{where}.routes: expected a list of routes")
        route_values = None
    for index, value in enumerate(route_values or []):
        r_where = f"{where}.routes[{index}]"
        r_line = line_of(route_values, index)
        r_data = check.mapping(value, r_where, r_line)
        if r_data is None:
            continue
        check.known_keys(r_data, _ROUTE_KEYS, r_where)
        match = check.get(r_data, "match", r_where, _string, None)
        if match is None:
            check.problem(r_line, f"{r_where}: `match` is required")
            continue
        if not (match == prefix or match.startswith(prefix.rstrip("/") + "/")):
            check.problem(line_of(r_data, "match"), f"{r_where}.match: {match!r} is outside the service prefix {prefix!r}")
        placeholders = Template.parse(match).names
        if len(set(placeholders)) != len(placeholders):
            check.problem(line_of(r_data, "match"), f"{r_where}.match: a placeholder is used twice")
            continue  # it cannot be compiled: each names one captured segment
        pattern = MatchPattern.compile(match)
        r_rule = _cache_rule(check, r_data["cache"], f"{r_where}.cache", line_of(r_data, "cache"), rule, cache) if "cache" in r_data else rule
        paths: dict[str, Template] = {}
        queries: dict[str, tuple[tuple[str, Template], ...]] = {}
        skipped: set[str] = set()
        p_data = check.mapping(r_data.get("paths"), f"{r_where}.paths", line_of(r_data, "paths"))
        for u_name, template in (p_data or {}).items():
            if u_name not in names:
                check.problem(line_of(p_data, u_name), f"{r_where}.paths: no upstream named {u_name!r} in service {name!r}")
            elif _off(template):
                skipped.add(u_name)
            elif not isinstance(template, str) or not template.startswith("/"):
                check.problem(line_of(p_data, u_name), f"{r_where}.paths.{u_name}: expected a path starting with / "
                                                        "(or off: the upstream does not serve this route)")
            elif check.get(p_data, u_name, f"{r_where}.paths", lambda text: _upstream_path(text.partition("?")[0]),
                           None) is not None:
                check.secret(template)
                paths[u_name], query = _route_path(check, template, f"{r_where}.paths.{u_name}",
                                                   line_of(p_data, u_name))
                if query:
                    queries[u_name] = query
        r_name = check.get(r_data, "name", r_where, _string, match)
        derive = None
        if "derive" in r_data:
            derive = _derive(check, r_data["derive"], f"{r_where}.derive", line_of(r_data, "derive"), pattern)
        watch_value = r_data.get("watch", data.get("watch"))  # a service's watch applies to each of its routes
        watch = None
        if watch_value is not None:
            watch_line = line_of(r_data, "watch") if "watch" in r_data else line_of(data, "watch")
            watch = _watch(check, watch_value, f"{r_where}.watch" if "watch" in r_data else f"{where}.watch",
                           watch_line, set(pattern.names))
        routes.append(Route(name=r_name, pattern=pattern, cache=r_rule, paths=paths, derive=derive, watch=watch,
                            queries=queries, skipped=frozenset(skipped)))

    # Every placeholder an upstream uses must come from some route's match, or the template can never be filled.
    offered = {n for r in routes for n in r.pattern.names} | BUILT_IN_PLACEHOLDERS
    for upstream in upstreams:
        available = offered | ({"key"} if upstream.keys else set())
        for missing in sorted(upstream.placeholders - available):
            check.problem(upstream_lines.get(upstream.name, line),
                          f"{where}.upstreams: {upstream.name} uses {{{missing}}} but no route's match defines it")
        if upstream.transform is not None:
            names = expression_placeholders(upstream.transform) & offered
            problem = check_expression(upstream.transform, names)
            if problem:
                check.problem(upstream_lines.get(upstream.name, line), f"{where}.upstreams: {upstream.name} transform: {problem}")
    for route in routes:
        if route.derive is None:
            continue
        sample = route.derive.source.render({n: "X" for n in route.derive.source.names}, encode=True)
        if not any(r.derive is None and r.pattern.match(sample) is not None for r in routes):
            check.problem(line, f"{where}.routes: route {route.name!r} derives from {route.derive.source.text!r}, "
                                "which no other (non-derived) route of the service matches")
    for route in routes:
        for u_name, template in route.paths.items():
            used = set(template.names).union(*(t.names for _, t in route.queries.get(u_name, ())))
            for missing in sorted(used - set(route.pattern.names) - BUILT_IN_PLACEHOLDERS):
                check.problem(line, f"{where}.routes: route {route.name!r} path for {u_name} uses {{{missing}}} not in its match")

    # A value from ${VAR} in a route's path for an upstream is that upstream's secret too.
    upstreams = [replace(u, secrets=u.secrets | environment_values([r.paths[u.name].text for r in routes
                                                                    if u.name in r.paths])) for u in upstreams]
    return Service(name=name, prefix=prefix, upstreams=tuple(upstreams), routes=tuple(routes), cache=rule,
                   deadline=nearest.deadline,
                   retry_non_idempotent=check.get(data, "retry_non_idempotent", where, _boolean, False),
                   forward_headers=frozenset(forward), fallback_first=nearest.fallback_first)


def _rule_dict(rule: CacheRule) -> dict[str, Any]:
    return {"ttl": rule.ttl, "stale": rule.stale, "statuses": sorted(rule.statuses), "vary": list(rule.vary),
            "key_by_credential": rule.key_by_credential,
            "stale_if_slow": "off" if rule.stale_if_slow is None else rule.stale_if_slow, "coalesce": rule.coalesce}


def _breaker_dict(policy: BreakerPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {"fail_threshold": policy.fail_threshold, "open_timeout": policy.open_timeout,
                           "half_open_max_calls": policy.half_open_max_calls}
    if policy.failure_rate is not None:
        out.update(failure_rate=policy.failure_rate, window=policy.window, min_calls=policy.min_calls,
                   min_failures=policy.min_failures)
    if policy.slow_call_rate is not None:
        out.update(slow_call_duration=policy.slow_call_duration, slow_call_rate=policy.slow_call_rate)
    out.update(trip_on_429=policy.trip_on_429, trip_on_refused=policy.trip_on_refused, max_rest=policy.max_rest)
    return out


def _hedge_text(hedge: HedgePolicy | None) -> Any:
    if hedge is None:
        return "off"
    return "auto" if hedge.after is None else hedge.after


def _effective_service(service: Service, data: LineDict) -> dict[str, Any]:
    raw_upstreams = {u.get("name"): u for u in data.get("upstreams", []) if isinstance(u, LineDict)
                     and isinstance(u.get("name"), str)}
    upstreams = []
    for upstream in service.upstreams:
        raw = raw_upstreams.get(upstream.name, {})
        upstreams.append({
            "name": upstream.name, "url": _masked(raw["url"]) if isinstance(raw.get("url"), Substituted) else str(upstream.url),
            "path": upstream.path.text if upstream.path else None,
            "query": {k: _masked(v) for k, v in (raw.get("query") or {}).items()},
            "headers": {k: _masked(v) for k, v in (raw.get("headers") or {}).items()},
            "timeout": upstream.timeout,
            "breaker": _breaker_dict(upstream.breaker),
            "retry": {"retries": upstream.retry.retries, "base_delay": upstream.retry.base_delay,
                      "max_delay": upstream.retry.max_delay, "retry_on": sorted(upstream.retry.retry_on)},
            "hedge_after": _hedge_text(upstream.hedge),
        })
        if upstream.result_codes is not None:
            codes = upstream.result_codes
            upstreams[-1]["result_codes"] = {
                "code": codes.code, "message": codes.message, "codes": {k: v.value for k, v in codes.meanings.items()},
                "daily_reset": str(codes.daily_reset) if codes.daily_reset is not None else None}
    return {
        "prefix": service.prefix, "deadline": service.deadline, "retry_non_idempotent": service.retry_non_idempotent,
        "fallback_before_retry": service.fallback_first,
        "cache": _rule_dict(service.cache),
        "routes": [{"name": r.name, "match": r.pattern.text, "cache": _rule_dict(r.cache),
                    "paths": {**{k: _path_text(t, r.queries.get(k, ())) for k, t in r.paths.items()},
                              **{k: "off" for k in sorted(r.skipped)}}}
                   for r in service.routes],
        "upstreams": upstreams,
    }


def _path_text(path: Template, query: tuple[tuple[str, Template], ...]) -> str:
    return path.text + ("?" + "&".join(f"{name}={value.text}" for name, value in query) if query else "")


def _format(check: _Checker) -> list[str]:
    """One `file:line: message` per problem, each on one line and quoting no value from the environment."""
    unique = dict.fromkeys(check.problems)  # a service-level setting is checked once per route: say it once
    return [f"{check.filename}:{line}: {check.masker(message).translate(_CONTROL)}"
            for line, message in sorted(unique, key=lambda p: p[0])]


def _plain(value: Any, masker: Masker) -> Any:
    """`value` with every string that had `${VAR}` substitutions shown masked (and a plain str, which YAML can
    dump); a value from the environment that reached a string some other way (a path split at its `?`, a
    query rejoined) is masked by `masker`, in every form it can take."""
    if isinstance(value, Substituted):
        return value.masked
    if isinstance(value, str):
        return masker(value)
    if isinstance(value, dict):
        return {_plain(k, masker): _plain(v, masker) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, masker) for v in value]
    return value
