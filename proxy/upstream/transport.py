"""The HTTP call to one upstream: the narrow cut between the chain's logic and the network.

One keep-alive connection pool per upstream (`http1.Pool`: no cookies, no redirects, no
decompression), URL and headers built from the route table, and every way an attempt
can fail turned into an `AttemptError` carrying its `Outcome`.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from proxy.chain.exchange import Exchange
from proxy.config.parse import HOP_BY_HOP, ServerSettings, Upstream
from proxy.config.routing import Template
from proxy.masking import Masker
from proxy.resilience.deadlines import Deadlines, for_running_loop
from proxy.resilience.outcome import Outcome
from proxy.upstream import http1

# `Expect` is answered by the proxy itself (the body is read before any upstream is chosen).
_NEVER_FORWARDED = HOP_BY_HOP | {"host", "content-length", "x-forwarded-host", "expect"}


class AttemptError(Exception):
    """An attempt that produced no usable HTTP answer (`refused`: nothing listens on the upstream's port)."""

    def __init__(self, outcome: Outcome, detail: str, *, refused: bool = False) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.refused = refused


class NoPathForUpstream(Exception):
    """The request's route does not give this upstream's path template its placeholders."""


@dataclass(slots=True)
class Reply:
    """An upstream's HTTP answer: buffered (`body`) or, when too large, an open `stream`."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    stream: http1.Response | None = None
    retry_after: str | None = None

    def release(self) -> None:
        if self.stream is not None:
            self.stream.release()
            self.stream = None


def connection_tokens(headers: Any) -> set[str]:
    """Header names a `Connection` header declares hop-by-hop."""
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


def end_to_end_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`end_to_end` for an answer's header list as it came off the wire."""
    drop = _NEVER_FORWARDED
    for name, value in pairs:
        if name.lower() == "connection":
            if drop is _NEVER_FORWARDED:
                drop = set(_NEVER_FORWARDED)
            drop.update(token.strip().lower() for token in value.split(",") if token.strip())
    return [(name, value) for name, value in pairs if name.lower() not in drop]


def end_to_end(headers: Any, extra_drop: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones (and what `Connection` names), order and duplicates kept."""
    drop = _NEVER_FORWARDED | extra_drop if extra_drop else _NEVER_FORWARDED
    if "Connection" in headers:
        drop = drop | connection_tokens(headers)
    return [(str(name), value) for name, value in headers.items() if name.lower() not in drop]


def build_url(upstream: Upstream, exchange: Exchange, values: dict[str, str]) -> URL:
    """The upstream URL for this attempt: base URL + path (template or rest) + query.

    `values` are the route's placeholders plus `upstream` and, with keys, `key`. The query is the
    caller's, then the upstream's `query`, then the route's own for this upstream (the query part of
    its `paths` entry), each later one winning; every value is percent-encoded here, once.
    """
    template = None
    route_query: tuple[tuple[str, Template], ...] = ()
    if exchange.route is not None:
        if upstream.name in exchange.route.skipped:
            raise NoPathForUpstream(upstream.name)
        template = exchange.route.paths.get(upstream.name)
        route_query = exchange.route.queries.get(upstream.name, ())
    if template is None:
        template = upstream.path
    if template is not None:
        if any(name not in values for name in template.names):
            raise NoPathForUpstream(upstream.name)
        path = template.render(values, encode=True)
    else:
        path = exchange.rest or ""
    base = upstream.url.raw_path.rstrip("/")
    query = list(exchange.query)
    own = upstream.query + route_query if route_query else upstream.query
    if own:
        names = {name for name, _ in own}
        query = [(k, v) for k, v in query if k not in names]  # the route table's values win
        table: dict[str, str] = {}
        for name, value in own:
            if any(n not in values for n in value.names):
                continue  # filled by another route's placeholder: not part of this request
            table.pop(name, None)  # a later setting replaces an earlier one, unset or not
            rendered = value.render(values, encode=False)
            if rendered:  # an optional key left unset (`${KEY:-}`) is not sent at all
                table[name] = rendered
        query.extend(table.items())
    return upstream.url.with_path(base + path, encoded=True).with_query(query) if query else \
        upstream.url.with_path(base + path, encoded=True)


_SECRET_NAME = re.compile(r"(key|token|secret|password|passwd|signature|sig|auth|credential|session)", re.I)


def masked_url(url: URL, upstream: Upstream) -> str:
    """The URL for logs: values of query parameters from ${VAR}, or named like a secret, are hidden, and so is
    every value from ${VAR} in any form, wherever it is (a key in the path, a key encoded in the query)."""
    if url.query_string:
        url = url.with_query([(k, "***" if k in upstream.secret_query or _SECRET_NAME.search(k) else v)
                              for k, v in url.query.items()])
    return Masker(upstream.secrets)(str(url)) if upstream.secrets else str(url)


class MaskedUrl:
    """An attempt's URL for logs, masked (`masked_url`) only when something turns it into text.

    Attempt events carry one of these: at the default level nothing writes a successful
    attempt's line, so the masking (and the URL's text) is never paid for on that path.
    """

    __slots__ = ("_url", "_upstream", "_text")

    def __init__(self, url: URL, upstream: Upstream) -> None:
        self._url = url
        self._upstream = upstream
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = masked_url(self._url, self._upstream)
        return self._text

    def __repr__(self) -> str:
        return repr(str(self))

    def __eq__(self, other: object) -> bool:
        return str(self) == (str(other) if isinstance(other, MaskedUrl) else other)

    def __hash__(self) -> int:
        return hash(str(self))


class HttpTransport:
    """Sends attempts to upstreams over one keep-alive connection pool per upstream."""

    def __init__(self, settings: ServerSettings, *, limit_per_upstream: int = 256) -> None:
        self._settings = settings
        self._limit = limit_per_upstream
        self._pools: dict[str, http1.Pool] = {}
        self._strip: dict[frozenset[str], frozenset[str]] = {}  # a service's forward_headers -> what is stripped
        self._deadlines: Deadlines | None = None  # the attempts' time limits, on the loop they run on

    def _pool(self, upstream: Upstream) -> http1.Pool:
        pool = self._pools.get(upstream.name)
        url = upstream.url
        if pool is None or pool.closed or pool.origin != (url.scheme, url.host, url.port):
            if pool is not None:
                pool.close()  # the upstream moved (a reload kept its name): its old connections go
            pool = self._pools[upstream.name] = http1.Pool(url, limit=self._limit, keepalive=30.0)
        return pool

    def with_settings(self, settings: ServerSettings) -> "HttpTransport":
        """The same connection pools under new settings (a reloaded route table's `server:`)."""
        other = HttpTransport(settings, limit_per_upstream=self._limit)
        other._pools = self._pools
        other._deadlines = self._deadlines
        return other

    def pool_usage(self, name: str) -> dict[str, int]:
        """The upstream's connection pool (`http1.Pool.usage`); zeros before its first attempt."""
        pool = self._pools.get(name)
        if pool is None or pool.closed:
            return {"open": 0, "idle": 0, "busy": 0, "waiting": 0, "limit": self._limit}
        return pool.usage()

    async def close(self, keep: set[str] | None = None) -> None:
        """Close the pools (all, or those of upstreams not in `keep`)."""
        for name in list(self._pools):
            if keep is None or name not in keep:
                self._pools.pop(name).close()

    def request_headers(self, upstream: Upstream, exchange: Exchange, values: dict[str, str]) -> CIMultiDict[str]:
        forward = exchange.service.forward_headers
        strip = self._strip.get(forward)
        if strip is None:
            strip = self._strip[forward] = self._settings.strip_headers - forward
        headers = CIMultiDict(end_to_end(exchange.headers, strip))
        for name, template in upstream.headers:
            if any(n not in values for n in template.names):
                continue
            value = template.render(values, encode=False)
            if value:
                headers[name] = value
        if exchange.trace is not None:  # W3C trace context: validated, never the caller's malformed one
            exchange.trace.apply(headers)
        return headers

    async def send(self, upstream: Upstream, exchange: Exchange, url: URL, headers: CIMultiDict[str],
                   timeout: float) -> Reply:
        """One HTTP attempt, bounded by `timeout` seconds until the body is buffered."""
        pool = self._pool(upstream)
        body: Any = exchange.body_stream if exchange.body_stream is not None else (exchange.body or None)
        target = url.raw_path_qs
        deadlines = self._deadlines = for_running_loop(self._deadlines)
        try:
            async with deadlines.after(timeout):
                response = await pool.request(exchange.method, target, headers, body, timeout)
                try:
                    return await self._read(response, exchange.method)
                except BaseException:
                    response.release()
                    raise
        except http1.ConnectTimeout:
            raise AttemptError(Outcome.CONNECT, "connect timeout") from None
        except http1.ConnectRefused as exc:
            raise AttemptError(Outcome.CONNECT, _describe(exc), refused=True) from None
        except http1.ConnectFailed as exc:
            raise AttemptError(Outcome.CONNECT, _describe(exc)) from None
        except TimeoutError:
            raise AttemptError(Outcome.TIMEOUT, f"no complete answer within {timeout:.3g}s") from None
        except http1.BadAnswer as exc:
            raise AttemptError(Outcome.MALFORMED, f"invalid HTTP answer: {_describe(exc)}") from None
        except (http1.Disconnected, OSError) as exc:
            raise AttemptError(Outcome.RESET, _describe(exc)) from None

    async def _read(self, response: http1.Response, method: str) -> Reply:
        headers = end_to_end_pairs(response.headers)
        length = response.content_length
        if method == "HEAD" and length is not None:
            # A HEAD answer's length describes the GET body it stands for: keep it.
            headers.append(("Content-Length", str(length)))
        retry_after = response.header("Retry-After")
        limit = self._settings.max_response_buffer
        if length is not None and length > limit:
            return Reply(response.status, response.reason, headers, b"", stream=response, retry_after=retry_after)
        body, complete = await response.read_all(limit)
        if not complete:
            # Larger than we buffer: stream what is left behind what we have.
            return Reply(response.status, response.reason, headers, body, stream=response, retry_after=retry_after)
        response.release()
        return Reply(response.status, response.reason, headers, body, retry_after=retry_after)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
