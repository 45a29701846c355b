"""W3C trace context: what reaches the upstream, what the log lines say, and spans over OTLP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from aiohttp import web

from proxy.config.parse import ConfigError, parse_config
from proxy.observability.tracing import parse_traceparent, start_trace, valid_tracestate
from tests.downstream.test_hit_path import ChainCalls
from tests.fakes import Fail, Ok, route_table

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ONE_RETRY = {"retries": 1, "base_delay": "1ms", "max_delay": "1ms"}

# What reaches the upstream and the logs must not depend on which front end read the request or which client sent it.
pytestmark = pytest.mark.http_pieces("front", "client")


def table(url: str, *, retry: object = "NONE", cache: object = None, **top: object) -> str:
    return route_table({"fx": {"retry": retry, "cache": cache or {"ttl": "0s"},
                               "routes": [{"match": "/fx/latest/{base}", "name": "latest"}],
                               "upstreams": [{"name": "fx_primary", "url": url}]}}, **top)


def sent_traceparent(upstream) -> str:
    [value] = upstream.seen[-1].headers.getall("traceparent")
    return value


# --- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, why", [
    (TRACEPARENT.upper(), "upper-case hex"),
    (f"00-{'0' * 32}-{PARENT_ID}-01", "an all-zero trace id"),
    (f"00-{TRACE_ID}-{'0' * 16}-01", "an all-zero parent id"),
    (f"ff-{TRACE_ID}-{PARENT_ID}-01", "version ff"),
    (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", "version 00 with more after it"),
    (f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", "a short trace id"),
    (f"00-{TRACE_ID}-{PARENT_ID}-1", "one-digit flags"),
    (f"00_{TRACE_ID}_{PARENT_ID}_01", "wrong separators"),
    (f"00-{TRACE_ID[:-1]}g-{PARENT_ID}-01", "not hex"),
    ("", "empty"),
    ("Bearer secret-token-value", "anything else"),
])
def test_a_malformed_traceparent_is_not_parsed(value, why):
    assert parse_traceparent(value) is None, why


def test_a_valid_traceparent_and_a_later_version_are_parsed():
    assert parse_traceparent(TRACEPARENT) == (TRACE_ID, PARENT_ID, 1)
    # A later version may add fields: what version 00 defines is read, the rest left out.
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT_ID}-00-more") == (TRACE_ID, PARENT_ID, 0)
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT_ID}-00x") is None


def test_tracestate_limits():
    assert valid_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert not valid_tracestate("a=" + "x" * 600)
    assert not valid_tracestate("a=1\nb=2")
    assert not valid_tracestate(",".join(f"k{n}=v" for n in range(40)))


def test_without_spans_a_caller_s_context_goes_on_unchanged_and_a_missing_one_is_started():
    kept = start_trace(TRACEPARENT, "rojo=1", recording=False)
    assert (kept.header, kept.state, kept.trace_id) == (TRACEPARENT, "rojo=1", TRACE_ID)
    started = start_trace(None, "rojo=1", recording=False)
    assert started.trace_id != TRACE_ID and started.state is None  # no tracestate without a traceparent
    assert started.header == f"00-{started.trace_id}-{started.span_id}-00"
    recorded = start_trace(TRACEPARENT, None, recording=True)
    # With spans exported we are a hop: the upstream's parent is our span, the trace stays the caller's.
    assert recorded.header == f"00-{TRACE_ID}-{recorded.span_id}-01" and recorded.parent_id == PARENT_ID
    assert len({start_trace(None, None, recording=False).trace_id for _ in range(100)}) == 100


# --- through the proxy ---------------------------------------------------------------------

async def test_a_traceparent_reaches_the_upstream_and_its_trace_id_is_in_the_log(fake_upstream, proxy_factory,
                                                                               clock, log_lines):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    answer = await proxy.get("/fx/latest/USD", headers={"traceparent": TRACEPARENT, "tracestate": "rojo=00f0"})
    assert answer.status == 200
    assert sent_traceparent(upstream) == TRACEPARENT
    assert upstream.seen[-1].headers["tracestate"] == "rojo=00f0"
    proxy.process.bus.deliver_waiting()
    lines = log_lines()
    [request] = [line for line in lines if line.get("kind") == "request"]
    [attempt] = [line for line in lines if line.get("kind") == "attempt"]
    assert request["trace_id"] == TRACE_ID and attempt["trace_id"] == TRACE_ID
    assert request["request_id"] == answer.headers["X-Request-ID"]


@pytest.mark.parametrize("headers", [
    {"traceparent": "00-not-a-trace-01", "tracestate": "rojo=00f0"},
    {"traceparent": TRACEPARENT.upper(), "tracestate": "rojo=00f0"},
], ids=["garbage", "upper-case"])
async def test_a_malformed_traceparent_is_replaced_never_forwarded(fake_upstream, proxy_factory, clock, log_lines,
                                                                  headers):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    assert (await proxy.get("/fx/latest/USD", headers=headers)).status == 200
    sent = sent_traceparent(upstream)
    assert sent != headers["traceparent"]
    parsed = parse_traceparent(sent)
    assert parsed is not None and parsed[0] != TRACE_ID
    assert "tracestate" not in upstream.seen[-1].headers  # it went with the traceparent it belonged to
    proxy.process.bus.deliver_waiting()
    [request] = [line for line in log_lines() if line.get("kind") == "request"]
    assert request["trace_id"] == parsed[0]  # our logs and the upstream's share the new id


async def test_two_traceparent_headers_count_as_malformed(fake_upstream, proxy_factory, clock):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    other = f"00-{'1' * 32}-{PARENT_ID}-01"
    await proxy.get("/fx/latest/USD", headers=[("traceparent", TRACEPARENT), ("traceparent", other)])
    parsed = parse_traceparent(sent_traceparent(upstream))
    assert parsed is not None and parsed[0] not in (TRACE_ID, "1" * 32)


async def test_without_a_traceparent_each_request_starts_a_trace_the_upstream_shares(fake_upstream, proxy_factory,
                                                                                    clock, log_lines):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    for _ in range(2):
        await proxy.get("/fx/latest/USD")
    sent = [seen.headers["traceparent"] for seen in upstream.seen]
    for value in sent:
        assert parse_traceparent(value) is not None and value.endswith("-00")  # nothing of ours is recorded
    proxy.process.bus.deliver_waiting()
    requests = [line for line in log_lines() if line.get("kind") == "request"]
    assert [line["trace_id"] for line in requests] == [parse_traceparent(v)[0] for v in sent]
    assert requests[0]["trace_id"] != requests[1]["trace_id"]


async def test_every_line_a_request_logs_carries_its_trace_id(fake_upstream, proxy_factory, clock, log_lines):
    upstream = await fake_upstream()
    upstream.script(Fail(503))
    upstream.default = Ok()
    proxy = await proxy_factory(table(upstream.url, retry=ONE_RETRY), clock=clock)
    assert (await proxy.get("/fx/latest/USD", headers={"traceparent": TRACEPARENT})).status == 200
    assert (await proxy.get("/fx/latest/USD")).status == 200  # another request: another id
    proxy.process.bus.deliver_waiting()
    lines = log_lines()
    retry = [line for line in lines if line.get("kind") == "retry"]
    assert retry and all(line["trace_id"] == TRACE_ID for line in retry)  # logged inside the request
    mine = [line for line in lines if line.get("trace_id") == TRACE_ID]
    assert {line["kind"] for line in mine} == {"attempt", "breaker", "retry", "request"}
    assert len([line for line in mine if line["kind"] == "attempt"]) == 2
    others = [line for line in lines if line.get("kind") == "request" and line["trace_id"] != TRACE_ID]
    assert len(others) == 1
    # Outside any request, nothing carries a trace id.
    structlog.get_logger("resilience-proxy").info("after the requests")
    assert "trace_id" not in log_lines()[-1]


async def test_a_stale_answer_s_line_carries_its_request_s_trace_id(fake_upstream, proxy_factory, clock, log_lines):
    """The stale line is held and written with later requests' lines: it names its own trace."""
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url, cache={"ttl": "1s", "stale": "1h"}), clock=clock)
    assert (await proxy.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    clock.advance(5)
    upstream.default = Fail(503)
    stale = await proxy.get("/fx/latest/USD", headers={"traceparent": TRACEPARENT})
    assert stale.headers["X-Cache"] == "STALE"
    upstream.default = Ok()
    assert (await proxy.get("/fx/latest/EUR")).status == 200  # another request, in between
    proxy.process.bus.deliver_waiting()
    [line] = [line for line in log_lines() if line.get("kind") == "stale"]
    assert (line["trace_id"], line["reason"]) == (TRACE_ID, "error")


async def test_a_fast_hit_logs_the_caller_s_trace_id(fake_upstream, proxy_factory, clock, log_lines):
    upstream = await fake_upstream()
    upstream.default = Ok(body=b"{}", headers={"Content-Type": "application/json"})
    proxy = await proxy_factory(table(upstream.url, cache={"ttl": "1h"}), clock=clock)
    await proxy.get("/fx/latest/USD")
    hit = await proxy.get("/fx/latest/USD", headers={"traceparent": TRACEPARENT})
    assert hit.headers["X-Cache"] == "HIT"
    proxy.process.bus.deliver_waiting()
    requests = [line for line in log_lines() if line.get("kind") == "request"]
    assert requests[-1]["x_cache"] == "HIT" and requests[-1]["trace_id"] == TRACE_ID


async def test_a_refusal_logs_its_trace_id(fake_upstream, proxy_factory, clock, log_lines):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    assert (await proxy.get("/nowhere", headers={"traceparent": TRACEPARENT})).status == 404
    proxy.process.bus.deliver_waiting()
    [refused] = [line for line in log_lines() if line.get("event") == "request refused"]
    assert refused["trace_id"] == TRACE_ID and refused["status"] == 404 and refused["error"] == "no_route"


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("tracing, message", [
    ({"otlp_endpoint": "ftp://collector:4318"}, "tracing.otlp_endpoint"),
    ({"otlp_endpoint": "http://user:pw@collector:4318"}, "tracing.otlp_endpoint"),
    ({"otlp_endpoint": 4318}, "tracing.otlp_endpoint"),
    ({"service_name": ""}, "tracing.service_name"),
    ({"endpoint": "http://collector:4318"}, "tracing: unknown key 'endpoint'"),
])
def test_bad_tracing_settings_are_refused(tracing, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(table("http://127.0.0.1:1", tracing=tracing), "routes.yaml", {})
    assert message in str(caught.value)


def test_a_bare_collector_address_gets_the_traces_path():
    config = parse_config(table("http://127.0.0.1:1", tracing={"otlp_endpoint": "http://collector:4318"}),
                          "routes.yaml", {})
    assert config.tracing.otlp_endpoint == "http://collector:4318/v1/traces"
    assert config.tracing.service_name == "resilience-proxy"
    assert parse_config(table("http://127.0.0.1:1"), "routes.yaml", {}).tracing.otlp_endpoint is None


def test_opentelemetry_is_not_imported_when_tracing_is_off(tmp_path):
    # redis-py imports `opentelemetry` itself where it is installed; the SDK's tracing and exporter are ours.
    routes = tmp_path / "routes.yaml"
    routes.write_text(table("http://127.0.0.1:1"))
    script = (
        "import sys\n"
        "from proxy.config.parse import load_config\n"
        "from proxy.ops.process import ProxyProcess\n"
        f"process = ProxyProcess(load_config({str(routes)!r}, {{}}), env={{}})\n"
        "assert process.spans is None\n"
        "print(sorted(m for m in sys.modules if m == 'proxy.observability.otlp' or\n"
        "             m.startswith(('opentelemetry.exporter', 'opentelemetry.sdk.trace'))))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- spans over OTLP/HTTP ------------------------------------------------------------------

class FakeCollector:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that keeps the spans it is sent (protobuf)."""

    def __init__(self) -> None:
        self.spans: list = []
        self.resources: list = []
        self.content_types: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "FakeCollector":
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def _traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.content_types.append(request.content_type)
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            self.resources.append({a.key: a.value.string_value for a in resource_spans.resource.attributes})
            for scope in resource_spans.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def attributes(span) -> dict:
    out = {}
    for item in span.attributes:
        value = item.value
        out[item.key] = value.string_value if value.HasField("string_value") else \
            value.int_value if value.HasField("int_value") else value.bool_value
    return out


async def test_spans_reach_an_otlp_collector(fake_upstream, proxy_factory, clock):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the [otel] extra is not installed")
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    collector = await FakeCollector().start()
    try:
        upstream = await fake_upstream()
        upstream.script(Fail(503))
        upstream.default = Ok(body=b"{}", headers={"Content-Type": "application/json"})
        proxy = await proxy_factory(table(upstream.url, retry=ONE_RETRY, cache={"ttl": "1h"},
                                          tracing={"otlp_endpoint": collector.url, "service_name": "fx-sidecar"}),
                                    clock=clock)
        assert (await proxy.get("/fx/latest/USD", headers={"traceparent": TRACEPARENT})).status == 200
        sent = parse_traceparent(sent_traceparent(upstream))
        assert sent is not None and sent[0] == TRACE_ID and sent[1] != PARENT_ID  # our span is its parent
        proxy.process.bus.deliver_waiting()
        assert await asyncio.to_thread(proxy.process.spans.force_flush, 10_000)
        spans = collector.spans
        assert collector.content_types == ["application/x-protobuf"]
        assert collector.resources[0]["service.name"] == "fx-sidecar"
        assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
        [request] = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
        assert request.span_id.hex() == sent[1] and request.parent_span_id.hex() == PARENT_ID
        assert request.name == "GET latest"
        assert attributes(request)["http.response.status_code"] == 200
        attempts = [s for s in spans if s.kind == Span.SPAN_KIND_CLIENT]
        assert [attributes(a)["proxy.outcome"] for a in sorted(attempts, key=lambda s: s.start_time_unix_nano)] \
            == ["http_5xx", "success"]
        assert all(a.parent_span_id == request.span_id for a in attempts)
        [lookup] = [s for s in spans if s.name == "cache lookup"]
        assert lookup.parent_span_id == request.span_id and attributes(lookup)["proxy.cache"] == "MISS"
        for span in spans:
            assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
        # A HIT on the fast path: its own trace, a server span and its cache lookup, no attempt.
        other = f"00-{'5' * 32}-{PARENT_ID}-01"
        chain = ChainCalls(proxy.process.runtime)
        hit = await proxy.get("/fx/latest/USD", headers={"traceparent": other})
        assert hit.headers["X-Cache"] == "HIT" and upstream.calls == 2 and chain.count == 0
        proxy.process.bus.deliver_waiting()
        assert await asyncio.to_thread(proxy.process.spans.force_flush, 10_000)
        hit_spans = [s for s in collector.spans if s.trace_id.hex() == "5" * 32]
        assert sorted(s.name for s in hit_spans) == ["GET latest", "cache lookup"]
        [server] = [s for s in hit_spans if s.kind == Span.SPAN_KIND_SERVER]
        assert attributes(server)["proxy.cache"] == "HIT" and server.parent_span_id.hex() == PARENT_ID
    finally:
        await collector.stop()


async def test_a_trace_the_caller_does_not_sample_exports_no_span(fake_upstream, proxy_factory, clock):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the [otel] extra is not installed")
    collector = await FakeCollector().start()
    try:
        upstream = await fake_upstream()
        proxy = await proxy_factory(table(upstream.url, tracing={"otlp_endpoint": collector.url}), clock=clock)
        unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
        await proxy.get("/fx/latest/USD", headers={"traceparent": unsampled})
        await proxy.get("/fx/latest/USD")  # no caller context: we start a sampled trace
        proxy.process.bus.deliver_waiting()
        assert await asyncio.to_thread(proxy.process.spans.force_flush, 10_000)
        assert TRACE_ID not in {s.trace_id.hex() for s in collector.spans}
        assert len({s.trace_id.hex() for s in collector.spans}) == 1
        assert parse_traceparent(upstream.seen[0].headers["traceparent"])[2] == 0  # the caller's flag is kept
    finally:
        await collector.stop()


async def test_a_connect_refusal_logs_the_caller_s_trace_id(fake_upstream, proxy_factory, clock, log_lines):
    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url), clock=clock)
    host, port = proxy.process.addresses["main"]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\ntraceparent: {TRACEPARENT}\r\n\r\n"
                 .encode())
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 400")
    proxy.process.bus.deliver_waiting()
    [refused] = [line for line in log_lines() if line.get("event") == "request refused"]
    assert refused["trace_id"] == TRACE_ID and refused["method"] == "CONNECT" and refused["error"] == "bad_request"


async def test_a_reload_that_changes_tracing_says_it_waits_for_a_restart(fake_upstream, clock, tmp_path, log_lines):
    from proxy.config.parse import load_config
    from proxy.ops.process import ProxyProcess

    upstream = await fake_upstream()
    path = tmp_path / "routes.yaml"
    path.write_text(table(upstream.url))
    process = ProxyProcess(load_config(path, {}), clock=clock, env={})
    path.write_text(table(upstream.url, tracing={"otlp_endpoint": "http://127.0.0.1:4318"}))
    assert await process.reload("admin") == []
    assert process.spans is None  # not started by a reload
    assert any(line["event"] == "tracing changes take effect at the next restart" for line in log_lines())
    await process.stop()


async def test_a_collector_that_is_down_costs_no_request(proxy_factory, fake_upstream, clock):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the [otel] extra is not installed")
    from tests.fakes import refused_port

    upstream = await fake_upstream()
    proxy = await proxy_factory(table(upstream.url, tracing={"otlp_endpoint": f"http://127.0.0.1:{refused_port()}"}),
                                clock=clock)
    for _ in range(3):
        assert (await proxy.get("/fx/latest/USD", headers={"traceparent": TRACEPARENT})).status == 200
    assert sent_traceparent(upstream).startswith(f"00-{TRACE_ID}-")
    proxy.process.bus.deliver_waiting()
    assert upstream.calls == 3
