"""The `Server` header the proxy's ports send: a name without versions (nginx's `server_tokens off`).

aiohttp would send `Python/3.x aiohttp/3.y` on every answer it writes, its own error pages
included; a version list only helps whoever looks for a known hole. An upstream's own Server
is replaced too (nginx hides it by default, Envoy overwrites it). The rendered answers
(`wire.render_head`) write `SERVER_NAME` themselves; aiohttp's servers get `request_factory`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

SERVER_NAME = "resilience-proxy"


class _NamedRequest(web.BaseRequest):
    """aiohttp's request, whose answers name the server `SERVER_NAME` (set as each answer starts)."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # Called after aiohttp filled in its default Server: ours replaces it, and an upstream's too.
        response.headers["Server"] = SERVER_NAME
        await super()._prepare_hook(response)


def request_factory(loop: asyncio.AbstractEventLoop | None = None) -> Any:
    """A `web.Server(request_factory=...)` whose every answer (aiohttp's error pages too) says `SERVER_NAME`."""
    running = loop or asyncio.get_running_loop()

    def make(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        return _NamedRequest(message, payload, protocol, writer, task, running)

    return make
