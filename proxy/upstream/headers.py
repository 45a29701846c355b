"""Which headers cross the proxy: hop-by-hop ones (RFC 9110 §7.6.1) and what `Connection` names stay behind."""

from __future__ import annotations

from typing import Any

from proxy.config.values import HOP_BY_HOP

# `Expect` is answered by the proxy itself (the body is read before any upstream is chosen).
NEVER_FORWARDED = HOP_BY_HOP | {"host", "content-length", "x-forwarded-host", "expect"}


def connection_tokens(headers: Any) -> set[str]:
    """Header names a `Connection` header declares hop-by-hop."""
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


def end_to_end_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`end_to_end` for an answer's header list as it came off the wire."""
    drop = NEVER_FORWARDED
    for name, value in pairs:
        if name.lower() == "connection":
            if drop is NEVER_FORWARDED:
                drop = set(NEVER_FORWARDED)
            drop.update(token.strip().lower() for token in value.split(",") if token.strip())
    return [(name, value) for name, value in pairs if name.lower() not in drop]


def end_to_end(headers: Any, extra_drop: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones (and what `Connection` names), order and duplicates kept."""
    drop = NEVER_FORWARDED | extra_drop if extra_drop else NEVER_FORWARDED
    if "Connection" in headers:
        drop = drop | connection_tokens(headers)
    return [(str(name), value) for name, value in headers.items() if name.lower() not in drop]
