"""What a request target means to the route table, worked out once per target and table.

A target is checked (`check_target`: no absolute form, dot segments, `//`, control
characters, ...), matched to a service by prefix and to a route by template, and cut into
the path after the service prefix. Both front ends, the HIT path and the full path read the
same `Resolution`; a `Resolver` belongs to one route table (a `Runtime`), so a reload starts
from an empty memo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from proxy.config.model import Config, Route, Service
from proxy.config.routing import UnsafePath, check_target

# Targets remembered per table, and the longest remembered: a caller cycling through paths
# costs at most this many items before the memo starts again.
_MEMO_MAX = 4096
_MEMO_PATH_MAX = 1024
_NO_PARAMS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a target is not forwarded: `bad_request` (400, an unsafe target) or `no_route` (404)."""

    status: int
    error: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """A target's service, route and path pieces, or the refusal the full path answers with.

    `path` is the target's encoded path (no query), `decoded` its decoded form (what routes and
    the proxy's own endpoints are matched on), `rest` the encoded path after the service prefix.
    """

    refusal: Refusal | None
    path: str
    decoded: str = ""
    service: Service | None = None
    route: Route | None = None
    params: Mapping[str, str] = field(default_factory=lambda: _NO_PARAMS)
    rest: str = ""

    @property
    def route_name(self) -> str:
        """The route's name, or the service's prefix for a request no route template matched."""
        if self.route is not None:
            return self.route.name
        return self.service.prefix if self.service is not None else ""


class Resolver:
    """Resolves targets against one route table, remembering the answers for its paths."""

    __slots__ = ("_config", "_memo")

    def __init__(self, config: Config) -> None:
        self._config = config
        self._memo: dict[str, Resolution] = {}

    def __call__(self, raw_path: str) -> Resolution:
        """The resolution of a raw request target (path and query as received)."""
        path = raw_path.split("?", 1)[0]
        if "#" in raw_path:
            return resolve(self._config, raw_path)  # refused whatever the path: not worth an item
        found = self._memo.get(path)
        if found is None:
            found = resolve(self._config, path)
            if len(path) <= _MEMO_PATH_MAX:
                if len(self._memo) >= _MEMO_MAX:
                    self._memo.clear()
                self._memo[path] = found
        return found


def resolve(config: Config, raw_path: str) -> Resolution:
    """`Resolver` without the memo."""
    path = raw_path.split("?", 1)[0]
    try:
        decoded = check_target(raw_path)
    except (UnsafePath, UnicodeDecodeError) as exc:
        return Resolution(Refusal(400, "bad_request", str(exc)), path)
    service = config.service_for(decoded)
    if service is None:
        return Resolution(Refusal(404, "no_route"), path, decoded)
    route, params = service.route_for(decoded)
    return Resolution(None, path, decoded, service, route, MappingProxyType(dict(params)),
                      rest_of(path, service.prefix))


def rest_of(path: str, prefix: str) -> str:
    """The encoded path after the service prefix, cut on segments (the prefix may arrive encoded)."""
    if prefix == "/":
        return path
    depth = prefix.count("/")
    parts = path.split("/")
    rest = "/".join(parts[depth + 1:])
    if len(parts) > depth + 1:
        return "/" + rest
    return ""
