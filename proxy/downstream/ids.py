"""Who asks: request ids (the caller's `X-Request-ID` when it is a sane one, else a new one) and the
caller's address for the request log line."""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

# 16 random hex digits per process and a 16-digit counter: unique, 32 hex characters, and far
# cheaper than uuid4 (a urandom call per request).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> str:
    """A request id no other request of this process (or of its forks) has."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


def _reseed_ids() -> None:
    """A forked child must not repeat its parent's ids."""
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(8).hex()
    _ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


os.register_at_fork(after_in_child=_reseed_ids)


def request_id_of(request: Any) -> str:
    """The id a request is known by: its own `X-Request-ID` if well formed, else a new one."""
    given = request.headers.get("X-Request-ID")
    if given and _REQUEST_ID.match(given):
        return given
    return new_request_id()


def client_of(request: Any) -> str | None:
    """The caller's address for the request log line (None once its transport is gone)."""
    try:
        return request.remote
    except Exception:  # a transport already gone
        return None
