"""A chain on a fake transport, built from route-table text the way the process builds it."""

from __future__ import annotations

import random
import uuid
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import signals
from proxy.chain.build import Runtime
from proxy.chain.exchange import Exchange
from proxy.clock import FakeClock
from proxy.config.model import Config
from proxy.config.parse import parse_config
from tests.fake_transport import FakeTransport
from tests.fakes import route_table


class Kit:
    """One Runtime on a `FakeTransport`, the events it emitted, and a way to make requests."""

    def __init__(self, config: Config, clock: FakeClock, transport: FakeTransport, **runtime: Any) -> None:
        self.config = config
        self.clock = clock
        self.transport = transport
        self.events: list[Any] = []
        self.bus = signals.EventBus()
        self.bus.subscribe(self.events.append)
        self.runtime = Runtime(config, clock=clock, bus=self.bus, transport=transport, **runtime)
        # The stages as Runtime wired them, innermost first.
        self.fallback = self.runtime.fallback
        self.retry = self.fallback._retry
        self.attempt = self.retry._attempt
        self.cache = self.runtime.cache
        self.chain = self.runtime.chain

    def exchange(self, method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b"",
                 query: tuple[tuple[str, str], ...] = ()) -> Exchange:
        """A downstream request, resolved as the handler resolves it (service, route, deadline)."""
        service = self.config.service_for(path)
        assert service is not None, f"no service for {path}"
        route, params = service.route_for(path)
        rest = path[len(service.prefix.rstrip("/")):]
        return Exchange(request_id=uuid.uuid4().hex[:8], method=method, service=service, route=route, params=params,
                        path=path, rest=rest, query=query, headers=CIMultiDictProxy(CIMultiDict(headers or {})),
                        deadline_at=self.clock.monotonic() + service.deadline, body=body)

    def of(self, kind: type) -> list[Any]:
        """The emitted events of one type."""
        return [event for event in self.events if isinstance(event, kind)]

    def breaker(self, upstream: str) -> Any:
        return self.runtime.breakers[upstream]

    async def close(self) -> None:
        await self.runtime.close()


class HighestDraw(random.Random):
    """An RNG whose every draw is the top of its range: full-jitter backoff waits its whole cap."""

    def random(self) -> float:
        return 1.0


def kit(services: dict[str, Any], *, clock: FakeClock | None = None, env: dict[str, str] | None = None,
        rng: random.Random | None = None, **top: Any) -> Kit:
    """A Kit for `services` (route-table YAML as a dict), memory cache, on a fresh FakeTransport."""
    clock = clock or FakeClock()
    config = parse_config(route_table(services, **top), "routes.yaml", env or {})
    return Kit(config, clock, FakeTransport(clock), rng=rng or HighestDraw())
