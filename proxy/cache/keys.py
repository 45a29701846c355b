"""Cache keys: which requests may share one stored copy. Pure functions, no I/O."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

# RFC 3986: unreserved characters mean the same encoded or not; everything else that may
# stand literally in a path stays literal, and a `%2F` is never the same as a `/`.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PATH_LITERAL = _UNRESERVED | frozenset(b"!$&'()*+,;=:@/")
_HEX = frozenset(b"0123456789abcdefABCDEF")
KEYED_HEADERS = frozenset({"accept-encoding"})  # request headers every cache key covers (lower case)


def normalise_path(path: str) -> str:
    """The path with percent-encoding made canonical.

    `%55SD` and `USD` become `USD`; `%2f` becomes `%2F` and stays encoded; a space or a non-ASCII
    character is encoded as UTF-8 `%XX`. Dot segments are left alone (they are refused earlier).
    Pass the raw path without the query string.
    """
    raw = path.encode("utf-8", "surrogatepass")
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        if byte == 0x25 and i + 2 < n and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
            decoded = int(raw[i + 1 : i + 3], 16)
            out.append(chr(decoded) if decoded in _UNRESERVED else f"%{decoded:02X}")
            i += 3
            continue
        out.append(chr(byte) if byte in _PATH_LITERAL else f"%{byte:02X}")
        i += 1
    return "".join(out)


def normalise_accept_encoding(value: str | None) -> str:
    """Lower-cased, whitespace-free, sorted, de-duplicated tokens: `gzip, br` == `BR,gzip`."""
    if not value:
        return ""
    tokens = {"".join(token.split()).lower() for token in value.split(",")}
    tokens.discard("")
    return ",".join(sorted(tokens))


def _header_value(headers: Any, name: str) -> str | None:
    """All values of `name` joined by commas, or None when the header is absent."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values = getall(name, [])
        return ",".join(values) if values else None
    return headers.get(name)


def _query_pairs(query: Iterable[tuple[str, str]] | Mapping[str, str]) -> list[tuple[str, str]]:
    items = query.items() if hasattr(query, "items") else query
    return sorted((str(name), str(value)) for name, value in items)


def cache_key(
    service: str,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]] | Mapping[str, str],
    headers: Any,
    vary: tuple[str, ...] = (),
    credential: str | None = None,
) -> str:
    """`"{service}:" + sha256 hex` naming the stored copy this request may be answered from.

    HEAD shares GET's key: the proxy answers a HEAD from a GET copy by dropping the body.
    `headers` is a case-insensitive mapping (e.g. aiohttp's `request.headers`); a multidict's
    repeated values are joined in order. `vary` names request headers whose values split the
    cache. `credential` (the caller's Authorization/Cookie value) is hashed in so one caller's
    copy is never served to another. The service prefix is what a purge matches on.
    """
    method = method.upper()
    if method == "HEAD":
        method = "GET"
    vary_names = sorted({name.lower() for name in vary})
    digest = hashlib.sha256()
    _feed(digest, method)
    _feed(digest, normalise_path(path))
    pairs = _query_pairs(query)
    _feed(digest, str(len(pairs)))
    for name, value in pairs:
        _feed(digest, name)
        _feed(digest, value)
    _feed(digest, normalise_accept_encoding(_header_value(headers, "Accept-Encoding")))
    _feed(digest, str(len(vary_names)))
    for name in vary_names:
        _feed(digest, name)
        _feed(digest, _normalise_vary_value(_header_value(headers, name)))
    _feed(digest, None if credential is None else hashlib.sha256(_utf8(credential)).hexdigest())
    return f"{service}:{digest.hexdigest()}"


def variant_key(key: str, vary: tuple[str, ...], headers: Any) -> str:
    """The key of the variant under `key` that a request with `headers` selects.

    `vary` names the request headers (lower case) the stored answer varies on (RFC 9111 §4.1):
    requests whose values for them match share a variant, absent distinct from empty. Same form
    as `cache_key`'s, so purging the service purges its variants.
    """
    service, _, primary = key.rpartition(":")
    digest = hashlib.sha256()
    _feed(digest, primary)
    _feed(digest, str(len(vary)))
    for name in vary:
        _feed(digest, name)
        _feed(digest, _normalise_vary_value(_header_value(headers, name)))
    return f"{service}:{digest.hexdigest()}"


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # never raises, even on odd input


def _feed(digest: Any, value: str | None) -> None:
    # Length-prefixed, with absent distinct from empty: no choice of values makes two requests collide.
    if value is None:
        digest.update(b"-")
        return
    data = _utf8(value)
    digest.update(b"+%d:" % len(data))
    digest.update(data)


def _normalise_vary_value(value: str | None) -> str | None:
    if value is None:
        return None
    return ",".join(part.strip() for part in value.split(","))
