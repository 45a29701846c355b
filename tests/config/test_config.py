"""routes.yaml validation: typed config, or every problem as `file:line: message`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config.parse import ConfigError, load_config, parse_config
from proxy.config.values import parse_duration, parse_size

ROOT = Path(__file__).resolve().parents[2]
GOOD = """\
version: 1
services:
  fx:
    cache: {ttl: 24h}
    routes:
      - match: /fx/latest/{base}
        cache: {ttl: 1h, stale: 2d}
    upstreams:
      - name: fx_primary
        url: https://primary.example/api
        path: /v6/latest/{base}
        headers: {Authorization: "Bearer ${FX_PRIMARY_API_KEY}"}
      - name: fx_secondary
        url: https://secondary.example
        query: {access_key: "${FX_SECONDARY_API_KEY:-}"}
        breaker: FAST
        retry: {retries: 1, base_delay: 50ms, max_delay: 1s, retry_on: [5xx, timeout, 429]}
"""


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "routes.yaml", env or {})
    return caught.value.problems


def test_a_valid_table_becomes_typed_config_with_inheritance():
    config = parse_config(GOOD, "routes.yaml", {"FX_PRIMARY_API_KEY": "k-123456"})
    fx = config.services["fx"]
    assert fx.prefix == "/fx"
    assert fx.cache.ttl == 86400 and fx.cache.stale == 7 * 86400
    route, params = fx.route_for("/fx/latest/USD")
    assert params == {"base": "USD"}
    assert route.cache.ttl == 3600 and route.cache.stale == 2 * 86400
    primary, secondary = fx.upstreams
    assert primary.timeout == 5.0 and fx.deadline == 15.0
    assert (primary.breaker.fail_threshold, primary.breaker.open_timeout) == (5, 60.0)
    assert (secondary.breaker.fail_threshold, secondary.breaker.open_timeout) == (3, 30.0)
    assert secondary.retry.retries == 1 and secondary.retry.base_delay == 0.05
    assert secondary.retry.retry_on == frozenset({"5xx", "timeout", "429"})
    assert dict((k, t.text) for k, t in primary.headers) == {"Authorization": "Bearer k-123456"}
    assert "k-123456" in config.secrets


def test_nearest_timeout_breaker_and_retry_win():
    text = """\
version: 1
defaults: {timeout: 2s, breaker: CRITICAL, retry: CONSERVATIVE}
services:
  fx:
    timeout: 3s
    retry: AGGRESSIVE
    upstreams:
      - {name: a, url: "http://a", timeout: 500ms, breaker: {fail_threshold: 2, open_timeout: 10s}}
      - {name: b, url: "http://b"}
