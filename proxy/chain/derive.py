"""Derived routes: answered from another route's answer plus a transform.

`/fx/rate/{base}/{quote}` can be answered from the `/fx/latest/{base}` copy, so a single
rate lookup costs no upstream call of its own when the rates are cached — and one shared,
coalesced call when they are not. The source request goes through the normal chain (cache,
breakers, fallback, stale), so a derived answer is exactly as resilient as its source.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import orjson

from proxy.adapters.transform import TransformError, decode_json, evaluate
from proxy.chain.exchange import Answer, Exchange

Chain = Callable[[Exchange], Awaitable[Answer]]
_NOT_DERIVED = frozenset({"content-type", "content-encoding", "content-length", "etag", "last-modified"})


class DerivedStage:
    def __init__(self, chain: Chain) -> None:
        self._chain = chain

    def __call__(self, exchange: Exchange) -> Awaitable[Answer]:
        route = exchange.route
        if route is None or route.derive is None:
            # Not derived: hand back the next stage's awaitable itself, so this stage adds no
            # coroutine frame that every suspension of the request would pass through.
            return self._chain(exchange)
        return self._derive(exchange)

    async def _derive(self, exchange: Exchange) -> Answer:
        route = exchange.route
        assert route is not None and route.derive is not None
        derive = route.derive
        path = derive.source.render(exchange.params, encode=True)
        source_route, source_params = exchange.service.route_for(derive.source.render(exchange.params, encode=False))
        source = Exchange(
            request_id=exchange.request_id, method="GET", service=exchange.service, route=source_route,
            params=source_params, path=path, rest=path[len(exchange.service.prefix.rstrip("/")):], query=(),
            headers=exchange.headers, deadline_at=exchange.deadline_at, attempts=exchange.attempts)
        answer = await self._chain(source)
        if answer.status != 200 or answer.stream is not None:
            return answer  # the source's own error (a 404 for an unknown base, say) is the answer
        try:
            result = evaluate(derive.transform, exchange.params, decode_json(answer.body, answer.headers))
        except TransformError as exc:
            result, detail = None, str(exc)
        else:
            detail = "nothing matches"
        headers = [(k, v) for k, v in answer.headers if k.lower() not in _NOT_DERIVED]
        headers.append(("Content-Type", "application/json"))
        if result is None:
            body = {"error": "not_found", "detail": detail, "service": exchange.service.name, "path": exchange.path}
            return Answer(status=404, headers=headers, body=orjson.dumps(body), upstream=answer.upstream,
                          cache=answer.cache, age=answer.age, cache_status=answer.cache_status, fallback=answer.fallback)
        return Answer(status=200, headers=headers, body=orjson.dumps(result), upstream=answer.upstream,
                      cache=answer.cache, age=answer.age, cache_status=answer.cache_status, fallback=answer.fallback)
