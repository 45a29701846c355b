"""The checks of one service: its own settings, then its upstreams (upstream_checks.py) and routes
(route_checks.py) one by one, then the cross checks that need all of them at once.
"""

from __future__ import annotations

from dataclasses import replace

from proxy.adapters.transform import check_expression
from proxy.adapters.transform import placeholders as expression_placeholders
from proxy.config.checker import Checker
from proxy.config.model import CacheRule, CacheSettings, Defaults, Route, Service, Upstream
from proxy.config.policies import NEAREST_KEYS, read_cache_rule, read_nearest
from proxy.config.route_checks import read_routes
from proxy.config.routing import prefixes_overlap
from proxy.config.upstream_checks import read_upstreams
from proxy.config.values import boolean, environment_values, has_control, header_names, string
from proxy.config.yaml_source import LineDict, line_of

SERVICE_KEYS = {"prefix", "cache", "routes", "upstreams", "watch", "retry_non_idempotent",
                "forward_headers"} | NEAREST_KEYS
RESERVED_PREFIXES = ("/health", "/metrics", "/events")
BUILT_IN_PLACEHOLDERS = frozenset({"upstream"})  # plus {key} where an upstream lists keys


def read_service(check: Checker, name: str, data: LineDict, where: str, line: int, cache: CacheSettings,
                 inherited: Defaults, upstream_lines: dict[str, int]) -> Service:
    """One entry of `services:`; `inherited` is what `defaults:` set, `upstream_lines` the upstream names so far."""
    check.known_keys(data, SERVICE_KEYS, where)
    prefix = _read_prefix(check, data, where, line, name)
    nearest = read_nearest(check, data, where, inherited)
    rule = CacheRule(stale=cache.max_stale)
    if "cache" in data:
        rule = read_cache_rule(check, data["cache"], f"{where}.cache", line_of(data, "cache"), rule, cache)
    forward = check.get(data, "forward_headers", where, header_names, ())
    upstreams = read_upstreams(check, data, where, line, name, nearest, upstream_lines)
    routes = read_routes(check, data, where, name, prefix, rule, cache, {u.name for u in upstreams})
    _check_upstreams_against_routes(check, where, line, upstreams, routes, upstream_lines)
    _check_routes_against_each_other(check, where, line, routes)
    # A value from ${VAR} in a route's path for an upstream is that upstream's secret too.
    upstreams = [replace(u, secrets=u.secrets | environment_values([r.paths[u.name].text for r in routes
                                                                    if u.name in r.paths])) for u in upstreams]
    return Service(name=name, prefix=prefix, upstreams=tuple(upstreams), routes=tuple(routes), cache=rule,
                   deadline=nearest.deadline,
                   retry_non_idempotent=check.get(data, "retry_non_idempotent", where, boolean, False),
                   forward_headers=frozenset(forward), fallback_first=nearest.fallback_first)


def _read_prefix(check: Checker, data: LineDict, where: str, line: int, name: str) -> str:
    """The service's path prefix (`/<name>` unless set): clean, absolute, clear of the proxy's own endpoints."""
    prefix = check.get(data, "prefix", where, string, f"/{name}")
    prefix_line = line_of(data, "prefix") if "prefix" in data else line
    if not prefix.startswith("/") or "//" in prefix or "/../" in prefix + "/" or "/./" in prefix + "/" or "?" in prefix \
            or "#" in prefix or any(char.isspace() or has_control(char) for char in prefix):
        check.problem(prefix_line, f"{where}.prefix: {prefix!r} must be a clean absolute path such as /fx")
    prefix = prefix.rstrip("/") or "/"
    for reserved in RESERVED_PREFIXES:
        if prefixes_overlap(reserved, prefix):
            check.problem(prefix_line, f"{where}.prefix: {prefix!r} collides with the proxy's own {reserved} endpoints")
    return prefix


def _check_upstreams_against_routes(check: Checker, where: str, line: int, upstreams: list[Upstream],
                                    routes: list[Route], upstream_lines: dict[str, int]) -> None:
    """Every placeholder an upstream uses must come from some route's match, or the template can never be
    filled; so must the names its transform reads."""
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


def _check_routes_against_each_other(check: Checker, where: str, line: int, routes: list[Route]) -> None:
    """A derived route needs a plain route to derive from; a route's upstream paths use only its own placeholders."""
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
