"""The checks of a service's `routes:` list, one route at a time: its match, cache rule, paths per
upstream (or `off`), a derived answer and a watch.

What needs every route of the service (a derived route's source, a path's placeholders) is checked
afterwards in `proxy.config.service_checks`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from proxy.adapters.transform import check_expression
from proxy.config.checker import Checker
from proxy.config.model import CacheRule, CacheSettings, Derive, Route, Watch
from proxy.config.policies import read_cache_rule
from proxy.config.routing import MatchPattern, Template
from proxy.config.values import is_off, parse_duration, positive_int, string, topic_list, upstream_path, upstream_url
from proxy.config.yaml_source import LineDict, LineList, line_of

ROUTE_KEYS = {"match", "name", "cache", "paths", "derive", "watch"}

Query = tuple[tuple[str, Template], ...]


def read_routes(check: Checker, data: LineDict, where: str, name: str, prefix: str, rule: CacheRule,
                cache: CacheSettings, upstream_names: set[str]) -> list[Route]:
    """A service's routes, in order; each starts from the service's cache rule `rule`."""
    routes: list[Route] = []
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
        check.known_keys(r_data, ROUTE_KEYS, r_where)
        match = check.get(r_data, "match", r_where, string, None)
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
        r_rule = read_cache_rule(check, r_data["cache"], f"{r_where}.cache", line_of(r_data, "cache"), rule, cache) if "cache" in r_data else rule
        paths, queries, skipped = _read_paths(check, r_data, r_where, name, upstream_names)
        r_name = check.get(r_data, "name", r_where, string, match)
        derive = None
        if "derive" in r_data:
            derive = _read_derive(check, r_data["derive"], f"{r_where}.derive", line_of(r_data, "derive"), pattern)
        watch_value = r_data.get("watch", data.get("watch"))  # a service's watch applies to each of its routes
        watch = None
        if watch_value is not None:
            watch_line = line_of(r_data, "watch") if "watch" in r_data else line_of(data, "watch")
            watch = _read_watch(check, watch_value, f"{r_where}.watch" if "watch" in r_data else f"{where}.watch",
                                watch_line, set(pattern.names))
        routes.append(Route(name=r_name, pattern=pattern, cache=r_rule, paths=paths, derive=derive, watch=watch,
                            queries=queries, skipped=frozenset(skipped)))
    return routes


def _read_paths(check: Checker, r_data: LineDict, r_where: str, name: str,
                upstream_names: set[str]) -> tuple[dict[str, Template], dict[str, Query], set[str]]:
    """A route's `paths:` per upstream: the path templates, the queries written after their `?`, and the
    upstreams switched `off` for the route."""
    paths: dict[str, Template] = {}
    queries: dict[str, Query] = {}
    skipped: set[str] = set()
    p_data = check.mapping(r_data.get("paths"), f"{r_where}.paths", line_of(r_data, "paths"))
    for u_name, template in (p_data or {}).items():
        if u_name not in upstream_names:
            check.problem(line_of(p_data, u_name), f"{r_where}.paths: no upstream named {u_name!r} in service {name!r}")
        elif is_off(template):
            skipped.add(u_name)
        elif not isinstance(template, str) or not template.startswith("/"):
            check.problem(line_of(p_data, u_name), f"{r_where}.paths.{u_name}: expected a path starting with / "
                                                    "(or off: the upstream does not serve this route)")
        elif check.get(p_data, u_name, f"{r_where}.paths", lambda text: upstream_path(text.partition("?")[0]),
                       None) is not None:
            check.secret(template)
            paths[u_name], query = _read_route_path(check, template, f"{r_where}.paths.{u_name}",
                                                    line_of(p_data, u_name))
            if query:
                queries[u_name] = query
    return paths, queries, skipped


def _read_route_path(check: Checker, text: str, where: str, line: int) -> tuple[Template, Query]:
    """A route's path for one upstream, and the query written after its `?` (read as a URL's: decoded once)."""
    path, _, query = text.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        check.problem(line, f"{where}: the query after ? must be name=value pairs joined by &")
        pairs = []
    return Template.parse(path), tuple((name, Template.parse(value)) for name, value in pairs)


def _read_derive(check: Checker, value: Any, where: str, line: int, pattern: MatchPattern) -> Derive | None:
    """`derive: {from, transform}`: the other route's path may use only this route's placeholders."""
    data = check.mapping(value, where, line)
    if data is None:
        return None
    check.known_keys(data, {"from", "transform"}, where)
    source = check.get(data, "from", where, string, None)
    transform = check.get(data, "transform", where, string, None)
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


def _read_watch(check: Checker, value: Any, where: str, line: int, names: set[str]) -> Watch | None:
    """`watch: {interval, fields, deliver, topics}`; `names` are the route's placeholders `fields` may use."""
    data = check.mapping(value, where, line)
    if data is None:
        return None
    check.known_keys(data, {"interval", "fields", "deliver", "topics"}, where)
    topics = check.get(data, "topics", where, topic_list, ())
    interval = check.get(data, "interval", where, parse_duration, 300.0)
    if interval < 1:
        check.problem(line_of(data, "interval"), f"{where}.interval: poll at most once a second")
    fields = check.get(data, "fields", where, string, "@")
    problem = check_expression(fields, names)
    if problem:
        check.problem(line_of(data, "fields"), f"{where}.fields: {problem}")
    webhook = secret = None
    attempts = 5
    if "deliver" in data:
        deliver = check.mapping(data["deliver"], f"{where}.deliver", line_of(data, "deliver"))
        if deliver is not None:
            check.known_keys(deliver, {"webhook", "secret", "attempts"}, f"{where}.deliver")
            webhook = check.get(deliver, "webhook", f"{where}.deliver", upstream_url, None)
            secret = check.get(deliver, "secret", f"{where}.deliver", string, None)
            check.secret(deliver.get("secret"))
            attempts = check.get(deliver, "attempts", f"{where}.deliver", positive_int, 5)
            if webhook is None:
                check.problem(line_of(data, "deliver"), f"{where}.deliver: `webhook` (an http(s) URL) is required")
    return Watch(interval=interval, fields=fields, webhook=webhook, secret=secret, attempts=attempts, topics=topics)
