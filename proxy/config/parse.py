"""routes.yaml → frozen, typed config (`proxy.config.model`), or every problem as `file:line: message`.

The whole file is checked before anything is built, so a bad file never half-applies:
`load_config` either returns a complete `Config` or raises `ConfigError` listing all
problems it found (not only the first). This module reads the top-level sections; each
service is checked by `proxy.config.service_checks`, single values by `proxy.config.values`,
and `proxy.config.effective` renders what `check` prints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from proxy.config.checker import Checker, Fields
from proxy.config.effective import render
from proxy.config.model import (
    CacheSettings,
    Config,
    Defaults,
    EventsSettings,
    RetryBudgetSettings,
    SentinelSettings,
    ServerSettings,
    Service,
    TlsSettings,
)
from proxy.config.policies import NEAREST_KEYS, read_nearest
from proxy.config.routing import prefixes_overlap
from proxy.config.service_checks import read_service
from proxy.config.telemetry import parse_metrics, parse_tracing
from proxy.config.values import (
    NAME,
    boolean,
    environment_values,
    fraction,
    header_budget,
    header_names,
    host_port,
    non_negative,
    one_of,
    parse_duration,
    parse_listen,
    parse_size,
    positive_duration,
    positive_int,
    positive_size,
    redis_db,
    redis_url_problem,
    string,
    url_password,
)
from proxy.config.yaml_source import MAX_BYTES, LineDict, Substituted, line_of, load
from proxy.masking import Masker

TOP_LEVEL_KEYS = {"version", "server", "cache", "defaults", "services", "events", "upstream_client", "metrics",
                  "tracing"}
_CONTROL = {code: repr(chr(code))[1:-1] for code in (*range(0x20), 0x7F)}  # shown escaped in messages


def _header_set(value: Any) -> frozenset[str]:
    return frozenset(header_names(value))


# The simple settings of each flat section, read in this order: (key, reader). A key is a field of the
# section's struct in model.py; the keys not listed here are read by hand in the section's reader below.
SERVER_FIELDS: Fields = (
    ("listen", parse_listen), ("max_request_body", parse_size), ("replay_buffer", parse_size),
    ("max_header_bytes", header_budget), ("drain_timeout", parse_duration), ("strip_headers", _header_set),
    ("max_response_buffer", parse_size), ("header_timeout", parse_duration), ("keepalive_timeout", parse_duration),
    ("max_connections", positive_int), ("front", one_of("lean", "aiohttp")))
CACHE_FIELDS: Fields = (
    ("max_stale", parse_duration), ("max_bytes", positive_size), ("max_body_bytes", parse_size), ("prefix", string),
    ("op_timeout", positive_duration), ("local_ttl", parse_duration), ("cluster", boolean))
TLS_FIELDS: Fields = (("ca_file", string), ("cert_file", string), ("key_file", string))
RETRY_BUDGET_FIELDS: Fields = (("ratio", fraction), ("min_per_second", non_negative), ("window", positive_duration))
EVENTS_FIELDS: Fields = (
    ("stream", string), ("maxlen", positive_int), ("ack_timeout", positive_duration), ("client_queue", positive_int),
    ("max_frame", positive_size), ("max_topics", positive_int), ("max_topics_per_connection", positive_int),
    ("max_topics_per_peer", positive_int))


class ConfigError(Exception):
    """The route table is invalid; `problems` holds one `file:line: message` per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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
    """Validate a route table as `yaml_source.load` read it (its document and problems); see `load_config`."""
    check = Checker(filename)
    check.problems.extend(yaml_problems)
    check.masker = Masker(environment_values(document))
    if document is None:
        if not check.problems:
            check.problem(1, "the file holds no route table (`null`): expected a mapping starting with `version: 1`")
        raise ConfigError(_problem_lines(check))
    root = check.mapping(document, "the file", 1)
    if root is None:
        raise ConfigError(_problem_lines(check))
    check.known_keys(root, TOP_LEVEL_KEYS, "top level")
    if root.get("version") != 1 or isinstance(root.get("version"), bool):
        check.problem(line_of(root, "version") if "version" in root else 1,
                      f"version: expected 1, got {root.get('version')!r}" if "version" in root else "version: missing (use `version: 1`)")
    server = _read_server(check, root)
    cache = _read_cache(check, root)
    defaults, budget = _read_defaults(check, root)
    services = _read_services(check, root, cache, defaults)
    events = _read_events(check, root.get("events"), line_of(root, "events")) if "events" in root else EventsSettings()
    upstream_client = _read_upstream_client(check, root)
    metrics, tracing = parse_metrics(check, root), parse_tracing(check, root)
    if check.problems:
        raise ConfigError(_problem_lines(check))
    config = Config(source=filename, server=server, cache=cache, defaults=defaults, retry_budget=budget,
                    services=services, events=events, upstream_client=upstream_client, metrics=metrics,
                    tracing=tracing, secrets=frozenset(check.secrets))
    return replace(config, effective=render(config, check.masker))


