"""routes.yaml attacked: every bad input is exit 2 with `file:line: message` lines, never a traceback,
and `run` refuses exactly what `check` refuses (through the real CLI); a table `check` accepts starts."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.clock import FakeClock
from proxy.config.parse import ConfigError, check_document, parse_config
from proxy.config.yaml_source import LineDict, LineList, load
from proxy.ops.process import ProxyProcess

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^routes\.yaml:\d+: [^\n]+\Z")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "proxy", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **(env or {})})


def check_and_run(path: Path, env: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """The problem lines `check` and `run` print for one file (both must exit 2, neither with a traceback)."""
    checking = cli("check", str(path), env=env)
    running = cli("run", "--config", str(path), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", env=env)
    results = []
    for process in (checking, running):
        out, err = process.communicate(timeout=30)
        assert process.returncode == 2, err
        assert "Traceback" not in err and out == "", err
        lines = [line for line in err.splitlines() if not line.startswith("resilience-proxy: not starting")]
        assert lines and all(line.startswith(f"{path}:") and re.match(r"^\d+: ", line[len(str(path)) + 1:])
                             for line in lines), lines
        results.append(lines)
    assert results[0] == results[1]  # run refuses exactly what check refuses
    return results[0], results[1]


TABLE = """\
version: 1
server: {listen: "127.0.0.1:0", metrics_listen: off}
cache: {backend: memory, max_bytes: 0}
defaults: {timeout: .nan, deadline: .inf, retry_budget: {min_per_second: .nan, window: 0}}
services:
  fx:
    cache: {ttl: .inf, stale: .nan}
    routes:
      - match: /fx/{a}/{a}
      - match: /fx/latest/{base}
    upstreams:
      - {name: fx_primary, url: "http://127.0.0.1:9", headers: {X-Key: "${KEY"}, rate_limit: {rate: .inf},
         key_cooldown: .inf, keys: ["k\\n"]}
      - {name: fx_secondary, url: "http://a b"}