"""
    a, b = parse_config(text, "r.yaml", {}).services["fx"].upstreams
    assert a.timeout == 0.5 and b.timeout == 3.0
    assert (a.breaker.fail_threshold, a.breaker.open_timeout) == (2, 10.0)
    assert (b.breaker.fail_threshold, b.breaker.open_timeout) == (8, 120.0)
    assert a.retry.retries == b.retry.retries == 5


@pytest.mark.parametrize("text, line, fragment", [
    ("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'http://a', colour: red}]\n", 4, "unknown key 'colour'"),
    ("version: 1\nbogus: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'http://a'}]\n", 2, "unknown key 'bogus'"),
    ("version: 1\nservices:\n  fx:\n    timeout: fast\n    upstreams: [{name: a, url: 'http://a'}]\n", 4, "bad duration 'fast'"),
    ("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'http://a', timeout: [1]}]\n", 4, "bad duration"),
    ("version: 1\nservices:\n  fx:\n    retry_non_idempotent: 'yes'\n    upstreams: [{name: a, url: 'http://a'}]\n", 4, "expected true or false"),
    ("version: 1\nservices:\n  fx:\n    upstreams:\n      - {name: a, url: 'http://a'}\n      - {name: a, url: 'http://b'}\n", 6, "duplicate upstream name 'a'"),
    ("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'http://a'}]\n  fx2:\n    prefix: /fx/v2\n    upstreams: [{name: b, url: 'http://b'}]\n", 6, "overlaps the prefix '/fx'"),
    ("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'file:///etc/passwd'}]\n", 4, "must be http:// or https://"),
    ("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'http://a', headers: {X-Key: '${NOT_SET_ANYWHERE}'}}]\n", 4, "NOT_SET_ANYWHERE is not set and has no default"),
    ("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: '${A:-${B}}'}]\n", 4,
     "the default of ${A:-...} holds another ${...}: nested variables are not supported"),
    ("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'http://user:pw@a'}]\n", 4, "credentials in the upstream URL"),
    ("version: 1\nservices:\n  fx:\n    prefix: /health\n    upstreams: [{name: a, url: 'http://a'}]\n", 4, "collides with the proxy's own /health"),
    ("version: 2\nservices:\n  fx:\n    upstreams: [{name: a, url: 'http://a'}]\n", 1, "version: expected 1"),
    ("version: 1\nservices:\n  fx:\n    upstreams: []\n", 4, "non-empty list of upstreams"),
    ("version: 1\nservices:\n  fx:\n    breaker: {fail_threshold: 0}\n    upstreams: [{name: a, url: 'http://a'}]\n", 4, "fail_threshold"),
    ("version: 1\nservices:\n  fx:\n    retry: {retry_on: [404]}\n    upstreams: [{name: a, url: 'http://a'}]\n", 4, "bad retry_on entry 404"),
    ("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'http://a', path: '/x/{base}'}]\n", 4, "uses {base} but no route's match defines it"),
    ("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'http://a'}]\n    upstreams: []\n", 5, "duplicate key 'upstreams'"),
    ("version: 1\nservices:\n  fx:\n    routes: [{match: '/other/{x}'}]\n    upstreams: [{name: a, url: 'http://a'}]\n", 4, "outside the service prefix"),
    ("version: 1\nservices: [\n", 3, "invalid YAML"),
])
def test_each_problem_is_reported_with_its_line(text, line, fragment):
    problems = problems_of(text)
    matching = [p for p in problems if fragment in p]
    assert matching, problems
    assert matching[0].startswith(f"routes.yaml:{line}: "), matching


def test_every_problem_is_reported_at_once_in_line_order():
    text = ("version: 1\nserver: {listen: nowhere}\nservices:\n  fx:\n    timeout: soon\n"
            "    upstreams: [{name: a, url: 'ftp://a'}]\n")
    problems = problems_of(text)
    assert [p.split(":")[1] for p in problems] == ["2", "5", "6"]


def test_durations_and_sizes():
    assert parse_duration("500ms") == 0.5
    assert parse_duration("30s") == 30 and parse_duration("5m") == 300
    assert parse_duration("1h") == 3600 and parse_duration("7d") == 604800
    assert parse_duration(12) == 12.0
    for bad in ("-1s", "1w", "", True, None, -3):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_size("1MiB") == 1048576 and parse_size("10MB") == 10_000_000 and parse_size(512) == 512
    with pytest.raises(ValueError):
        parse_size("lots")


def test_variables_with_defaults_and_empty_values():
    text = GOOD.replace("${FX_PRIMARY_API_KEY}", "${FX_PRIMARY_API_KEY:-public}")
    config = parse_config(text, "r.yaml", {})
    headers = dict((k, t.text) for k, t in config.services["fx"].upstreams[0].headers)
    assert headers == {"Authorization": "Bearer public"}
    assert config.secrets == frozenset()  # defaults are not secrets


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml")
    assert caught.value.problems[0].startswith(f"{tmp_path / 'nope.yaml'}:1: cannot read the file")


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FX_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=timeout)


def test_check_prints_the_effective_config_with_secrets_masked(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(GOOD)
    result = _cli("check", str(path), env={"FX_PRIMARY_API_KEY": "sk-live-9f8e7d6c", "FX_SECONDARY_API_KEY": "zz-00000000"})
    assert result.returncode == 0, result.stderr
    assert "sk-live-9f8e7d6c" not in result.stdout + result.stderr
    assert "zz-00000000" not in result.stdout + result.stderr
    assert "Authorization: Bearer ***" in result.stdout
    assert "access_key: '***'" in result.stdout
    assert "fx_secondary" in result.stdout and "ttl: 3600.0" in result.stdout


def test_check_and_run_refuse_a_bad_file_with_the_same_messages(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text("version: 1\nservices:\n  fx:\n    upstreams: [{name: a, url: 'gopher://a', weight: 3}]\n")
    checked = _cli("check", str(path))
    ran = _cli("run", "--config", str(path), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
    assert checked.returncode == 2 and ran.returncode == 2
    expected = [f"{path}:4: services.fx.upstreams[0]: unknown key 'weight' (allowed: breaker, headers, hedge_after, key_cooldown, keys, name, path, query, rate_limit, result_codes, retry, timeout, transform, url)",
                f"{path}:4: services.fx.upstreams[0].url: upstream URL must be http:// or https://, got 'gopher://a'"]
    assert checked.stderr.splitlines()[:2] == expected
    assert ran.stderr.splitlines()[:2] == expected
    assert checked.stdout == ""


def test_the_committed_route_table_and_examples_are_valid():
    for path in [ROOT / "routes.yaml", *sorted((ROOT / "config").glob("*.yaml"))]:
        if path.name == "schema.yaml":
            continue
        config = load_config(path, {})
        assert config.services, path
    committed = load_config(ROOT / "routes.yaml", {})
    assert set(committed.services) == {"fx", "flights"}
    assert [u.name for u in committed.services["fx"].upstreams] == ["fx_primary", "fx_secondary"]
    assert committed.cache.backend == "memory"
    assert committed.server.listen == ("0.0.0.0", 8080) and committed.server.metrics_listen == ("0.0.0.0", 9090)


# --- the resilient defaults and their switches ------------------------------------------------------

MINIMAL = """\
version: 1
defaults: {DEFAULTS}
services:
  fx:
    timeout: 1s
    cache: {{ttl: 2s, stale: 1h{CACHE}}}
    upstreams:
      - {{name: fx_primary, url: "https://p.example"{UPSTREAM}}}
      - {{name: fx_secondary, url: "https://s.example"}}