def _read_upstream_client(check: Checker, root: LineDict) -> str:
    """`upstream_client`: whose HTTP client speaks to upstreams (docs/http-pieces.md)."""
    if "upstream_client" not in root:
        return "http1"
    try:
        return one_of("http1", "aiohttp")(root["upstream_client"])
    except ValueError as exc:
        check.problem(line_of(root, "upstream_client"), f"upstream_client: {exc}")
        return "http1"


def keys_of(struct: type) -> set[str]:
    """The keys a flat section accepts: its struct's fields."""
    return {item.name for item in fields(struct)}


def _read_server(check: Checker, root: LineDict) -> ServerSettings:
    server = ServerSettings()
    server_data = check.mapping(root.get("server"), "server", line_of(root, "server"))
    if server_data is None:
        return server
    check.known_keys(server_data, keys_of(ServerSettings), "server")
    metrics_listen = server.metrics_listen
    if "metrics_listen" in server_data:
        metrics_listen = None if server_data["metrics_listen"] in (None, False, "off") else \
            check.get(server_data, "metrics_listen", "server", parse_listen, server.metrics_listen)
    server = replace(server, metrics_listen=metrics_listen, **check.changes(server_data, "server", SERVER_FIELDS))
    for key in ("header_timeout", "keepalive_timeout"):
        if not 0 < getattr(server, key) <= 86400:
            check.problem(line_of(server_data, key), f"server.{key}: must be more than 0s and at most 1d")
    if server.metrics_listen is not None and server.metrics_listen[1] == server.listen[1] != 0:
        check.problem(line_of(server_data, "metrics_listen"), "server.metrics_listen: must use another port than server.listen")
    return server


def _read_cache(check: Checker, root: LineDict) -> CacheSettings:
    cache = CacheSettings()
    cache_data = check.mapping(root.get("cache"), "cache", line_of(root, "cache"))
    if cache_data is None:
        return cache
    check.known_keys(cache_data, keys_of(CacheSettings), "cache")
    backend = check.get(cache_data, "backend", "cache", string, cache.backend)
    if backend not in ("memory", "redis"):
        check.problem(line_of(cache_data, "backend"), f"cache.backend: expected memory or redis, got {backend!r}")
        backend = "memory"
    url = check.get(cache_data, "url", "cache", string, cache.url)
    problem = redis_url_problem(url) if backend == "redis" and "sentinel" not in cache_data else None
    if problem is not None:
        check.problem(line_of(cache_data, "url") if "url" in cache_data else line_of(root, "cache"),
                      f"cache.url: {problem}")
    if isinstance(cache_data.get("url"), Substituted):
        check.secret(url_password(url))
    sentinel = _read_sentinel(check, cache_data["sentinel"], line_of(cache_data, "sentinel")) \
        if "sentinel" in cache_data else None
    tls = _read_tls(check, cache_data["tls"], line_of(cache_data, "tls")) if "tls" in cache_data else None
    cache = replace(cache, backend=backend, url=url, sentinel=sentinel, tls=tls,
                    **check.changes(cache_data, "cache", CACHE_FIELDS))
    _check_redis_shape(check, cache_data, cache, line_of(root, "cache"))
    return cache


def _check_redis_shape(check: Checker, data: LineDict, cache: CacheSettings, line: int) -> None:
    """`cache.cluster`, `cache.sentinel` and `cache.tls` (the Redis shapes beyond one node) against
    each other, the URL and the backend."""
    url_line = line_of(data, "url") if "url" in data else line
    if cache.cluster and "sentinel" in data:
        check.problem(line_of(data, "sentinel"), "cache.cluster and cache.sentinel: set one of them (a Cluster "
                                                 "fails over by itself; Sentinel watches one master)")
    if cache.backend != "redis":
        for key in ("cluster", "sentinel", "tls"):
            if key in data and data[key] not in (False, None):
                check.problem(line_of(data, key), f"cache.{key}: only with cache.backend: redis")
        return
    if cache.cluster and cache.url.startswith("unix:"):
        check.problem(url_line, "cache.url: a Cluster is reached over TCP: use redis://host:port of one of its nodes")
    elif cache.cluster and cache.url.partition("://")[2].partition("/")[2].partition("?")[0] not in ("", "0"):
        check.problem(url_line, "cache.url: a Cluster has only database 0")
    if cache.tls is not None and cache.sentinel is None and not cache.url.startswith("rediss://"):
        check.problem(line_of(data, "tls"), "cache.tls: needs a rediss:// cache.url (TLS files for a plain connection)")


