"""A lean HTTP/1.1 client for the calls to upstreams: pooled keep-alive connections, no more.

aiohttp's ClientSession cost as much per request as all the rest of a minimal proxy:
request and response objects with tracing hooks, cookie, redirect, proxy and
decompression machinery that the transport turns off anyway. This client does what an
attempt needs: one connection pool per origin (a limit, LIFO reuse, idle connections
closed after `keepalive` seconds), the request written in one call, the answer parsed by
httptools (llhttp, the parser of Node.js) and handed back once its headers are in, the
body buffered or read in chunks with back-pressure. Timeouts are the caller's
(`asyncio.timeout`); only the connect step has its own.

An answer's head is collected here until its blank line, bounded as it arrives, and only
then handed to llhttp, whole and in canonical form: bare LF line ends become CRLF and an
obs-fold becomes one space (RFC 9112 §2.2, §5.2), so llhttp stays strict about everything
else. What could be read two ways is refused as a `BadAnswer`: whitespace before the colon
or before the first header, a folded Content-Length, Transfer-Encoding or Connection, a
bare CR, control characters, an interim (1xx) answer announcing a body. A connection whose
answer was framed inconsistently (a 204 or 304 announcing a body) is never reused: the
bytes it announced may still come.

A request on a *reused* connection that closes before any byte of the answer arrives is
sent once more on a new connection when the method is idempotent and the body is in
memory: the upstream closed an idle connection as we picked it up (the race every
keep-alive client meets), and that is not a failure of the upstream.
"""

from proxy.upstream.http1.answer import (
    MAX_HEAD_BYTES,
    BadAnswer,
    ConnectFailed,
    ConnectRefused,
    ConnectTimeout,
    Disconnected,
    HostUnknown,
    Response,
    connect_failure,
)
from proxy.upstream.http1.connection import _Connection
from proxy.upstream.http1.pool import Pool

__all__ = ["MAX_HEAD_BYTES", "BadAnswer", "ConnectFailed", "ConnectRefused", "ConnectTimeout", "Disconnected",
           "HostUnknown", "Pool", "Response", "_Connection", "connect_failure"]
