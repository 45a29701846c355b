"""Keep-alive connections to one origin: a limit, LIFO reuse, idle ones closed after `keepalive` seconds."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from yarl import URL

from proxy.upstream.http1.answer import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    Response,
    _NothingReceived,
    connect_failure,
)
from proxy.upstream.http1.connection import _Connection

_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_LENGTH_EXPECTED = frozenset({"POST", "PUT", "PATCH"})


class Pool:
    """Keep-alive connections to one origin, at most `limit` at a time."""

    def __init__(self, url: URL, *, limit: int = 256, keepalive: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if url.scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {url.scheme!r}")
        self.origin = (url.scheme, url.host, url.port)
        self._host = url.raw_host or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if url.scheme == "https" else None
        self.host_header = url.host_port_subcomponent or self._host
        self.authorization = None
        if url.user is not None:  # credentials in the URL, as a browser or aiohttp would send them
            token = base64.b64encode(f"{url.user}:{url.password or ''}".encode()).decode()
            self.authorization = f"Basic {token}"
        self._limit = limit
        self._keepalive = keepalive
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False

    @staticmethod
    def unused(limit: int) -> dict[str, int | None]:
        """`usage()` of a pool no attempt has used yet."""
        return {"open": 0, "idle": 0, "busy": 0, "waiting": 0, "limit": limit}

    def usage(self) -> dict[str, int | None]:
        """Connections open, idle and busy (an answer being read), callers waiting for one, and the limit."""
        idle = len(self._idle)
        return {"open": self._open, "idle": idle, "busy": self._open - idle, "waiting": len(self._waiters),
                "limit": self._limit}

    @property
    def in_flight(self) -> int:
        """Attempts holding a connection or waiting for one."""
        return self._open - len(self._idle) + len(self._waiters)

    async def request(self, method: str, target: str, headers: Any,
                      body: bytes | AsyncIterator[bytes] | None, connect_timeout: float) -> Response:
        """Send one request; returns once the answer's status and headers are in."""
        head = self._head(method, target, headers, body)
        head_only = method == "HEAD"
        connection, reused = await self._acquire(connect_timeout)
        try:
            return await connection.send(head, body, head_only)
        except _NothingReceived:
            if not (reused and method in _REPLAYABLE and not isinstance(body, AsyncIterator)):
                raise Disconnected("Server disconnected") from None
        except BaseException:
            connection.discard()
            raise
        connection, _ = await self._acquire(connect_timeout, fresh=True)
        try:
            return await connection.send(head, body, head_only)
        except _NothingReceived:
            raise Disconnected("Server disconnected") from None
        except BaseException:
            connection.discard()
            raise

    def _head(self, method: str, target: str, headers: Any, body: Any) -> bytes:
        """The request line and headers; `headers` is a multidict (every value of every name is sent)."""
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        if self.authorization is not None and "Authorization" not in headers:
            lines.append(f"Authorization: {self.authorization}\r\n")
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise ValueError(f"header {name!r} holds a line break or a colon: refused (request splitting)")
            lines.append(f"{name}: {value}\r\n")
        if isinstance(body, bytes) or body is None:
            if body or method in _LENGTH_EXPECTED:
                lines.append(f"Content-Length: {len(body or b'')}\r\n")
        else:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    async def _acquire(self, connect_timeout: float, fresh: bool = False) -> tuple[_Connection, bool]:
        if self.closed:
            raise ConnectFailed("the upstream's connection pool is closed (route table reloaded)")
        loop = asyncio.get_running_loop()
        while True:
            if not fresh:
                now = loop.time()
                while self._idle:
                    connection = self._idle.pop()
                    if not connection.closed and now - connection.idle_since < self._keepalive:
                        return connection, True
                    self._close(connection)
            elif self._open >= self._limit and self._idle:
                # A new connection is wanted (the re-send): the oldest idle one makes room for it.
                self._retire(self._idle.pop(0), wake=False)
            if self._open < self._limit:
                break
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the slot we were given on
                raise
        self._open += 1
        made: list[_Connection] = []

        def protocol() -> _Connection:
            made.append(_Connection(self))
            return made[0]

        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(protocol, self._host, self._port, ssl=self._ssl,
                                             server_hostname=(self._host.strip("[]") if self._ssl else None))
        except TimeoutError:
            self._abandon(made)
            raise ConnectTimeout("connect timeout") from None
        except OSError as exc:
            self._abandon(made)
            failure = connect_failure(exc)
            raise failure(f"Cannot connect to host {self.host_header} [{exc.strerror or exc}]") from None
        except BaseException:
            self._abandon(made)
            raise
        return made[0], False

    def _abandon(self, made: list[_Connection]) -> None:
        """A connect that did not finish gives its slot back, once: its connection may already be lost."""
        if made:
            self._retire(made[0])
        else:
            self._slot_freed()

    def put_back(self, connection: _Connection, reusable: bool) -> None:
        if reusable and not self.closed:
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
            self._wake_one()
        else:
            self._close(connection)

    def lost(self, connection: _Connection) -> None:
        """A connection closed (by either side): it no longer counts against the limit."""
        self._count_out(connection)

    def _close(self, connection: _Connection) -> None:
        connection._abort() if connection.transport is not None else self.lost(connection)

    def _retire(self, connection: _Connection, wake: bool = True) -> None:
        """Close `connection` and give its slot back now rather than when asyncio reports it lost."""
        connection._abort()
        self._count_out(connection, wake)

    def _count_out(self, connection: _Connection, wake: bool = True) -> None:
        """Take `connection` off the pool's books, once, whichever of `lost` and `_retire` comes first."""
        if connection in self._idle:
            self._idle.remove(connection)
        if not connection.counted_out:
            connection.counted_out = True
            self._open -= 1
            if wake:
                self._wake_one()

    def _slot_freed(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close idle connections now; connections in use close when their answer is released."""
        self.closed = True
        for connection in list(self._idle):
            self._close(connection)
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the upstream's connection pool is closed"))
        self._waiters.clear()
