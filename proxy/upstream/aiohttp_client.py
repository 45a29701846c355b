"""The upstream client on aiohttp's ClientSession: the reference `http1` is checked against.

`upstream_client: aiohttp` in the route table puts this in place of `http1.Pool` (see
docs/http-pieces.md). It offers the same small interface the transport uses (`Pool.request`
returning an answer with `status`, `reason`, `headers`, `read`, `read_all`, `release`) and
raises `http1`'s errors, so the transport classifies a failure the same way whichever client
made it. What could change the bytes we forward is off: no proxy from the environment, no
cookies, no redirects, no decompression, no default `User-Agent`, `Accept`, `Accept-Encoding`
or `Content-Type`.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from yarl import URL

from proxy.upstream.http1 import BadAnswer, ConnectFailed, ConnectTimeout, Disconnected, connect_failure
from proxy.upstream.http1.answer import read_up_to

# Headers ClientSession adds unless told not to; http1 sends none of them, and neither do we.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_HEAD_LIMIT = 65536  # a header line as long as http1's whole head may be (its MAX_HEAD_BYTES)


class Response:
    """An aiohttp answer behind `http1.Response`'s interface."""

    __slots__ = ("status", "reason", "headers", "content_length", "_response", "_pool", "_done")

    def __init__(self, response: aiohttp.ClientResponse, pool: "Pool") -> None:
        self._response = response
        self._pool = pool
        self._done = False
        self.status = response.status
        self.reason = response.reason or ""
        self.headers = [(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                        for name, value in response.raw_headers]
        self.content_length = response.content_length

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        return self._response.headers.get(name)

    async def read(self) -> bytes:
        """The next piece of the body; b"" once it is complete. Raises Disconnected or BadAnswer."""
        try:
            chunk = await self._response.content.readany()
        except aiohttp.ClientPayloadError as exc:
            raise _payload_error(exc) from None
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise Disconnected(str(exc) or "Server disconnected before the answer was complete") from None
        if not chunk:
            self._done = True
        return chunk

    async def read_all(self, limit: int) -> tuple[bytes, bool]:
        """The body up to `limit` bytes, and whether that was all of it (else the rest is to `read`)."""
        return await read_up_to(self.read, limit)

    def release(self) -> None:
        """Done with this answer: the connection is kept when the body was read to its end, else closed."""
        response = self._response
        if self._pool is None:
            return
        if self._done:
            response.release()
        else:
            response.close()
        self._pool.finished()
        self._pool = None  # type: ignore[assignment]


class Pool:
    """Keep-alive connections to one origin through one ClientSession, at most `limit` at a time."""

    def __init__(self, url: URL, *, limit: int = 256, keepalive: float = 30.0) -> None:
        if url.scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {url.scheme!r}")
        self.origin = (url.scheme, url.host, url.port)
        self._base = url.origin()  # credentials become a header below, as http1 sends them
        self.authorization = None
        if url.user is not None:
            token = base64.b64encode(f"{url.user}:{url.password or ''}".encode()).decode()
            self.authorization = f"Basic {token}"
        self._limit = limit
        self._keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None
        self._active = 0  # answers not released yet: a closed pool closes its session after the last
        self._sending = 0  # attempts whose answer's head is not in yet
        self.closed = False

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # As http1: names resolved at each new connection, a limit per upstream, idle ones closed after `keepalive`.
            connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=0, keepalive_timeout=self._keepalive,
                                             use_dns_cache=False)
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_NO_AUTO_HEADERS, timeout=aiohttp.ClientTimeout(total=None),
                max_line_size=_HEAD_LIMIT, max_field_size=_HEAD_LIMIT, raise_for_status=False)
        return self._session

    @staticmethod
    def unused(limit: int) -> dict[str, int | None]:
        """`usage()` before any attempt: the limit, and counts aiohttp's connector does not tell."""
        return {"open": None, "idle": None, "busy": None, "waiting": None, "limit": limit}

    def usage(self) -> dict[str, int | None]:
        """As `http1.Pool.usage`, but aiohttp's connector does not say how many connections are open, idle or
        waited for (only its private fields do): those are None, and `in_flight` is what this pool counts."""
        return self.unused(self._limit)

    @property
    def in_flight(self) -> int:
        """Attempts sent through this pool whose answer is not released yet (waiting for a connection included)."""
        return self._sending + self._active

    async def request(self, method: str, target: str, headers: Any,
                      body: bytes | AsyncIterator[bytes] | None, connect_timeout: float) -> Response:
        """Send one request; returns once the answer's status and headers are in."""
        if self.closed:
            raise ConnectFailed("the upstream's connection pool is closed (route table reloaded)")
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise ValueError(f"header {name!r} holds a line break or a colon: refused (request splitting)")
        if self.authorization is not None and "Authorization" not in headers:
            headers = headers.copy()
            headers["Authorization"] = self.authorization
        session = self._open_session()
        url = URL(str(self._base) + target, encoded=True)
        # Only the socket's connect, as http1 bounds it: a wait for a free connection is the caller's deadline's.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        self._sending += 1
        try:
            response = await session.request(method, url, headers=headers, data=body or None,
                                             allow_redirects=False, timeout=timeout, compress=None)
        except aiohttp.ConnectionTimeoutError:
            raise ConnectTimeout("connect timeout") from None
        except aiohttp.ClientConnectorError as exc:
            failure = connect_failure(exc.os_error)
            raise failure(str(exc)) from None
        except aiohttp.ClientResponseError as exc:
            raise BadAnswer(exc.message or str(exc)) from None
        except aiohttp.ClientPayloadError as exc:
            raise _payload_error(exc) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise Disconnected(str(exc) or "Server disconnected") from None
        except aiohttp.ClientConnectionError as exc:
            raise Disconnected(str(exc) or type(exc).__name__) from None
        finally:
            self._sending -= 1
        self._active += 1
        answer = Response(response, self)
        if method == "HEAD" or response.status in (204, 304):
            answer._done = True  # no body follows, whatever the head announced
        return answer

    def finished(self) -> None:
        """An answer was released."""
        self._active -= 1
        if self.closed and self._active == 0:
            self._close_session()

    def close(self) -> None:
        """Close idle connections now; connections in use close when their answer is released."""
        self.closed = True
        if self._active == 0:
            self._close_session()

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            task = asyncio.get_running_loop().create_task(session.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()  # sessions closing in the background: kept from the collector


def _payload_error(exc: aiohttp.ClientPayloadError) -> Exception:
    """A body cut short by the close is a `Disconnected`; a body framed wrongly is a `BadAnswer`."""
    text = str(exc)
    if "Not enough data" in text:  # aiohttp's ContentLengthError / TransferEncodingError at the close
        return Disconnected(f"Server disconnected before the answer was complete ({text[:120]})")
    return BadAnswer(text)

