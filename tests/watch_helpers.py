"""What the watch unit tests share: a route table with a watched route, and a Runtime on it (no process)."""

from __future__ import annotations

import orjson

from proxy import signals
from proxy.chain.build import Runtime
from proxy.config.parse import parse_config
from tests.fakes import Ok, route_table


def flight(status: str, gate: str = "3") -> Ok:
    return Ok(body=orjson.dumps({"flight": "KE001", "status": status, "gate": gate}))


def watched_table(upstream: str, *, webhook: str | None = None, attempts: int = 3, watch: bool = True,
                  topics: list[str] | None = None) -> str:
    route: dict = {"match": "/flights/status/{flight}"}
    if watch:
        route["watch"] = {"interval": "5m", "fields": "{status: status, gate: gate}"}
        if webhook:
            route["watch"]["deliver"] = {"webhook": webhook, "secret": "s3cret-hook", "attempts": attempts}
        if topics:
            route["watch"]["topics"] = topics
    service = {"retry": "NONE", "routes": [route], "upstreams": [{"name": "flights_kac", "url": upstream}]}
    return route_table({"flights": service})


def runtime_for(text: str, clock) -> Runtime:
    """A Runtime (the chain and its parts) on a route table: what a process would hold, without one."""
    return Runtime(parse_config(text, "routes.yaml", {}), clock=clock, bus=signals.EventBus())
