"""`python -m proxy.demo.walkthrough --fast` runs the committed routes.yaml offline, finishes by itself and shows every step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.demo.walkthrough import excerpt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NO_COLOR", None)
    return subprocess.run([sys.executable, "-m", "proxy.demo.walkthrough", "--fast"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_demo_exits_0_without_a_traceback(demo):
    assert demo.returncode == 0, demo.stderr
    assert "Traceback" not in demo.stdout + demo.stderr
    assert "Demo finished" in demo.stdout


def test_the_demo_prints_no_colours_when_stdout_is_not_a_terminal(demo):
    assert "\033[" not in demo.stdout


def test_the_demo_sends_requests_only_to_loopback(demo):
    urls = re.findall(r"(?:GET|POST) (\S+)", demo.stdout)
    assert len(urls) >= 10
    assert all(url.startswith("http://127.0.0.1:") for url in urls), urls


def test_the_demo_serves_the_committed_routes_yaml_with_only_the_vendor_urls_and_timings_changed(demo):
    out = demo.stdout
    assert f"serving {REPO / 'routes.yaml'} as committed, vendor URLs -> mocks" in out
    assert "instead of https://open.er-api.com" in out and "instead of https://api.odcloud.kr/api" in out
    assert re.search(r"flights_odcloud +http://127\.0\.0\.1:\d+/api ", out)
    assert "fx ttl 24h -> 2s, timeout 5s -> 1s" in out


def test_the_demo_shows_miss_then_hit(demo):
    out = demo.stdout
    miss = out.index("X-Cache: MISS  X-Upstream: fx_primary")
    assert re.search(r"X-Cache: HIT  X-Upstream: fx_primary  Age: \d+", out[miss:])


def test_the_demo_shows_fx_answers_normalised_by_each_upstreams_transform(demo):
    out = demo.stdout
    assert re.search(r'\{"base": "USD", "rates": \{[^}]*\}, "updated": "[^"]+", "source": "fx_primary"\}', out)
    assert re.search(r'\{"base": "EUR", "rates": \{[^}]*\}, "updated": "[^"]+", "source": "fx_secondary"\}', out)
    assert "base_code" not in out and '"result"' not in out  # the vendors' own shape never reaches the app


def test_the_demo_answers_a_derived_rate_from_the_cached_latest_copy_without_an_upstream_call(demo):
    out = demo.stdout[demo.stdout.index("A derived route"):]
    before = re.search(r"calls that reached the FX vendors so far: (\d+)", out)
    after = re.search(r"calls that reached the FX vendors after it: (\d+)", out)
    assert before and after and before.group(1) == after.group(1) != "0"
    assert re.search(r"/fx/rate/USD/KRW\n\s+-> 200  X-Cache: HIT  X-Upstream: fx_primary", out)
    assert '{"base": "USD", "quote": "KRW", "rate": 1396.5,' in out
    unknown = out[out.index("/fx/rate/USD/XYZ"):]
    assert re.match(r"/fx/rate/USD/XYZ\n\s+-> 404 ", unknown)
    assert '{"error": "not_found"' in unknown.split("\n")[2]


def test_the_demo_shows_the_secondary_serving_when_the_primary_is_down(demo):
    assert "X-Cache: MISS  X-Upstream: fx_secondary" in demo.stdout


def test_the_demo_shows_a_stale_copy_with_its_age(demo):
    found = re.search(r"X-Cache: STALE  X-Upstream: fx_primary  Age: (\d+)", demo.stdout)
    assert found and int(found.group(1)) >= 1
    assert "Using stale cache for fx /fx/latest/USD" in demo.stdout


def test_the_demo_shows_the_breaker_open_then_closed_after_the_reset(demo):
    out = demo.stdout
    opened = out.index("circuit fx_primary: OPEN")
    assert "fx provider fx_primary: DOWN  (circuit OPEN)" in out[opened:]
    assert "calls that reached fx_primary meanwhile: 0" in out[opened:]
    reset = out.index("POST http://127.0.0.1:", opened)
    assert out[reset:].split("\n", 1)[0].endswith("/health/integrations/circuits/fx_primary/reset")
    closed = out.index("circuit fx_primary: CLOSED", reset)
    assert "X-Cache: MISS  X-Upstream: fx_primary" in out[closed:]


def test_the_demo_walks_through_the_flights_service_in_the_normalised_shape(demo):
    out = demo.stdout[demo.stdout.index("The flights service"):]
    assert re.search(r"/flights/schedules/GMP\S*\n\s+-> 200  X-Cache: MISS  X-Upstream: flights_kac", out)
    assert re.search(r'\{"flights": \[\{"flight": "OZ8915", [^]]*"status": "DELAYED"\}\], "source": "flights_kac"\}', out)
    assert re.search(r'\{"flights": \[\{"flight": "TW721", [^]]*\], "source": "flights_odcloud"\}', out)


def test_the_demo_shows_an_unknown_flight_as_an_empty_answer_and_a_spent_quota_resting_kac(demo):
    out = demo.stdout[demo.stdout.index("The flights service"):]
    unknown = out[out.index("/flights/status/ZZ999"):]
    assert re.match(r'/flights/status/ZZ999\n\s+-> 200  X-Cache: MISS  X-Upstream: flights_kac\n'
                    r'\s+\{"flights": \[\], "source": "flights_kac"\}', unknown)
    assert "circuit flights_kac: CLOSED  (failures 0/3)" in unknown
    quota = out[out.index("daily quota is spent"):]
    # Until midnight in Seoul, or for max_rest (1 h) if that comes first: the committed table lists no second key.
    assert re.search(r"log: Provider flights_kac rests \(Retry-After, or its only API key refused\): skipped until "
                     r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", quota)
    assert "X-Upstream: flights_odcloud" in quota and "resting until" in quota


def test_excerpt_summarises_normalised_bodies_and_proxy_errors():
    rates = b'{"base": "USD", "rates": {"EUR": 0.9, "KRW": 1400, "JPY": 150}, "updated": "2024-12-01", "source": "p"}'
    assert excerpt(rates) == '{"base": "USD", "rates": {"EUR": 0.9, "KRW": 1400}, "updated": "2024-12-01", ' \
                             '"source": "p"} (+1 rates)'
    flights = b'{"flights": [{"flight": "KE1", "status": "DELAYED"}, {"flight": "OZ2"}], "source": "kac"}'
    assert excerpt(flights) == '{"flights": [{"flight": "KE1", "status": "DELAYED"}, +1 more], "source": "kac"}'
    assert excerpt(b'{"flights": [], "source": "kac"}') == '{"flights": [], "source": "kac"}'
    assert excerpt(b'{"error": "all_upstreams_failed", "service": "fx", "attempts": '
                   b'[{"upstream": "fx_primary", "outcome": "connect_error"}]}') \
        == "error 'all_upstreams_failed', attempts: fx_primary=connect_error"
    assert excerpt(b"not json " * 30).endswith("...")