"""


def minimal(defaults: str = "{}", cache: str = "", upstream: str = "") -> str:
    return MINIMAL.format(DEFAULTS=defaults, CACHE=cache, UPSTREAM=upstream)


def test_only_upstreams_a_timeout_and_ttls_get_every_resilient_default():
    from proxy.resilience.hedging import HEDGE_AUTO

    config = parse_config(minimal(), "routes.yaml", {})
    service = config.services["fx"]
    primary = service.upstreams[0]
    assert service.fallback_first is True
    assert service.cache.stale_if_slow == 0.25
    assert primary.hedge == HEDGE_AUTO
    breaker = primary.breaker
    assert (breaker.fail_threshold, breaker.open_timeout) == (5, 60.0)  # STANDARD, as the seed has it
    assert (breaker.failure_rate, breaker.window, breaker.min_calls) == (0.2, 10.0, 10)
    assert breaker.trip_on_refused is True and breaker.max_rest == 3600.0
    effective = config.effective
    assert effective["defaults"]["fallback_before_retry"] is True and effective["defaults"]["hedge_after"] == "auto"
    upstream = effective["services"]["fx"]["upstreams"][0]
    assert upstream["hedge_after"] == "auto"
    assert upstream["breaker"]["failure_rate"] == 0.2 and upstream["breaker"]["trip_on_refused"] is True


def test_every_default_can_be_switched_off():
    text = minimal("{fallback_before_retry: false, hedge_after: off, breaker: {profile: STANDARD, failure_rate: off, "
                   "trip_on_refused: false, max_rest: 0}}", cache=", stale_if_slow: off")
    service = parse_config(text, "routes.yaml", {}).services["fx"]
    primary = service.upstreams[0]
    assert service.fallback_first is False and service.cache.stale_if_slow is None and primary.hedge is None
    assert (primary.breaker.failure_rate, primary.breaker.trip_on_refused, primary.breaker.max_rest) == (None, False, 0.0)
    assert primary.breaker.fail_threshold == 5


def test_hedge_after_nearest_wins_and_takes_a_fixed_duration():
    from proxy.resilience.hedging import HedgePolicy

    text = minimal("{hedge_after: off}", upstream=", hedge_after: 150ms")
    primary, secondary = parse_config(text, "routes.yaml", {}).services["fx"].upstreams
    assert primary.hedge == HedgePolicy(after=0.15)
    assert secondary.hedge is None


@pytest.mark.parametrize(("value", "seconds"), [("true", 0.0), ("false", None)])
def test_stale_while_revalidate_is_stale_if_slow_0_or_off(value, seconds):
    text = minimal(cache=f", stale_while_revalidate: {value}")
    assert parse_config(text, "routes.yaml", {}).services["fx"].cache.stale_if_slow == seconds


@pytest.mark.parametrize(("text", "fragment"), [
    (minimal(cache=", stale_if_slow: 1s, stale_while_revalidate: true"), "set stale_if_slow or stale_while_revalidate"),
    (minimal(cache=", stale_if_slow: soon"), "stale_if_slow: bad duration 'soon'"),
    (minimal(cache=", stale_if_slow: -1"), "stale_if_slow: a duration cannot be negative"),
    (minimal("{hedge_after: 0}"), "defaults.hedge_after: expected auto, off or a duration above 0"),
    (minimal("{hedge_after: sometimes}"), "defaults.hedge_after: bad duration 'sometimes'"),
    (minimal(upstream=", hedge_after: [1]"), "services.fx.upstreams[0].hedge_after: bad duration"),
    (minimal("{fallback_before_retry: 1}"), "defaults.fallback_before_retry: expected true or false"),
    (minimal("{breaker: {profile: FAST, max_rest: -5}}"), "defaults.breaker.max_rest: a duration cannot be negative"),
    (minimal("{breaker: {profile: FAST, trip_on_refused: yes please}}"), "defaults.breaker.trip_on_refused: expected true"),
    (minimal("{breaker: {profile: FAST, failure_rate: never}}"), "defaults.breaker.failure_rate: expected a number"),
    (minimal("{timeout: 0}"), "defaults.timeout: must be longer than 0"),
    (minimal("{deadline: 0s}"), "defaults.deadline: must be longer than 0"),
])
def test_bad_values_of_the_new_settings_are_reported_with_their_line(text, fragment):
    found = problems_of(text)
    assert any(fragment in problem for problem in found), found
    assert all(problem.startswith("routes.yaml:") for problem in found)