events: {maxlen: -5, nonsense: 1, max_topics_per_peer: 0, ack_timeout: 0}
"""


def test_every_value_check_passed_and_run_failed_on_is_refused_by_both_with_its_line(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(TABLE)
    problems, _ = check_and_run(path)
    expected = [
        (3, "cache.max_bytes: must be more than 0 bytes"),
        (4, "defaults.timeout: bad duration nan: at most 3650d"),
        (4, "defaults.deadline: bad duration inf: at most 3650d"),
        (4, "defaults.retry_budget.min_per_second: expected a number from 0 to 1000000000, got nan"),
        (4, "defaults.retry_budget.window: must be longer than 0"),
        (7, "services.fx.cache.ttl: bad duration inf: at most 3650d"),
        (7, "services.fx.cache.stale: bad duration nan: at most 3650d"),
        (9, "services.fx.routes[0].match: a placeholder is used twice"),
        (12, "a `${` that is not ${NAME} or ${NAME:-default}"),
        (12, "services.fx.upstreams[0].rate_limit: rate and per must be positive"),
        (13, "services.fx.upstreams[0].key_cooldown: bad duration inf"),
        (13, "services.fx.upstreams[0].keys[0]: a key cannot contain control characters"),
        (14, "services.fx.upstreams[1].url: bad URL 'http://a b': whitespace"),
        (15, "events.maxlen: expected a whole number from 1 to 1000000000, got -5"),
        (15, "events: unknown key 'nonsense'"),
        (15, "events.max_topics_per_peer: expected a whole number from 1 to 1000000000, got 0"),
        (15, "events.ack_timeout: must be longer than 0"),
    ]
    for line, fragment in expected:
        assert any(p.startswith(f"{path}:{line}: {fragment}") for p in problems), (line, fragment, problems)


@pytest.mark.parametrize("url, why", [
    ("redis://h:notaport/0", "bad URL"),
    ("redis://a:1,b:2/0", "one host only; for several use cache.sentinel.hosts, or cache.cluster: true"),
    ("redis://h:0/0", "'h' port 0 is no address to connect to"),
    ("redis://h:6379/db1", "the database after the host is a number"),
    ("redis://h:6379/0?colour=red", "unknown connection option 'colour'"),
    ("http://h:6379/0", "expected a redis://"),
])
def test_a_cache_url_redis_would_choke_on_is_a_config_error(url, why):
    with pytest.raises(ConfigError) as caught:
        parse_config(f"version: 1\ncache: {{backend: redis, url: '{url}'}}\nservices:\n"
                     "  fx: {upstreams: [{name: a, url: 'http://a'}]}\n", "routes.yaml", {})
    assert caught.value.problems == [f"routes.yaml:2: cache.url: {why}"] or \
        caught.value.problems[0].startswith(f"routes.yaml:2: cache.url: {why}"), caught.value.problems


LAUGHS = "version: 1\n" + "".join(
    f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10) if n else ', '.join(['lol'] * 10)}]\n" for n in range(9))


@pytest.mark.parametrize("name, content, line, message", [
    ("null", b"null\n", 1, "the file holds no route table"),
    ("empty", b"# nothing\n", 1, "the file is empty"),
    ("deep", b"version: 1\nx: " + b"[" * 5000 + b"]" * 5000 + b"\n", 2, "invalid YAML: nested deeper than 64 levels"),
    ("billion-laughs", LAUGHS.encode(), 2, "YAML aliases expand the document past 100000 values"),
    ("recursive-alias", b"version: 1\na: &a [*a]\n", 2, "YAML aliases expand the document past"),
    ("huge", b"version: 1\n" + b"# " + b"x" * (1024 * 1024) + b"\n", 1, "the file is larger than 1024 KiB"),
    ("not-utf8", b"version: 1\nservices:\n  fx: \xff\xfe\n", 3, "the file is not UTF-8 text"),
    ("control-character", b"version: 1\n\n# \x01\n", 3, "invalid YAML: unacceptable character"),
    ("tab-indent", b"version: 1\nservices:\n\tfx: {}\n", 3, "invalid YAML"),
    ("duplicate-key", b"version: 1\nversion: 1\nservices: {fx: {upstreams: [{name: a, url: 'http://a'}]}}\n", 2,
     "duplicate key 'version' (first at line 1)"),
    ("version-true", b"version: true\nservices: {fx: {upstreams: [{name: a, url: 'http://a'}]}}\n", 1,
     "version: expected 1, got True"),
    ("two-documents", b"version: 1\n---\nversion: 1\n", 2, "invalid YAML"),
])
def test_a_document_that_is_not_a_route_table_is_refused_by_check_and_run_with_its_line(tmp_path, name, content,
                                                                                         line, message):
    path = tmp_path / "routes.yaml"
    path.write_bytes(content)
    problems, _ = check_and_run(path)
    assert problems[0].startswith(f"{path}:{line}: {message}"), problems


@pytest.mark.parametrize("upstreams, line, message", [
    ("[{name: [], url: 'http://a'}, {name: b, url: 'http://b'}]", 4,
     "services.fx.upstreams[0].name: expected a string, got a list"),
    (".nan", 4, "services.fx.upstreams: expected a non-empty list of upstreams"),
    ("[{name: a, url: 'http://a', query: .nan}]", 4, "services.fx.upstreams[0].query: expected a mapping, got a number"),
])
def test_malformed_parts_the_fuzz_found_are_reported_not_crashed_on(upstreams, line, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(f"version: 1\nservices:\n  fx:\n    upstreams: {upstreams}\n", "routes.yaml", {})
    assert f"routes.yaml:{line}: {message}" in caught.value.problems, caught.value.problems


def test_a_byte_order_mark_is_read_as_utf8_and_its_lines_count_as_written(tmp_path):
    text = "\ufeffversion: 1\nservices:\n  fx:\n    timeout: soon\n    upstreams: [{name: a, url: 'http://a'}]\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "routes.yaml", {})
    assert caught.value.problems == ["routes.yaml:4: services.fx.timeout: bad duration 'soon': "
                                     "use 500ms, 30s, 5m, 1h, 7d or a number of seconds"]


# --- every scalar of a full table, replaced by something hostile -------------------------------------

FULL: dict[str, Any] = {
    "version": 1,
    "server": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "max_request_body": "1MiB",
               "replay_buffer": "64KiB", "max_header_bytes": "16KiB", "drain_timeout": "1s",
               "strip_headers": ["Cookie"], "max_response_buffer": "1MiB", "header_timeout": "10s",
               "keepalive_timeout": "75s", "max_connections": 100},
    "cache": {"backend": "memory", "url": "redis://127.0.0.1:6379/0", "max_stale": "7d", "max_bytes": "1MiB",
              "max_body_bytes": "64KiB", "prefix": "rp-hostile:", "op_timeout": "50ms", "local_ttl": "1s"},
    "defaults": {"timeout": "2s", "deadline": "5s", "hedge_after": "auto", "fallback_before_retry": True,
                 "breaker": {"profile": "STANDARD", "fail_threshold": 5, "open_timeout": "1m", "half_open_max_calls": 1,
                             "failure_rate": 50, "window": "10s", "min_calls": 10, "min_failures": 3,
                             "slow_call_duration": "2s", "slow_call_rate": 0.5, "trip_on_429": False,
                             "trip_on_refused": True, "max_rest": "1h"},
                 "retry": {"policy": "DEFAULT", "retries": 2, "base_delay": "100ms", "max_delay": "1s",
                           "retry_on": ["5xx", "timeout", 503]},
                 "retry_budget": {"ratio": 0.2, "min_per_second": 10, "window": "10s"}},
    "services": {"fx": {
        "prefix": "/fx", "retry_non_idempotent": False, "forward_headers": ["Authorization"],
        "cache": {"ttl": "1h", "stale": "1d", "statuses": [200, 404], "vary": ["Accept-Language"],
                  "key_by_credential": False, "stale_if_slow": "250ms", "coalesce": "local"},
        "routes": [{"match": "/fx/latest/{base}", "name": "latest", "cache": {"ttl": "5m"},
                    "paths": {"fx_secondary": "/v2/{base}"},
                    "watch": {"interval": "5m", "fields": "rates", "topics": ["fx/latest/USD"],
                              "deliver": {"webhook": "http://127.0.0.1:9/hook", "secret": "whsec-1234", "attempts": 3}}},
                   {"match": "/fx/rate/{base}/{quote}", "derive": {"from": "/fx/latest/{base}",
                                                                   "transform": "rates.{quote}"}}],
        "upstreams": [
            {"name": "fx_primary", "url": "http://127.0.0.1:9/api", "path": "/v6/latest/{base}",
             "query": {"symbols": "KRW", "key": "{key}"}, "headers": {"X-Client": "proxy"}, "timeout": "1s",
             "breaker": "FAST", "retry": "NONE", "hedge_after": "200ms", "transform": "@", "rate_limit": "10/s",
             "keys": ["key-one-1234", "key-two-5678"], "key_cooldown": "1h"},
            {"name": "fx_secondary", "url": "http://127.0.0.1:9", "rate_limit": {"rate": 5, "per": "1s", "burst": 5}}],
    }},
    "events": {"stream": "events", "maxlen": 1000, "ack_timeout": "30s", "client_queue": 100, "max_frame": "64KiB",
               "max_topics": 100, "max_topics_per_connection": 10, "max_topics_per_peer": 20},
}

def hostile_values() -> list[Any]:
    """Numbers out of every range, NaN and infinity, the wrong types, strings no field wants."""
    items, _ = load("[.nan, .inf, -.inf, -1, 0, 1.5, 100000000000000000000000000000, 1.0e300, true, null, '',"
                    " '\\n', '\\0', '${', '-5s', '1e999', 99999999999999999999d, 0s, [], {}, [[]], {a: b}]", {})
    return [*items, "x" * 5000]


HOSTILE = hostile_values()
FULL_DOCUMENT, _ = load(yaml.safe_dump(FULL, sort_keys=False), {})


def value_paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Where a value sits in the table: every mapping, list and scalar but the document itself."""
    inner: list[tuple] = []
    if isinstance(node, dict):
        inner = [p for key, value in node.items() for p in value_paths(value, (*path, key))]
    elif isinstance(node, list):
        inner = [p for index, value in enumerate(node) for p in value_paths(value, (*path, index))]
    return ([path] if path else []) + inner


def replaced(path: tuple, value: Any) -> LineDict:
    """The full table as loaded (lines kept) with the value at `path` replaced."""
    document = copy.deepcopy(FULL_DOCUMENT)
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = copy.deepcopy(value)
    return document


def test_the_full_table_is_valid():
    config = check_document(copy.deepcopy(FULL_DOCUMENT), "routes.yaml", [])
    assert config.services["fx"].upstreams[0].keys == ("key-one-1234", "key-two-5678")
    assert isinstance(HOSTILE[-3], LineList) and isinstance(HOSTILE[-2], LineDict)


@pytest.mark.parametrize("path", value_paths(FULL), ids=lambda p: ".".join(map(str, p)))
async def test_any_value_replaced_by_something_hostile_is_refused_with_lines_or_starts(path):
    for value in HOSTILE:
        try:
            config = check_document(replaced(path, value), "routes.yaml", [])
        except ConfigError as error:
            assert error.problems and all(LINE.match(p) for p in error.problems), (value, error.problems)
            continue
        # what check accepts, run must be able to start with
        process = ProxyProcess(config, clock=FakeClock(), env={}, log_events=False)
        await process.start(listen=("127.0.0.1", 0), metrics_listen=False)
        await process.stop()
