"""What the proxy says when it starts: its version, and the upstreams that will be called without a key."""

from __future__ import annotations

import platform

import structlog

from proxy import __version__
from proxy.config.model import Config, Upstream

log = structlog.get_logger("resilience-proxy")


def version_text() -> str:
    """`resilience-proxy 0.1.0 (Python 3.11.7)`: what `--version` prints."""
    return f"resilience-proxy {__version__} (Python {platform.python_version()})"


def empty_credentials(upstream: Upstream) -> list[str]:
    """Headers and query parameters of `upstream` that resolve to nothing.

    An unset `${KEY:-}` leaves the value empty (the proxy then leaves it out) or, inside a
    scheme such as `Bearer ${KEY}`, the scheme alone; either way the vendor sees no key.
    """
    found = []
    for kind, items in (("header", upstream.headers), ("query", upstream.query)):
        for name, template in items:
            if template.names:
                continue  # filled per request from the path, not from the environment
            text = template.text
            if not text.strip() or (text.endswith(" ") and len(text.split()) == 1):
                found.append(f"{kind} {name}")
    return found


def announce(config: Config, main: tuple[str, int] | None, metrics: tuple[str, int] | None) -> None:
    """The start line, then one warning per upstream whose key resolves empty."""
    log.info("resilience-proxy serving", version=__version__, python=platform.python_version(),
             listen=f"{main[0]}:{main[1]}" if main else None,
             metrics=f"{metrics[0]}:{metrics[1]}" if metrics else None, config=config.source,
             services=sorted(config.services), cache=config.cache.backend)
    for upstream in config.upstreams():
        empty = empty_credentials(upstream)
        if empty:
            log.warning("an upstream key resolves empty: it is called without it (an unset ${VAR:-}?)",
                        kind="config", service=upstream.service, provider=upstream.name, empty=empty)
