"""What may be answered from the cache and what may be stored. Pure functions, no I/O."""

from __future__ import annotations

from typing import Any

CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
# A request carrying one may get a personal answer: never from (or into) a shared copy, unless keyed by it.
CREDENTIAL_HEADERS = ("Authorization", "Cookie")
# Conditional and range requests are answered by the upstream for this caller alone.
CONDITIONAL_HEADERS = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range", "Range")
# A request carrying one has a body (or asks to send one).
BODY_HEADERS = ("Expect", "Content-Length", "Transfer-Encoding")
# The HIT fast path's screen, as lower-case bytes (the raw header names a parser gives): a request
# carrying one of these goes the full way, where the rules below decide. Cache-Control is screened
# whole: only the full path reads its directives.
HIT_SCREENED = frozenset(name.lower().encode("ascii") for name in
                         (*CREDENTIAL_HEADERS, "Cache-Control", *CONDITIONAL_HEADERS, *BODY_HEADERS))


def _values(headers: Any, name: str) -> list[str]:
    if isinstance(headers, list):  # (name, value) pairs, as an Entry or an Answer holds them
        lower = name.lower()
        return [value for key, value in headers if key.lower() == lower]
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    value = headers.get(name)
    return [] if value is None else [value]


def parse_cache_control(headers: Any) -> dict[str, str | None]:
    """Cache-Control directives (every header line) as lower-cased name -> argument or None.

    Commas inside a quoted argument (`private="Set-Cookie, X-Id"`) do not split directives.
    The first occurrence of a directive wins.
    """
    directives: dict[str, str | None] = {}
    for line in _values(headers, "Cache-Control"):
        for item in _split_directives(line):
            name, sep, argument = item.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            value: str | None = None
            if sep:
                value = argument.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1].replace('\\"', '"')
            directives.setdefault(name, value)
    return directives


def _split_directives(line: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in line:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return items


def vary_names(headers: Any) -> frozenset[str]:
    """The request header names an answer's `Vary` lists (every line), lower case; `*` stays `*`."""
    return frozenset(name for line in _values(headers, "Vary") for name in
                     (part.strip().lower() for part in line.split(",")) if name)


def vary_covered(headers: Any, keyed: frozenset[str]) -> bool:
    """The answer varies only on request headers in `keyed`, those its key covers: it may answer
    any request with that key (a copy stored before Vary was honoured may vary on more)."""
    return not _values(headers, "Vary") or vary_names(headers) <= keyed


def has_credentials(headers: Any) -> bool:
    """The request carries Authorization or Cookie: its answer may be personal."""
    return any(name in headers for name in CREDENTIAL_HEADERS)


def is_conditional(headers: Any) -> bool:
    """A conditional or range request (`If-*`, `Range`): the upstream answers it for this caller alone."""
    return any(name in headers for name in CONDITIONAL_HEADERS)


def request_bypass_reason(method: str, headers: Any, *, keyed_by_credential: bool = False,
                          has_body: bool = False) -> str | None:
    """None when the request may be answered from (and stored to) the cache, else why not.

    Reasons: `method` (not GET/HEAD), `body` (a GET or HEAD with a body: it is forwarded with it,
    and the key does not cover it), `no-store` (the caller sent Cache-Control: no-store),
    `credentials` (Authorization or Cookie, unless the route keys copies by a hash of the
    credential: pass `keyed_by_credential=True` then). `credentials` is checked last, so a
    caller that only gets `credentials` knows nothing else stands in the way.
    """
    if method.upper() not in CACHEABLE_METHODS:
        return "method"
    if has_body:
        return "body"
    if "no-store" in parse_cache_control(headers):
        return "no-store"
    if not keyed_by_credential and has_credentials(headers):
        return "credentials"
    return None


def response_storable(
    status: int,
    headers: Any,
    body_len: int | None,
    *,
    cache_statuses: frozenset[int],
    max_body_bytes: int,
) -> str | None:
    """None when an upstream answer may be stored, else why not.

    Reasons: `status` (not in `cache_statuses`), `set-cookie`, `vary-star` (`Vary: *`: the answer
    depends on more than request headers, RFC 9111 §4.1), `no-store`, `private` (also
    `private="field"`), `too-large` (more than `max_body_bytes`, or an unknown length: a streamed
    body is never buffered for the cache).
    """
    if status not in cache_statuses:
        return "status"
    if "Set-Cookie" in headers:
        return "set-cookie"
    if "*" in vary_names(headers):
        return "vary-star"
    directives = parse_cache_control(headers)
    if "no-store" in directives:
        return "no-store"
    if "private" in directives:
        return "private"
    if body_len is None or body_len > max_body_bytes:
        return "too-large"
    return None
