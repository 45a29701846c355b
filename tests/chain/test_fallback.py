"""Multi-upstream fallback: the next upstream answers when one is dead, slow, or failing."""

from __future__ import annotations

from tests.fakes import Delay, Fail, Ok, Reset, SlowBody, refused_port, route_table

NO_RETRY = "NONE"


def two_upstreams(primary: str, secondary: str, **service: object) -> str:
    settings = {"retry": NO_RETRY, "timeout": "300ms", "deadline": "3s"}
    settings.update(service)
    return route_table({"fx": {**settings, "upstreams": [
        {"name": "fx_primary", "url": primary}, {"name": "fx_secondary", "url": secondary}]}})


async def test_a_dead_primary_is_answered_by_the_secondary(fake_upstream, proxy_factory):
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(two_upstreams(f"http://127.0.0.1:{refused_port()}", secondary.url))
    response = await proxy.get("/fx/latest/USD")
    assert response.status == 200
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert await response.json() == {"from": "secondary"}
    assert secondary.calls == 1


async def test_a_primary_that_times_out_is_answered_by_the_secondary_within_the_deadline(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Delay(2.0)
    # Not hedged: the attempt's own timeout is what this is about (hedging: tests/resilience/test_hedging.py).
    proxy = await proxy_factory(two_upstreams(primary.url, secondary.url, hedge_after="off"))
    response = await proxy.get("/fx/latest/USD")
    assert response.status == 200
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert primary.calls == 1 and secondary.calls == 1
    # The primary's 2 s answer was not waited for: its 300 ms timeout ended the attempt.
    stats = await (await proxy.get("/health/integrations/stats?minutes=1")).json()
    assert stats["providers"]["fx_primary"]["errors"] == 1
    metrics = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
    assert 'external_request_errors_total{provider="fx_primary",reason="timeout",service="fx"} 1.0' in metrics


async def test_a_slow_body_counts_as_a_timeout_and_falls_back(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(SlowBody(2.0))
    proxy = await proxy_factory(two_upstreams(primary.url, secondary.url))
    response = await proxy.get("/fx/a")
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert await response.json() == {"from": "secondary"}


async def test_5xx_and_resets_fall_back_to_the_next_upstream(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    # aiohttp re-sends an idempotent request once when a *reused* keep-alive connection drops (the
    # stale-connection race), so a reset must happen twice in a row to reach us as an outcome.
    primary.script(Fail(503), Reset(times=2))
    proxy = await proxy_factory(two_upstreams(primary.url, secondary.url))
    outcomes = []
    for _ in range(2):
        response = await proxy.get("/fx/a")
        assert response.status == 200
        assert response.headers["X-Upstream"] == "fx_secondary"
        stats = await (await proxy.get("/health/integrations/stats?minutes=1")).json()
        outcomes.append(stats["providers"]["fx_primary"]["errors"])
    assert primary.calls == 3 and secondary.calls == 2
    assert outcomes == [1, 2]


async def test_every_upstream_failing_gives_502_with_each_attempt_and_outcome(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(500)
    secondary.default = Reset()
    proxy = await proxy_factory(two_upstreams(primary.url, secondary.url))
    response = await proxy.get("/fx/latest/USD", headers={"X-Request-ID": "r-502"})
    body = await response.json()
    assert response.status == 502
    assert response.headers["X-Cache"] == "MISS"
    assert body["error"] == "all_upstreams_failed"
    assert body["service"] == "fx"
    assert body["request_id"] == "r-502"
    assert [(a["upstream"], a["outcome"]) for a in body["attempts"]] == [
        ("fx_primary", "http_5xx"), ("fx_secondary", "reset")]
    assert body["attempts"][0]["status"] == 500


async def test_deadline_passing_gives_504(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Delay(3.0)
    proxy = await proxy_factory(two_upstreams(primary.url, secondary.url, timeout="2s", deadline="400ms",
                                              hedge_after="off"))
    response = await proxy.get("/fx/a")
    body = await response.json()
    assert response.status == 504
    assert body["error"] == "deadline_exceeded"
    assert [(a["upstream"], a["outcome"]) for a in body["attempts"]] == [
        ("fx_primary", "timeout"), ("fx_secondary", "deadline")]
    assert secondary.calls == 0


async def test_every_breaker_open_gives_503_without_calling_anyone(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(two_upstreams(primary.url, secondary.url))
    proxy.breaker("fx_primary").force_open()
    proxy.breaker("fx_secondary").force_open()
    response = await proxy.get("/fx/a")
    body = await response.json()
    assert response.status == 503
    assert body["error"] == "all_breakers_open"
    assert [a["outcome"] for a in body["attempts"]] == ["breaker_open", "breaker_open"]
    assert primary.calls == 0 and secondary.calls == 0


async def test_a_4xx_is_passed_through_without_fallback(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(404, body=b'{"error": "unknown currency"}')
    proxy = await proxy_factory(two_upstreams(primary.url, secondary.url, retry="DEFAULT"))
    response = await proxy.get("/fx/latest/XXX")
    assert response.status == 404
    assert await response.read() == b'{"error": "unknown currency"}'
    assert response.headers["X-Upstream"] == "fx_primary"
    assert primary.calls == 1 and secondary.calls == 0
    assert proxy.breaker("fx_primary").failures == 0


async def test_post_is_not_sent_to_a_second_upstream_after_the_first_may_have_seen_it(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)
    proxy = await proxy_factory(two_upstreams(primary.url, secondary.url, retry="AGGRESSIVE"))
    response = await proxy.request("POST", "/fx/orders", data=b'{"buy": 1}')
    assert response.status == 502
    assert primary.calls == 1 and secondary.calls == 0


async def test_post_moves_on_when_the_first_upstream_certainly_never_received_it(fake_upstream, proxy_factory):
    secondary = await fake_upstream("secondary")
    proxy = await proxy_factory(two_upstreams(f"http://127.0.0.1:{refused_port()}", secondary.url))
    response = await proxy.request("POST", "/fx/orders", data=b'{"buy": 1}')
    assert response.status == 200
    assert response.headers["X-Upstream"] == "fx_secondary"
    assert secondary.seen[0].body == b'{"buy": 1}'


async def test_post_with_an_idempotency_key_falls_back_and_replays_its_body(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)
    proxy = await proxy_factory(two_upstreams(primary.url, secondary.url))
    response = await proxy.request("POST", "/fx/orders", data=b'{"buy": 2}', headers={"Idempotency-Key": "k1"})
    assert response.status == 200
    assert primary.seen[0].body == secondary.seen[0].body == b'{"buy": 2}'


async def test_a_streamed_body_is_never_replayed_to_another_upstream(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)
    text = two_upstreams(primary.url, secondary.url)
    text = text.replace("metrics_listen: 127.0.0.1:0", "metrics_listen: 127.0.0.1:0\n  replay_buffer: 1KiB")
    proxy = await proxy_factory(text)
    response = await proxy.request("PUT", "/fx/doc", data=b"b" * 50_000)
    assert response.status == 502
    assert primary.calls == 1 and secondary.calls == 0
    assert len(primary.seen[0].body) == 50_000


async def test_recovered_primary_is_used_again(fake_upstream, proxy_factory):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.script(Fail(502))
    primary.default = Ok(body=b'{"from": "primary"}')
    proxy = await proxy_factory(two_upstreams(primary.url, secondary.url))
    first = await proxy.get("/fx/a")
    second = await proxy.get("/fx/a")
    assert first.headers["X-Upstream"] == "fx_secondary"
    assert second.headers["X-Upstream"] == "fx_primary"
