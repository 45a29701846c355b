"""One replica's line to the fleet: a client for writes and one pub/sub subscription.

Shared rests and shared breakers both publish what this replica learnt on a channel and apply
what the others publish. They share this link: one subscriber connection per replica, subscribed
to every fleet channel, reconnecting by itself with a backoff; after each (re)subscription every
channel's `catch_up` reads the state stored in keys, so nothing published while it was away is lost.
Works on one node, a Sentinel master (followed across failovers) and a Cluster (classic pub/sub
reaches every node there).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from proxy import signals
from proxy.fleet.connection import RedisTarget, open_client

TIMEOUT = 1.0
_RECONNECT_MAX = 10.0
_MAX_MESSAGE = 4096

Apply = Callable[[Any], Any]
CatchUp = Callable[[], Awaitable[None]]


class FleetLink:
    """The publisher client (`client`) and the listener every fleet channel shares."""

    def __init__(self, target: RedisTarget | str, *, emit: signals.Subscriber = signals.discard,
                 reconnect_after: float = 0.2) -> None:
        self._emit = emit
        self.client = open_client(target, socket_timeout=TIMEOUT, connect_timeout=TIMEOUT)
        # The listener blocks on reads for as long as nothing is published: no socket timeout there.
        self._subscriber = open_client(target, socket_timeout=None, connect_timeout=TIMEOUT)
        self._channels: dict[bytes, tuple[Apply, CatchUp | None]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._first_backoff = reconnect_after
        self.listening = False  # subscribed right now (for /health)
        self._told: bool | None = None  # what on_change listeners last heard (None: nothing yet)
        self._changed: list[Callable[[bool, str | None], None]] = []

    def on(self, channel: str, apply: Apply, catch_up: CatchUp | None = None) -> None:
        """Hand what is published on `channel` to `apply`; run `catch_up` after each subscription."""
        self._channels[channel.encode()] = (apply, catch_up)

    def on_change(self, listener: Callable[[bool, str | None], None]) -> None:
        """`listener(listening, error)` is called when the subscription is first made or fails, and
        on every change after that."""
        self._changed.append(listener)

    def start(self) -> None:
        if self._listener is None and self._channels:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        self.listening = False  # stopped on purpose: no "link down" to tell anyone
        await self.client.aclose()
        await self._subscriber.aclose()

    def _set_listening(self, listening: bool, error: str | None = None) -> None:
        self.listening = listening
        if listening != self._told:
            self._told = listening
            for listener in self._changed:
                listener(listening, error)

    async def _listen(self) -> None:
        backoff = self._first_backoff
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self._channels)
                for _, catch_up in self._channels.values():
                    if catch_up is not None:
                        await catch_up()  # after subscribing: nothing published meanwhile is missed
                self._set_listening(True)
                backoff = self._first_backoff
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    channel = message.get("channel")
                    handler = self._channels.get(channel if isinstance(channel, bytes) else str(channel).encode())
                    if handler is not None and isinstance(data, (bytes, bytearray)) and len(data) <= _MAX_MESSAGE:
                        handler[0](data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if self.listening:
                    self._emit(signals.CacheError(backend="redis", operation="fleet_listen", error=error))
                self._set_listening(False, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RECONNECT_MAX)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
