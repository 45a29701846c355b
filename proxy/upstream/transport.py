"""The HTTP call to one upstream: `send(UpstreamRequest, timeout) -> Reply` over sockets.

One keep-alive connection pool per upstream (`http1.Pool`: no cookies, no redirects, no
decompression), and every way an attempt can fail turned into an `AttemptError` carrying
its `Outcome`. The request arrives finished (URL and headers are built by `chain/rewrite.py`);
this module knows nothing of routes or of the chain.
"""

from __future__ import annotations

from typing import Any

from yarl import URL

from proxy.config.model import ServerSettings
from proxy.resilience.deadlines import Deadlines, for_running_loop
from proxy.resilience.outcome import Outcome
from proxy.upstream import aiohttp_client, http1
from proxy.upstream.headers import end_to_end_pairs
from proxy.upstream.interface import AttemptError, Reply, UpstreamRequest

# `upstream_client` in the route table: whose HTTP client the pools are (docs/http-pieces.md).
_CLIENTS: dict[str, Any] = {"http1": http1.Pool, "aiohttp": aiohttp_client.Pool}


class HttpTransport:
    """Sends attempts to upstreams over one keep-alive connection pool per upstream."""

    def __init__(self, settings: ServerSettings, *, limit_per_upstream: int = 256, client: str = "http1") -> None:
        self._settings = settings
        self._limit = limit_per_upstream
        self.client = client
        self._pool_type = _CLIENTS[client]
        self._pools_shared = False  # handed on to a reloaded table's transport, which keeps those still used
        self._pools: dict[str, http1.Pool] = {}
        self._deadlines: Deadlines | None = None  # the attempts' time limits, on the loop they run on

    def _pool(self, name: str, url: URL) -> http1.Pool:
        pool = self._pools.get(name)
        if pool is None or pool.closed or pool.origin != (url.scheme, url.host, url.port):
            if pool is not None:
                pool.close()  # the upstream moved (a reload kept its name): its old connections go
            pool = self._pools[name] = self._pool_type(url, limit=self._limit, keepalive=30.0)
        return pool

    def with_settings(self, settings: ServerSettings, client: str | None = None) -> "HttpTransport":
        """The same connection pools under new settings (a reloaded route table's `server:`).

        With another `client`, the new table starts with pools of its own; this one's all close when it retires.
        """
        other = HttpTransport(settings, limit_per_upstream=self._limit, client=client or self.client)
        if other.client == self.client:
            other._pools = self._pools
            self._pools_shared = True
        other._deadlines = self._deadlines
        return other

    def pool_usage(self, name: str) -> dict[str, int | None]:
        """The upstream's connection pool as its client counts it (`Pool.usage`; None: not known)."""
        pool = self._pools.get(name)
        if pool is None or pool.closed:
            return self._pool_type.unused(self._limit)
        return pool.usage()

    def in_flight(self, name: str) -> int:
        """The upstream's attempts holding a connection or waiting for one."""
        pool = self._pools.get(name)
        return 0 if pool is None or pool.closed else pool.in_flight

    async def close(self, keep: set[str] | None = None) -> None:
        """Close the pools (all, or those of upstreams not in `keep` when they were handed on)."""
        for name in list(self._pools):
            if keep is None or not self._pools_shared or name not in keep:
                self._pools.pop(name).close()

    async def send(self, request: UpstreamRequest, timeout: float) -> Reply:
        """One HTTP attempt, bounded by `timeout` seconds until the body is buffered."""
        pool = self._pool(request.upstream, request.url)
        body: Any = request.body_stream if request.body_stream is not None else (request.body or None)
        deadlines = self._deadlines = for_running_loop(self._deadlines)
        try:
            async with deadlines.after(timeout):
                # The one call into the HTTP client (`upstream_client`: http1 or aiohttp, same interface).
                response = await pool.request(request.method, request.url.raw_path_qs, request.headers, body, timeout)
                try:
                    return await self._read(response, request.method)
                except BaseException:
                    response.release()
                    raise
        except http1.ConnectTimeout:
            raise AttemptError(Outcome.CONNECT, "connect timeout") from None
        except http1.ConnectRefused as exc:
            raise AttemptError(Outcome.CONNECT, _describe(exc), refused=True) from None
        except http1.HostUnknown as exc:
            # A connect error the walk never retries: the name will not exist a backoff later.
            raise AttemptError(Outcome.CONNECT, f"no such host: {_describe(exc)}", final=True) from None
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
