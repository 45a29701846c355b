"""All mock providers of the committed routes.yaml at once, and that route table pointed at them.

    async with MockProviders() as mocks:
        text = mocks.committed_route_table()           # routes.yaml as committed, vendors -> mocks
        path = mocks.write_routes(tmp / "routes.yaml")  # the same with demo-sized timings
        config = load_config(path, env=mocks.env)       # the flights vendors need their service key
        ... run the proxy; mocks.fx_primary.go_down(); mocks.board.set_status(...) ...

The route table is never a hand-written copy: it is the committed file, parsed, with only the
vendors' base URLs swapped for the mocks' and the listeners moved to 127.0.0.1:0, plus any
timing overrides asked for. So what runs against the mocks is what `make run` serves.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from proxy.demo.mocks.base import MockServer
from proxy.demo.mocks.flights import FlightBoard, KacMock, OdcloudMock
from proxy.demo.mocks.fx import ExchangeRateApiMock, FrankfurterMock, RateTable

#: The flights mocks' service key, shaped like a data.go.kr key: base64, with `+`, `/` and `=`.
DEMO_SERVICE_KEY = "ZGVtby1rZXk+Zm9yL3RoZS9tb2Nrcw=="

#: The route table `make run` serves (the repository's routes.yaml; the package is installed editable).
COMMITTED_ROUTES = Path(__file__).resolve().parents[3] / "routes.yaml"

#: Each mock by upstream name, and the real vendor of the committed routes.yaml whose shape it answers in.
VENDOR_URLS: dict[str, str] = {
    "fx_primary": "https://open.er-api.com",
    "fx_secondary": "https://api.frankfurter.app",
    "flights_kac": "http://openapi.airport.co.kr",
    "flights_odcloud": "https://api.odcloud.kr/api",
}

#: Timings that let a walk-through of failures finish in seconds: `route_table()`'s defaults.
DEMO_TIMINGS: dict[str, Any] = {
    "ttl": {"fx": "2s"},
    "timeout": "1s",
    "deadline": "3s",
    "breaker": "FAST",
    "retry": {"retries": 1, "base_delay": "50ms", "max_delay": "200ms"},
}


class MockProviders:
    """ExchangeRate-API-like, Frankfurter-like, KAC-like and ODCloud-like mocks on 127.0.0.1, ports picked by the OS.

    The two FX vendors share one `RateTable` (`rates`) and the two flights instances one
    `FlightBoard` (`board`), so a change shows up whichever upstream answers.
    """

    def __init__(self, *, service_key: str = DEMO_SERVICE_KEY, host: str = "127.0.0.1") -> None:
        self.rates = RateTable()
        self.board = FlightBoard()
        self.service_key = service_key
        self.fx_primary = ExchangeRateApiMock(self.rates, "fx_primary", host=host)
        self.fx_secondary = FrankfurterMock(self.rates, "fx_secondary", host=host)
        self.flights_kac = KacMock("flights_kac", self.board, service_keys=(service_key,), host=host)
        self.flights_odcloud = OdcloudMock("flights_odcloud", self.board, service_keys=(service_key,), host=host)

    @property
    def all(self) -> dict[str, MockServer]:
        """Every mock by its upstream name in the route table."""
        return {mock.name: mock for mock in (self.fx_primary, self.fx_secondary, self.flights_kac, self.flights_odcloud)}

    def __getitem__(self, name: str) -> MockServer:
        return self.all[name]

    @property
    def env(self) -> dict[str, str]:
        """The environment the proxy needs for the committed table: the flights mocks' service key,
        given as users paste it: "encoded" (percent-encoded) for KAC, "decoded" for ODCloud."""
        return {"KAC_API_KEY": quote(self.service_key, safe=""), "ODCLOUD_API_KEY": self.service_key}

    async def start(self) -> "MockProviders":
        started: list[MockServer] = []
        try:
            for mock in self.all.values():
                await mock.start()
                started.append(mock)
        except BaseException:
            for mock in started:
                await mock.stop()
            raise
        return self

    async def stop(self) -> None:
        for mock in self.all.values():
            await mock.stop()

    async def __aenter__(self) -> "MockProviders":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def heal_all(self) -> None:
        for mock in self.all.values():
            mock.heal()

    # --- the route table ---------------------------------------------------------------------

    def committed_route_table(self, path: str | Path = COMMITTED_ROUTES, *, listen: str = "127.0.0.1:0",
                              metrics_listen: str = "127.0.0.1:0", ttl: Mapping[str, str] | None = None,
                              timeout: str | None = None, deadline: str | None = None,
                              breaker: str | Mapping[str, Any] | None = None,
                              retry: str | Mapping[str, Any] | None = None) -> str:
        """The committed routes.yaml with each vendor's base URL swapped for its mock's.

        Everything else (routes, paths, queries, transforms, derived routes, rate limits) is the
        file's own. Overrides, each applied to the parsed YAML, never to its text:
        `listen` / `metrics_listen` replace the listeners; `ttl={"fx": "3s"}` sets a service's
        cache ttl and that of every route of it that sets one; `timeout`, `breaker` and `retry`
        replace the setting in `defaults` and wherever a service or upstream sets its own (the
        nearest one wins, so a default alone would not reach them); `deadline` likewise for
        `defaults` and services. None keeps the file's value.

        Raises ValueError when the file's upstreams and these mocks do not match one to one, or
        an upstream points at another vendor than the one its mock imitates.
        """
        if any(not mock.port for mock in self.all.values()):
            raise RuntimeError("start the mock providers before writing a route table for them")
        source = Path(path)
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
        services = document.get("services") or {}
        self._point_upstreams_at_mocks(services, source)

        server = document.setdefault("server", {})
        server["listen"], server["metrics_listen"] = listen, metrics_listen
        changes = [f"vendor URLs -> mocks on {self.fx_primary.host}", f"listeners -> {listen}"]
        for service_name, value in (ttl or {}).items():
            service = services.get(service_name)
            if service is None:
                raise ValueError(f"ttl override for {service_name!r}: {source} has no such service")
            service.setdefault("cache", {})["ttl"] = value
            for route in service.get("routes") or []:
                if isinstance(route.get("cache"), dict):
                    route["cache"]["ttl"] = value
            changes.append(f"{service_name} ttl {value}")
        upstreams = [u for s in services.values() for u in s.get("upstreams") or []]
        for key, value, levels in (("timeout", timeout, upstreams), ("deadline", deadline, []),
                                   ("breaker", breaker, upstreams), ("retry", retry, upstreams)):
            if value is None:
                continue
            document.setdefault("defaults", {})[key] = _plain(value)
            for owner in [*services.values(), *levels]:
                if key in owner:
                    owner[key] = _plain(value)
            changes.append(f"{key} {_describe(value)}")

        header = "".join(f"#   {change}\n" for change in changes)
        header = f"# {source} as committed, for the mock providers, except:\n{header}"
        return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120)

    def route_table(self, path: str | Path = COMMITTED_ROUTES, **overrides: Any) -> str:
        """`committed_route_table` with demo-sized timings (`DEMO_TIMINGS`), each replaceable by `overrides`.

        fx copies stay fresh 2 s, attempts time out after 1 s, the FAST breaker (3 failures open
        it for 30 s) and one quick retry: a failure scenario plays out in seconds.
        """
        return self.committed_route_table(path, **{**DEMO_TIMINGS, **overrides})

    def write_routes(self, path: str | Path, **options: Any) -> Path:
        """Write `route_table(**options)` to `path` and return it."""
        target = Path(path)
        target.write_text(self.route_table(**options), encoding="utf-8")
        return target

    def _point_upstreams_at_mocks(self, services: dict[str, Any], source: Path) -> None:
        seen = set()
        for service in services.values():
            for upstream in service.get("upstreams") or []:
                name = upstream.get("name")
                if name not in self.all:
                    raise ValueError(f"{source}: upstream {name!r} has no mock provider "
                                     f"(mocks: {', '.join(self.all)})")
                url = str(upstream.get("url", "")).rstrip("/")
                if url != VENDOR_URLS[name]:
                    raise ValueError(f"{source}: upstream {name!r} points at {url}, but its mock answers "
                                     f"like {VENDOR_URLS[name]}")
                upstream["url"] = self.all[name].base_url
                seen.add(name)
        missing = [name for name in self.all if name not in seen]
        if missing:
            raise ValueError(f"{source}: no upstream named {', '.join(missing)} for the mock providers to stand in for")


def _plain(value: Any) -> Any:
    """A plain dict/str for yaml.safe_dump (it refuses other Mapping types)."""
    return dict(value) if isinstance(value, Mapping) else value


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)
