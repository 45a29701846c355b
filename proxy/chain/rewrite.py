"""From a downstream request to an upstream one: the URL, the forwarded headers, the URL as logs show it.

These need the route table and the `Exchange`, so they live on the chain's side of the cut;
the transport only sees the finished `UpstreamRequest`.
"""

from __future__ import annotations

import functools
import re

from multidict import CIMultiDict
from yarl import URL

from proxy.chain.exchange import Exchange
from proxy.config.model import Upstream
from proxy.config.routing import Template
from proxy.masking import Masker
from proxy.upstream.headers import end_to_end


class NoPathForUpstream(Exception):
    """The request's route does not give this upstream's path template its placeholders."""


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


@functools.lru_cache(maxsize=256)
def _stripped(strip_headers: frozenset[str], forward: frozenset[str]) -> frozenset[str]:
    """Caller headers held back: the server's `strip_headers` minus what the service forwards (memoised)."""
    return strip_headers - forward


def request_headers(upstream: Upstream, exchange: Exchange, values: dict[str, str],
                    strip_headers: frozenset[str]) -> CIMultiDict[str]:
    """The caller's end-to-end headers, less `strip_headers` the service does not forward, plus the
    upstream's own `headers` (a template whose placeholders this request lacks, or that renders empty, is left out)."""
    headers = CIMultiDict(end_to_end(exchange.headers, _stripped(strip_headers, exchange.service.forward_headers)))
    for name, template in upstream.headers:
        if any(n not in values for n in template.names):
            continue
        value = template.render(values, encode=False)
        if value:
            headers[name] = value
    if exchange.trace is not None:  # W3C trace context: validated, never the caller's malformed one
        exchange.trace.apply(headers)
    return headers


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
