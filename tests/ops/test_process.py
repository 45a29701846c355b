"""The process as operators run it: `resilience-proxy run`, SIGTERM drain, SIGHUP and on-disk reloads."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.config.parse import load_config
from proxy.ops.process import ProxyProcess
from tests.fakes import Delay, Ok, free_port, route_table

ROOT = Path(__file__).resolve().parents[2]


class Served:
    """`python -m proxy run` in a subprocess, on free loopback ports."""

    def __init__(self, config: Path, env: dict[str, str] | None = None,
                 fd_limit: tuple[int, int] | None = None) -> None:
        self.port = free_port()
        self._fd_limit = fd_limit  # (soft, hard) RLIMIT_NOFILE the process starts with
        self.metrics_port = free_port()
        full_env = {**os.environ, "LOG_LEVEL": "warning", **(env or {})}
        self.process = asyncio.subprocess.Process  # set in start()
        self._args = [sys.executable, "-m", "proxy", "run", "--config", str(config),
                      "--listen", f"127.0.0.1:{self.port}", "--metrics-listen", f"127.0.0.1:{self.metrics_port}"]
        self._env = full_env

    async def start(self, session: aiohttp.ClientSession) -> "Served":
        limit = self._fd_limit
        self.process = await asyncio.create_subprocess_exec(
            *self._args, env=self._env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit)) if limit else None)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                async with session.get(self.url + "/health/ready") as response:
                    if response.status == 200:
                        return self
            except aiohttp.ClientConnectionError:
                pass
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"the proxy did not become ready: {await self.process.stderr.read()!r}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 20)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client:
        yield client


async def test_run_serves_the_committed_route_table_with_health_and_metrics(session):
    served = await Served(ROOT / "routes.yaml").start(session)
    try:
        health = await (await session.get(served.url + "/health")).json()
        assert set(health["services"]) == {"fx", "flights"}
        assert [p["providerName"] for p in health["services"]["fx"]["providers"]] == ["fx_primary", "fx_secondary"]
        metrics = await session.get(f"http://127.0.0.1:{served.metrics_port}/metrics")
        assert metrics.status == 200
        assert 'circuit_breaker_open{provider="fx_primary",service="fx"} 0.0' in await metrics.text()
        assert (await session.get(served.url + "/nowhere")).status == 404
    finally:
        assert await served.stop() == 0


async def test_sigterm_lets_in_flight_requests_finish_then_exits_cleanly(session, fake_upstream, tmp_path):
    upstream = await fake_upstream()
    upstream.default = Delay(1.0, then=Ok(body=b'{"slow": true}'))
    config = tmp_path / "routes.yaml"
    config.write_text(route_table({"fx": {"retry": "NONE", "upstreams": [{"name": "p", "url": upstream.url}]}}))
    served = await Served(config).start(session)
    in_flight = asyncio.create_task(session.get(served.url + "/fx/slow"))
    while upstream.calls == 0:
        await asyncio.sleep(0.02)
    served.process.send_signal(signal.SIGTERM)
    response = await asyncio.wait_for(in_flight, 10)
    assert response.status == 200
    assert await response.read() == b'{"slow": true}'
    assert await asyncio.wait_for(served.process.wait(), 15) == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        await session.get(served.url + "/health/live")


async def test_sighup_reloads_the_route_table_and_a_bad_file_keeps_the_old_one(session, fake_upstream, tmp_path):
    first = await fake_upstream("first")
    second = await fake_upstream("second")
    config = tmp_path / "routes.yaml"
    config.write_text(route_table({"fx": {"retry": "NONE", "upstreams": [{"name": "fx_primary", "url": first.url}]}}))
    served = await Served(config).start(session)
    try:
        assert (await session.get(served.url + "/rates/x")).status == 404
        config.write_text(route_table({
            "fx": {"retry": "NONE", "upstreams": [{"name": "fx_primary", "url": first.url}]},
            "rates": {"retry": "NONE", "upstreams": [{"name": "rates_primary", "url": second.url}]}}))
        served.process.send_signal(signal.SIGHUP)
        for _ in range(100):
            response = await session.get(served.url + "/rates/x")
            if response.status == 200:
                break
            await asyncio.sleep(0.05)
        assert response.status == 200 and response.headers["X-Upstream"] == "rates_primary"
        config.write_text("version: 1\nservices: {fx: {upstreams: [{name: a, url: 'ftp://nope'}]}}\n")
        served.process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        still = await session.get(served.url + "/rates/x")
        assert still.status == 200 and still.headers["X-Upstream"] == "rates_primary"
        metrics = await (await session.get(f"http://127.0.0.1:{served.metrics_port}/metrics")).text()
        assert 'config_reloads_total{result="error"} 1.0' in metrics
        assert 'config_reloads_total{result="ok"} 1.0' in metrics
    finally:
        assert await served.stop() == 0


def _write(path: Path, services: dict) -> None:
    path.write_text(route_table(services))


async def _process(path: Path, clock) -> tuple[ProxyProcess, aiohttp.ClientSession, str]:
    process = ProxyProcess(load_config(path, {}), clock=clock, env={})
    await process.start()
    host, port = process.addresses["main"]
    return process, aiohttp.ClientSession(), f"http://{host}:{port}"


async def test_admin_reload_keeps_breakers_and_copies_of_unchanged_upstreams_and_drops_removed_ones(fake_upstream, tmp_path, clock):
    a = await fake_upstream("a")
    b = await fake_upstream("b")
    path = tmp_path / "routes.yaml"
    fx = {"retry": "NONE", "cache": {"ttl": "1h"}, "upstreams": [{"name": "fx_primary", "url": a.url}]}
    old_service = {"retry": "NONE", "cache": {"ttl": "1h"}, "upstreams": [{"name": "old_primary", "url": b.url}]}
    _write(path, {"fx": fx, "old": old_service})
    process, client, url = await _process(path, clock)
    try:
        await client.get(url + "/fx/x")
        await client.get(url + "/old/x")
        process.runtime.breakers["fx_primary"].force_open()
        _write(path, {"fx": fx, "new": {"retry": "NONE", "upstreams": [{"name": "new_primary", "url": b.url}]}})
        reloaded = await client.post(url + "/health/reload")
        assert reloaded.status == 200
        assert process.runtime.breakers["fx_primary"].state.value == "OPEN"  # kept
        assert "old_primary" not in process.runtime.breakers
        hit = await client.get(url + "/fx/x")
        assert hit.headers["X-Cache"] == "HIT"  # the copy of an unchanged service is kept
        assert (await client.get(url + "/old/x")).status == 404
        assert (await client.get(url + "/new/x")).headers["X-Upstream"] == "new_primary"
        assert process.runtime.store.describe()["entries"] == 1  # the removed service's copy is gone
        circuits = await (await client.get(url + "/health/integrations/circuits")).json()
        assert [c["provider"] for c in circuits["circuits"]] == ["fx_primary", "new_primary"]
        stats = await (await client.get(url + "/health/integrations/stats?minutes=5")).json()
        assert sorted(stats["services"]) == ["fx", "new"]
        assert sorted(stats["providers"]) == ["fx_primary", "new_primary"]
    finally:
        await client.close()
        await process.stop()


async def test_admin_reload_of_an_invalid_file_is_400_with_the_check_messages_and_changes_nothing(fake_upstream, tmp_path, clock):
    a = await fake_upstream("a")
    path = tmp_path / "routes.yaml"
    _write(path, {"fx": {"retry": "NONE", "upstreams": [{"name": "fx_primary", "url": a.url}]}})
    process, client, url = await _process(path, clock)
    try:
        runtime = process.runtime
        path.write_text("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'http://a', speed: 11}]\n")
        response = await client.post(url + "/health/reload")
        body = await response.json()
        assert response.status == 400
        assert body["problems"] == [f"{path}:4: services.fx.upstreams[0]: unknown key 'speed' "
                                    "(allowed: breaker, headers, hedge_after, key_cooldown, keys, name, path, query, rate_limit, result_codes, retry, timeout, transform, url)"]
        assert process.runtime is runtime
        assert (await client.get(url + "/fx/x")).headers["X-Upstream"] == "fx_primary"
    finally:
        await client.close()
        await process.stop()


async def test_in_flight_requests_finish_on_the_old_table_during_a_reload(fake_upstream, tmp_path, clock):
    a = await fake_upstream("a")
    b = await fake_upstream("b")
    a.default = Delay(0.5, then=Ok(body=b'{"from": "a"}'))
    path = tmp_path / "routes.yaml"
    _write(path, {"fx": {"retry": "NONE", "upstreams": [{"name": "fx_a", "url": a.url}]}})
    process, client, url = await _process(path, clock)
    try:
        slow = asyncio.create_task(client.get(url + "/fx/x"))
        while a.calls == 0:
            await asyncio.sleep(0.01)
        _write(path, {"fx": {"retry": "NONE", "upstreams": [{"name": "fx_b", "url": b.url}]}})
        assert await process.reload("test") == []
        after = await client.get(url + "/fx/x")
        before = await slow
        assert before.headers["X-Upstream"] == "fx_a" and await before.read() == b'{"from": "a"}'
        assert after.headers["X-Upstream"] == "fx_b"
    finally:
        await client.close()
        await process.stop()


async def test_a_changed_file_on_disk_is_picked_up_by_the_watcher(fake_upstream, tmp_path, clock):
    a = await fake_upstream("a")
    path = tmp_path / "routes.yaml"
    _write(path, {"fx": {"retry": "NONE", "upstreams": [{"name": "fx_a", "url": a.url}]}})
    process, client, url = await _process(path, clock)
    process.start_watching(interval=0.05)
    try:
        _write(path, {"fx": {"retry": "NONE", "timeout": "2s", "upstreams": [{"name": "fx_a", "url": a.url}]},
                      "extra": {"retry": "NONE", "upstreams": [{"name": "extra_a", "url": a.url}]}})
        for _ in range(100):
            if "extra" in process.runtime.config.services:
                break
            await asyncio.sleep(0.02)
        assert "extra" in process.runtime.config.services
        assert (await client.get(url + "/extra/x")).status == 200
        path.write_text("not: [valid")
        await asyncio.sleep(0.3)
        assert "extra" in process.runtime.config.services  # a broken edit is rejected, the table keeps serving
    finally:
        await client.close()
        await process.stop()


async def test_counts_held_for_the_loop_turn_do_not_bring_a_removed_upstream_back(fake_upstream, tmp_path, clock):
    # A request's attempt on an upstream is counted when the held per-request events go out; a reload
    # before that which removes the upstream forgets it, and the attempt delivered afterwards must not
    # bring it back.
    from proxy import signals
    from tests.observability.test_metrics import value

    a = await fake_upstream("a")
    b = await fake_upstream("b")
    path = tmp_path / "routes.yaml"
    _write(path, {"fx": {"retry": "NONE", "upstreams": [{"name": "fx_a", "url": a.url}, {"name": "fx_b", "url": b.url}]}})
    process, client, url = await _process(path, clock)
    try:
        process.bus.emit(signals.AttemptFinished(service="fx", provider="fx_a", outcome="success", status=200,
                                                duration=0.01, attempt=1, method="GET", url="http://a", request_id="r1"))
        _write(path, {"fx": {"retry": "NONE", "upstreams": [{"name": "fx_b", "url": b.url}]}})
        assert await process.reload("test") == []
        await asyncio.sleep(0)
        assert value(process.metrics, "external_requests_total", service="fx", provider="fx_a", outcome="success") is None
        assert value(process.metrics, "external_requests_total", service="fx", provider="fx_b", outcome="success") == 0
        assert "fx_a" not in process.stats.window(5)["providers"]
    finally:
        await client.close()
        await process.stop()


async def test_counts_of_a_request_finishing_while_the_table_closes_are_not_lost_at_stop(
        fake_upstream, tmp_path, clock, monkeypatch):
    from proxy import signals

    monkeypatch.setattr(signals, "PER_REQUEST_HOLD", 3600.0)  # nothing goes out by its timer in this test
    a = await fake_upstream("a")
    path = tmp_path / "routes.yaml"
    _write(path, {"fx": {"retry": "NONE", "upstreams": [{"name": "fx_a", "url": a.url}]}})
    process, client, url = await _process(path, clock)
    await client.close()
    seen = []
    process.bus.subscribe(seen.append)
    close = process.runtime.close

    async def close_while_background_work_finishes_a_request():
        process.bus.emit(signals.RequestFinished(
            service="fx", route="/fx", method="GET", path="/fx/a", status=200, cache="MISS", upstream="fx_a",
            attempts=(("fx_a", "success"),), duration=0.01, request_id="late-1"))
        await close()

    monkeypatch.setattr(process.runtime, "close", close_while_background_work_finishes_a_request)
    await process.stop()
    assert [e.request_id for e in seen if isinstance(e, signals.RequestFinished)] == ["late-1"]


async def test_a_malformed_request_is_one_json_line_without_the_callers_bytes(session, tmp_path):
    config = tmp_path / "routes.yaml"
    config.write_text(route_table({"fx": {"upstreams": [{"name": "p", "url": "http://127.0.0.1:1"}]}}))
    served = await Served(config).start(session)
    try:
        for request in (b"GET /fx/a HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer se\x01cret-7f3a\r\n\r\n",
                        b"GET /fx/a?api_key=se\x7fcret-7f3a HTTP/1.1\r\nHost: p\r\n\r\n",
                        b"POST /fx/a HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(request)
            assert (await reader.read(65536)).split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
            writer.close()
    finally:
        assert await served.stop() == 0
    output = (await served.process.stdout.read() + await served.process.stderr.read()).decode()
    assert "cret-7f3a" not in output and "Traceback" not in output
    lines = [orjson.loads(line) for line in output.splitlines()]  # every line is JSON
    bad = [line for line in lines if line.get("kind") == "bad_request"]
    assert len(bad) == 3
    assert {(line["logger"], line["level"], line["status"]) for line in bad} == {("aiohttp.server", "warning", 400)}
    assert bad[0]["event"] == "Error handling request from 127.0.0.1"
    assert bad[0]["detail"] == "Invalid header value char"


async def test_idle_connections_past_the_fd_limit_do_not_lock_callers_out(session, fake_upstream, tmp_path):
    """1,100 idle connections against a 1,024 fd limit locked real callers out; here, 300 against 64."""
    upstream = await fake_upstream()
    config = tmp_path / "routes.yaml"
    config.write_text(route_table({"fx": {"retry": "NONE", "upstreams": [{"name": "p", "url": upstream.url}]}}))
    served = await Served(config, fd_limit=(64, 256)).start(session)
    idle = []
    try:
        limits = Path(f"/proc/{served.process.pid}/limits").read_text()
        assert re.search(r"Max open files\s+256\s+256", limits)  # the soft limit was raised to the hard one
        for _ in range(300):
            idle.append(await asyncio.open_connection("127.0.0.1", served.port))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as caller:
            async with caller.get(served.url + "/fx/a", timeout=aiohttp.ClientTimeout(total=5)) as response:
                assert response.status == 200
        closed = sum(1 for reader, _ in idle if reader.at_eof() or reader.exception() is not None)
        assert closed > 0  # the oldest idle ones made room
    finally:
        for _, writer in idle:
            writer.close()
        assert await served.stop() == 0


async def test_a_reload_applies_new_connection_bounds_to_the_proxy_port(tmp_path, clock):
    path = tmp_path / "routes.yaml"
    services = {"fx": {"upstreams": [{"name": "p", "url": "http://127.0.0.1:1"}]}}
    _write(path, services)
    process, client, url = await _process(path, clock)
    try:
        path.write_text(route_table(services, server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                                                      "header_timeout": "2s", "keepalive_timeout": "20s",
                                                      "max_connections": 50}))
        assert await process.reload("test") == []
        front = process._front
        assert (front.header_timeout, front.keepalive_timeout, front.max_connections) == (2.0, 20.0, 50)
        reader, writer = await asyncio.open_connection(*process.addresses["main"])
        writer.write(b"DELETE /fx/a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # a connection aiohttp takes
        assert b" 502 " in await reader.readuntil(b"\r\n")
        assert [h.keepalive_timeout for h in front.handed] == [20.0]  # aiohttp's own idle timer agrees
        writer.close()
    finally:
        await client.close()
        await process.stop()
