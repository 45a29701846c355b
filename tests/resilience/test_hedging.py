"""Hedging: a safe request with no copy to fall back on, late on its upstream, also goes to the next
one; the first answer wins and the other try is given up (cancelled, or left to finish when nothing is
known yet of the upstream's answer times)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from proxy.resilience.hedging import HEDGE_AUTO, HedgePolicy, LatencyWindow
from tests.fakes import Delay, Fail, Ok, eventually, metric, route_table


def table(primary: str, secondary: str | None = None, *, cache: bool = False, **service: object) -> str:
    upstreams = [{"name": "fx_primary", "url": primary}]
    if secondary:
        upstreams.append({"name": "fx_secondary", "url": secondary})
    settings: dict[str, object] = {"timeout": "1s", "retry": "NONE"}
    if cache:
        settings["cache"] = {"ttl": "1m", "stale": "1h"}
    settings.update(service)
    return route_table({"fx": {**settings, "upstreams": upstreams}})


class RawUpstream:
    """An upstream on a raw socket that answers or hangs per request, and notes when a connection closes."""

    def __init__(self) -> None:
        self.script: list[str] = []   # "ok" or "hang", one per request; then `default`
        self.default = "ok"
        self.requests = 0
        self.closed_at: list[float] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> "RawUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                mode = self.script.pop(0) if self.script else self.default
                if mode == "hang":
                    await reader.read()  # until the client gives up and closes
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
                             b'{"from": "raw"}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed_at.append(time.monotonic())
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def raw_upstream():
    started: list[RawUpstream] = []

    async def start() -> RawUpstream:
        upstream = await RawUpstream().start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


# --- the pure half ------------------------------------------------------------------------------

def test_auto_hedges_after_the_recent_p95_and_never_before_the_floor():
    assert HEDGE_AUTO.delay(None) == 0.1
    assert HEDGE_AUTO.delay(0.02) == 0.1
    assert HEDGE_AUTO.delay(0.35) == 0.35
    assert HedgePolicy(after=0.05).delay(0.35) == 0.05


@pytest.mark.parametrize("after", [0, -1, math.nan, math.inf, True])
def test_a_hedge_delay_must_be_a_positive_number_of_seconds(after):
    with pytest.raises(ValueError):
        HedgePolicy(after=after)


def test_the_latency_window_keeps_the_p95_of_the_last_answers():
    window = LatencyWindow(size=100, every=10)
    assert window.p95 is None
    window.add(0.5)
    assert window.p95 == 0.5  # known from the first answer on
    for _ in range(99):
        window.add(0.01)
    assert window.p95 == 0.01  # the one slow answer is the slowest 1 %, under the p95
    for _ in range(100):
        window.add(0.2)
    assert window.p95 == 0.2  # older answers have left the window
    window.add(math.nan)
    window.add(-1.0)
    assert window.p95 == 0.2


# --- through the proxy -----------------------------------------------------------------------------

async def test_a_late_primary_is_hedged_and_its_try_cancelled_when_the_hedge_answers(raw_upstream, fake_upstream,
                                                                                     proxy_factory):
    primary = await raw_upstream()
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(table(primary.url, secondary.url, timeout="10s"))
    assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_primary"  # a fast answer: p95 known
    primary.default = "hang"
    response = await proxy.get("/fx/latest/USD")
    assert response.status == 200 and response.headers["X-Upstream"] == "fx_secondary"
    assert (primary.requests, secondary.calls) == (2, 1)
    # The lost try's connection was closed when the hedge answered, not at the 10 s timeout.
    assert await eventually(lambda: primary.closed_at, within=3.0)
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="hedge") == 1
    assert await metric(proxy, "external_requests_total", service="fx", provider="fx_primary",
                        outcome="hedge_lost") == 1
    assert proxy.breaker("fx_primary").failures == 1


async def test_consecutive_lost_hedges_open_the_breaker_and_then_nobody_waits(raw_upstream, fake_upstream,
                                                                               proxy_factory):
    primary = await raw_upstream()
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(table(primary.url, secondary.url, breaker="FAST"))
    await proxy.get("/fx/latest/USD")
    primary.default = "hang"
    for _ in range(3):
        assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    assert proxy.breaker("fx_primary").state.value == "OPEN"
    assert primary.requests == 4
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert primary.requests == 4  # skipped without a call
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="hedge") == 3


async def test_with_nothing_known_of_the_primary_its_lost_try_finishes_in_the_background(fake_upstream,
                                                                                           proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Delay(0.3, then=Ok(body=b'{"from": "primary"}')), Delay(0.15, then=Ok(body=b'{"from": "primary"}')))
    proxy = await proxy_factory(table(primary.url, secondary.url))
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_secondary"  # hedged at the 100 ms floor
    # The primary's answer arrives later and is learnt from: a success, and its answer time.
    latency = proxy.process.runtime.latencies["fx_primary"]
    assert await eventually(lambda: latency.p95 is not None, within=2.0)
    assert latency.p95 >= 0.3
    assert proxy.breaker("fx_primary").failures == 0
    # Now the primary's usual time is known: an answer in 150 ms is no longer hedged at the 100 ms floor.
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_primary"
    assert secondary.calls == 1


async def test_the_original_wins_when_it_answers_before_the_hedge(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(table(primary.url, secondary.url))
    await proxy.get("/fx/latest/USD")
    proxy.breaker("fx_primary").force_open()
    await proxy.get("/fx/latest/USD")  # the secondary's answer time is known too now
    proxy.breaker("fx_primary").reset()
    primary.default = Delay(0.3, then=Ok(body=b'{"from": "primary"}'))
    secondary.default = Delay(2.0)
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_primary"
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="original") == 1
    assert await metric(proxy, "external_requests_total", service="fx", provider="fx_secondary",
                        outcome="hedge_lost") == 1


async def test_a_post_is_never_hedged(raw_upstream, fake_upstream, proxy_factory):
    primary = await raw_upstream()
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(table(primary.url, secondary.url, timeout="300ms"))
    await proxy.get("/fx/latest/USD")
    primary.default = "hang"
    response = await proxy.request("POST", "/fx/orders", data=b"{}")
    assert response.status == 502  # timed out, and it may have been processed: no second upstream
    assert secondary.calls == 0
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="hedge") is None


async def test_a_request_with_a_copy_is_not_hedged_the_copy_answers_instead(raw_upstream, fake_upstream,
                                                                            proxy_factory, clock):
    primary = await raw_upstream()
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(table(primary.url, secondary.url, cache=True), clock=clock)
    await proxy.get("/fx/latest/USD")
    clock.advance(120)
    primary.default = "hang"
    stale = await proxy.get("/fx/latest/USD")
    assert stale.headers["X-Cache"] == "STALE" and stale.headers["Cache-Status"].endswith("detail=slow")
    assert secondary.calls == 0
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="hedge") is None


async def test_hedges_that_answer_first_cost_no_budget_those_that_lose_are_bounded_by_it(fake_upstream,
                                                                                           proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    text = table(primary.url, secondary.url)
    text = text.replace("services:", "defaults:\n  retry_budget: {ratio: 0.01, min_per_second: 0.1, window: 10s}\nservices:")
    proxy = await proxy_factory(text)
    await proxy.get("/fx/latest/USD")
    proxy.breaker("fx_primary").force_open()
    await proxy.get("/fx/latest/USD")  # the secondary's answer time is known too
    proxy.breaker("fx_primary").reset()
    # A hanging primary: each hedge answers first, as a fallback would, and costs nothing.
    primary.script(Delay(2.0), Delay(2.0), Delay(2.0))
    for _ in range(3):
        assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="hedge") == 3
    # A slow primary that still answers first: the hedge was load on top. The budget (about one
    # retry here) pays for one such hedge; the next late request is not hedged.
    primary.default = Delay(0.3, then=Ok(body=b'{"from": "primary"}'))
    secondary.default = Delay(1.0)
    for _ in range(2):
        assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_primary"
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="original") == 1
    assert proxy.process.runtime.budgets["fx_primary"].allows() is False


async def test_a_half_open_probe_is_never_hedged(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(table(primary.url, secondary.url, breaker="FAST"), clock=clock)
    await proxy.get("/fx/latest/USD")
    proxy.breaker("fx_primary").force_open()
    proxy.breaker("fx_primary").reset()
    for _ in range(3):
        proxy.breaker("fx_primary").allow().failure(0.01)
    clock.advance(30)  # HALF_OPEN: the next request is the probe
    primary.default = Delay(0.3, then=Ok(body=b'{"from": "primary"}'))
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_primary"
    assert proxy.breaker("fx_primary").state.value == "CLOSED"
    assert secondary.calls == 0


@pytest.mark.parametrize("hedge_after", ["off", "2s"])
async def test_hedge_after_off_or_longer_than_the_timeout_never_hedges(raw_upstream, fake_upstream, proxy_factory,
                                                                       hedge_after):
    primary = await raw_upstream()
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(table(primary.url, secondary.url, timeout="300ms", hedge_after=hedge_after))
    await proxy.get("/fx/latest/USD")
    primary.default = "hang"
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_secondary"  # after the primary's timeout, by fallback
    assert await metric(proxy, "external_requests_total", service="fx", provider="fx_primary", outcome="timeout") == 1
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="hedge") is None


async def test_a_fixed_hedge_after_on_one_upstream(raw_upstream, fake_upstream, proxy_factory):
    primary = await raw_upstream()
    secondary = await fake_upstream("secondary")
    text = table(primary.url, secondary.url).replace(f"url: {primary.url}", f"url: {primary.url}\n      hedge_after: 30ms")
    proxy = await proxy_factory(text)
    assert proxy.process.runtime.config.services["fx"].upstreams[0].hedge == HedgePolicy(after=0.03)
    await proxy.get("/fx/latest/USD")
    primary.default = "hang"
    assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="hedge") == 1


async def test_no_hedge_either_when_a_copy_waits_for_its_refresh(raw_upstream, fake_upstream, proxy_factory, clock):
    primary = await raw_upstream()
    secondary = await fake_upstream("secondary")
    text = table(primary.url, secondary.url, timeout="300ms").replace(
        "retry: NONE", "retry: NONE\n    cache: {ttl: 1m, stale: 1h, stale_if_slow: 'off'}")
    proxy = await proxy_factory(text, clock=clock)
    await proxy.get("/fx/latest/USD")
    clock.advance(120)
    primary.default = "hang"
    response = await proxy.get("/fx/latest/USD")
    assert (response.headers["X-Cache"], response.headers["X-Upstream"]) == ("MISS", "fx_secondary")
    assert await metric(proxy, "external_requests_total", service="fx", provider="fx_primary", outcome="timeout") == 1
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="hedge") is None


async def test_with_nothing_known_only_fail_threshold_lost_tries_are_left_to_finish(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Delay(5.0)  # hangs from the start: its answer time is never learnt
    proxy = await proxy_factory(table(primary.url, secondary.url, breaker="FAST", timeout="5s"))
    for _ in range(3):  # FAST: 3 tries are left to finish in the background
        assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    assert proxy.breaker("fx_primary").failures == 0
    for _ in range(3):  # the next ones are given up: three in a row open the breaker
        assert (await proxy.get("/fx/latest/USD")).headers["X-Upstream"] == "fx_secondary"
    assert proxy.breaker("fx_primary").state.value == "OPEN"
    assert await metric(proxy, "external_requests_total", service="fx", provider="fx_primary",
                        outcome="hedge_lost") == 3
    assert primary.calls == 6
    response = await proxy.get("/fx/latest/USD")
    assert response.headers["X-Upstream"] == "fx_secondary" and primary.calls == 6  # skipped, nobody waits


async def test_an_original_that_fails_after_the_hedge_was_sent_leaves_the_answer_to_the_hedge(fake_upstream,
                                                                                                proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(table(primary.url, secondary.url))
    await proxy.get("/fx/latest/USD")  # the primary's answer time is known: its lost tries are cancelled
    primary.script(Delay(0.3, then=Fail(503)), Delay(0.3, then=Fail(503)))
    secondary.script(Delay(0.5, then=Ok(body=b'{"from": "secondary"}')), Delay(0.2, then=Fail(503)))
    response = await proxy.get("/fx/latest/USD")
    assert (response.headers["X-Upstream"], await response.read()) == ("fx_secondary", b'{"from": "secondary"}')
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="hedge") == 1
    assert await metric(proxy, "external_requests_total", service="fx", provider="fx_primary",
                        outcome="http_5xx") == 1  # it failed on its own: not recorded as lost
    # Both fail: nobody won, and (every upstream said 5xx) no retry round follows.
    response = await proxy.get("/fx/latest/USD")
    assert response.status == 502
    assert [(a["upstream"], a["outcome"]) for a in (await response.json())["attempts"]] == [
        ("fx_primary", "http_5xx"), ("fx_secondary", "http_5xx")]
    assert await metric(proxy, "hedges_total", service="fx", provider="fx_primary", winner="none") == 1
    assert (primary.calls, secondary.calls) == (3, 2)
