"""The HTTP call to one upstream: the narrow cut between the chain's logic and the network.

One pooled `ClientSession` per upstream (keep-alive, no cookie jar, no redirects, no
decompression), URL and headers built from the route table, and every way an attempt
can fail turned into an `AttemptError` carrying its `Outcome`.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from .config import HOP_BY_HOP, ServerSettings, Upstream
from .exchange import Exchange
from .outcome import Outcome

_CHUNK = 64 * 1024
# `Expect` is answered by the proxy itself (the body is read before any upstream is chosen).
_NEVER_FORWARDED = HOP_BY_HOP | {"host", "content-length", "x-forwarded-host", "expect"}


class AttemptError(Exception):
    """An attempt that produced no usable HTTP answer."""

    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


class NoPathForUpstream(Exception):
    """The request's route does not give this upstream's path template its placeholders."""


@dataclass(slots=True)
class Reply:
    """An upstream's HTTP answer: buffered (`body`) or, when too large, an open `stream`."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    stream: aiohttp.ClientResponse | None = None
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


def end_to_end(headers: Any, extra_drop: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones (and what `Connection` names), order and duplicates kept."""
    drop = _NEVER_FORWARDED | extra_drop if extra_drop else _NEVER_FORWARDED
    if "Connection" in headers:
        drop = drop | connection_tokens(headers)
    return [(str(name), value) for name, value in headers.items() if name.lower() not in drop]


def build_url(upstream: Upstream, exchange: Exchange, values: dict[str, str]) -> URL:
    """The upstream URL for this attempt: base URL + path (template or rest) + query.

    `values` are the route's placeholders plus `upstream` and, with keys, `key`.
    """
    template = None
    if exchange.route is not None:
        template = exchange.route.paths.get(upstream.name)
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
    if upstream.query:
        own = {name for name, _ in upstream.query}
        query = [(k, v) for k, v in query if k not in own]  # the route table's values win
        for name, value in upstream.query:
            if any(n not in values for n in value.names):
                continue  # filled by another route's placeholder: not part of this request
            rendered = value.render(values, encode=False)
            if rendered:  # an optional key left unset (`${KEY:-}`) is not sent at all
                query.append((name, rendered))
    return upstream.url.with_path(base + path, encoded=True).with_query(query) if query else \
        upstream.url.with_path(base + path, encoded=True)


_SECRET_NAME = re.compile(r"(key|token|secret|password|passwd|signature|sig|auth|credential|session)", re.I)


def masked_url(url: URL, upstream: Upstream) -> str:
    """The URL for logs: values of query parameters from ${VAR}, or named like a secret, are hidden."""
    if not url.query_string:
        return str(url)
    query = [(k, "***" if k in upstream.secret_query or _SECRET_NAME.search(k) else v) for k, v in url.query.items()]
    return str(url.with_query(query))


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
    """Sends attempts to upstreams over one pooled session per upstream."""

    def __init__(self, settings: ServerSettings, *, limit_per_upstream: int = 256) -> None:
        self._settings = settings
        self._limit = limit_per_upstream
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._strip: dict[frozenset[str], frozenset[str]] = {}  # a service's forward_headers -> what is stripped

    def _session(self, upstream: Upstream) -> aiohttp.ClientSession:
        session = self._sessions.get(upstream.name)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=30, ttl_dns_cache=300)
            session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,            # gzip passes through untouched
                cookie_jar=aiohttp.DummyCookieJar(),  # never carry one caller's cookies to another
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                read_bufsize=_CHUNK,
            )
            self._sessions[upstream.name] = session
        return session

    def with_settings(self, settings: ServerSettings) -> "HttpTransport":
        """The same connection pools under new settings (a reloaded route table's `server:`)."""
        other = HttpTransport(settings, limit_per_upstream=self._limit)
        other._sessions = self._sessions
        return other

    async def close(self, keep: set[str] | None = None) -> None:
        """Close sessions (all, or those of upstreams not in `keep`)."""
        for name in list(self._sessions):
            if keep is None or name not in keep:
                await self._sessions.pop(name).close()

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
        return headers

    async def send(self, upstream: Upstream, exchange: Exchange, url: URL, headers: CIMultiDict[str],
                   timeout: float) -> Reply:
        """One HTTP attempt, bounded by `timeout` seconds until the body is buffered."""
        session = self._session(upstream)
        data: Any = exchange.body_stream if exchange.body_stream is not None else (exchange.body or None)
        try:
            async with asyncio.timeout(timeout):
                response = await session.request(
                    exchange.method, url, headers=headers, data=data,
                    allow_redirects=False, timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout),
                )
                try:
                    return await self._read(response)
                except BaseException:
                    response.release()
                    raise
        # aiohttp's timeout errors subclass TimeoutError: the most specific come first.
        except aiohttp.ConnectionTimeoutError:
            raise AttemptError(Outcome.CONNECT, "connect timeout") from None
        except aiohttp.ServerTimeoutError:
            raise AttemptError(Outcome.TIMEOUT, "read timeout") from None
        except TimeoutError:
            raise AttemptError(Outcome.TIMEOUT, f"no complete answer within {timeout:.3g}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise AttemptError(Outcome.CONNECT, _describe(exc)) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            raise AttemptError(Outcome.RESET, _describe(exc)) from None
        except aiohttp.ClientResponseError as exc:
            raise AttemptError(Outcome.MALFORMED, f"invalid HTTP answer: {exc.message}") from None
        except aiohttp.ClientError as exc:
            raise AttemptError(Outcome.RESET, _describe(exc)) from None

    async def _read(self, response: aiohttp.ClientResponse) -> Reply:
        headers = end_to_end(response.headers)
        if response.method == "HEAD" and "Content-Length" in response.headers:
            # A HEAD answer's length describes the GET body it stands for: keep it.
            headers.append(("Content-Length", response.headers["Content-Length"]))
        retry_after = response.headers.get("Retry-After")
        limit = self._settings.max_response_buffer
        length = response.content_length
        if length is not None and length > limit:
            return Reply(response.status, response.reason or "", headers, b"", stream=response, retry_after=retry_after)
        if length is not None:
            # A declared length within the buffer limit: read it whole, in one go.
            body_bytes = await response.read()
            response.release()
            return Reply(response.status, response.reason or "", headers, body_bytes, retry_after=retry_after)
        body = bytearray()
        while True:
            chunk = await response.content.read(_CHUNK)
            if not chunk:
                break
            body += chunk
            if len(body) > limit:
                # Unknown length and larger than we buffer: stream what is left behind what we have.
                return Reply(response.status, response.reason or "", headers, bytes(body), stream=response,
                             retry_after=retry_after)
        response.release()
        return Reply(response.status, response.reason or "", headers, bytes(body), retry_after=retry_after)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