def _read_sentinel(check: Checker, value: Any, line: int) -> SentinelSettings | None:
    data = check.mapping(value, "cache.sentinel", line)
    if data is None:
        return None
    check.known_keys(data, keys_of(SentinelSettings), "cache.sentinel")
    hosts: list[tuple[str, int]] = []
    raw_hosts = data.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        check.problem(line_of(data, "hosts") if "hosts" in data else line,
                      "cache.sentinel.hosts: a list of one or more Sentinels as host:port is needed")
    else:
        for item in raw_hosts:
            try:
                hosts.append(host_port(item))
            except ValueError as exc:
                check.problem(line_of(data, "hosts"), f"cache.sentinel.hosts: {exc}")
    service = check.get(data, "service", "cache.sentinel", string, "")
    if not service:
        check.problem(line_of(data, "service") if "service" in data else line,
                      "cache.sentinel.service: the master's name as the Sentinels know it (e.g. mymaster) is needed")
    db = check.get(data, "db", "cache.sentinel", redis_db, 0)
    passwords = {}
    for key in ("password", "sentinel_password"):
        passwords[key] = check.get(data, key, "cache.sentinel", string, "")
        if isinstance(data.get(key), Substituted):
            check.secret(passwords[key])
    return SentinelSettings(hosts=tuple(hosts), service=service, db=db, **passwords)


def _read_tls(check: Checker, value: Any, line: int) -> TlsSettings | None:
    data = check.mapping(value, "cache.tls", line)
    if data is None:
        return None
    check.known_keys(data, keys_of(TlsSettings), "cache.tls")
    tls = TlsSettings(**check.changes(data, "cache.tls", TLS_FIELDS))
    for key, _ in TLS_FIELDS:
        path = getattr(tls, key)
        if path is not None and not os.path.isfile(path):
            check.problem(line_of(data, key), f"cache.tls.{key}: no readable file at {path!r}")
    if (tls.cert_file is None) != (tls.key_file is None):
        check.problem(line, "cache.tls: cert_file and key_file go together (a client certificate and its key)")
    return tls


def _read_defaults(check: Checker, root: LineDict) -> tuple[Defaults, RetryBudgetSettings]:
    defaults = Defaults()
    budget = RetryBudgetSettings()
    defaults_data = check.mapping(root.get("defaults"), "defaults", line_of(root, "defaults"))
    if defaults_data is not None:
        check.known_keys(defaults_data, NEAREST_KEYS | {"retry_budget"}, "defaults")
        defaults = read_nearest(check, defaults_data, "defaults", defaults)
        if "retry_budget" in defaults_data:
            budget = _read_retry_budget(check, defaults_data["retry_budget"], line_of(defaults_data, "retry_budget"))
    return defaults, budget


def _read_retry_budget(check: Checker, value: Any, line: int) -> RetryBudgetSettings:
    if value is False:
        return RetryBudgetSettings(enabled=False)
    data = check.mapping(value, "defaults.retry_budget", line)
    if data is None:
        return RetryBudgetSettings()
    check.known_keys(data, keys_of(RetryBudgetSettings) - {"enabled"}, "defaults.retry_budget")
    return replace(RetryBudgetSettings(), **check.changes(data, "defaults.retry_budget", RETRY_BUDGET_FIELDS))


def _read_services(check: Checker, root: LineDict, cache: CacheSettings, defaults: Defaults) -> dict[str, Service]:
    services: dict[str, Service] = {}
    upstream_lines: dict[str, int] = {}
    services_data = check.mapping(root.get("services"), "services", line_of(root, "services"))
    if services_data is not None and not services_data:
        check.problem(line_of(root, "services") if "services" in root else 1, "services: at least one service is needed")
    for service_name, service_value in (services_data or {}).items():
        service_line = line_of(services_data, service_name)
        where = f"services.{service_name}"
        if not NAME.match(service_name):
            check.problem(service_line, f"{where}: service names are letters, digits, _ and - (starting with a letter)")
            continue
        data = check.mapping(service_value, where, service_line)
        if data is None:
            continue
        service = read_service(check, service_name, data, where, service_line, cache, defaults, upstream_lines)
        for other in services.values():
            if prefixes_overlap(other.prefix, service.prefix):
                check.problem(line_of(data, "prefix") if "prefix" in data else service_line,
                              f"{where}.prefix: {service.prefix!r} overlaps the prefix {other.prefix!r} of service {other.name!r}")
        services[service_name] = service
    if cache.backend != "redis":
        for service in services.values():
            for upstream in service.upstreams:
                if upstream.breaker.shared:
                    check.problem(upstream_lines.get(upstream.name, 1), f"services.{service.name}: breaker.shared: "
                                  f"true (upstream {upstream.name!r}) needs cache.backend: redis, where replicas share it")
    return services


def _read_events(check: Checker, value: Any, line: int) -> EventsSettings:
    data = check.mapping(value, "events", line)
    if data is None:
        return EventsSettings()
    check.known_keys(data, keys_of(EventsSettings), "events")
    return replace(EventsSettings(), **check.changes(data, "events", EVENTS_FIELDS))


def _problem_lines(check: Checker) -> list[str]:
    """One `file:line: message` per problem, each on one line and quoting no value from the environment."""
    unique = dict.fromkeys(check.problems)  # a service-level setting is checked once per route: say it once
    return [f"{check.filename}:{line}: {check.masker(message).translate(_CONTROL)}"
            for line, message in sorted(unique, key=lambda p: p[0])]
