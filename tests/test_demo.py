"""`python -m proxy.demo --fast` runs offline, finishes by itself and shows every resilience step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.demo import excerpt

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NO_COLOR", None)
    return subprocess.run([sys.executable, "-m", "proxy.demo", "--fast"], cwd=REPO, env=env, capture_output=True,
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


def test_the_demo_shows_miss_then_hit(demo):
    out = demo.stdout
    miss = out.index("X-Cache: MISS  X-Upstream: fx_primary")
    assert re.search(r"X-Cache: HIT  X-Upstream: fx_primary  Age: \d+", out[miss:])


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


def test_the_demo_walks_through_the_flights_service(demo):
    out = demo.stdout[demo.stdout.index("The flights service"):]
    assert re.search(r"/flights/schedules/GMP\S*\n\s+-> 200  X-Cache: MISS  X-Upstream: flights_kac", out)
    assert "OZ8915 DELAYED" in out
    assert "X-Upstream: flights_odcloud" in out


def test_excerpt_summarises_vendor_bodies_and_proxy_errors():
    assert excerpt(b'{"amount": 1.0, "base": "USD", "date": "2024-12-01", "rates": {"EUR": 0.9, "KRW": 1400, "JPY": 150}}') \
        == '{"base": "USD", "date": "2024-12-01", "rates": {"EUR": 0.9, "KRW": 1400}} (+1 rates)'
    assert excerpt(b'{"error": "all_upstreams_failed", "service": "fx", "attempts": '
                   b'[{"upstream": "fx_primary", "outcome": "connect_error"}]}') \
        == "error 'all_upstreams_failed', attempts: fx_primary=connect_error"
    assert excerpt(b"not json " * 30).endswith("...")
