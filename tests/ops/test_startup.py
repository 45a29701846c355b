"""`resilience-proxy --version`, and the start line: the version, and a warning per upstream called without a key."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

import orjson
from structlog.testing import capture_logs

from proxy import __version__
from proxy.config.parse import parse_config
from proxy.ops.startup import announce, empty_credentials
from tests.fakes import free_port, route_table

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("FX_PRIMARY_API_KEY", "FX_SECONDARY_API_KEY", "KAC_API_KEY", "ODCLOUD_API_KEY")


def test_version_prints_the_package_version_and_python():
    result = subprocess.run([sys.executable, "-m", "proxy", "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"resilience-proxy {__version__} (Python {platform.python_version()})"


def test_the_package_version_is_the_one_pyproject_builds():
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__


def table() -> str:
    return route_table({"fx": {"routes": [{"match": "/fx/latest/{base}"}], "upstreams": [
        {"name": "bare", "url": "http://127.0.0.1:1", "headers": {"X-Api-Key": "${BARE_KEY:-}"}},
        {"name": "scheme", "url": "http://127.0.0.1:2", "headers": {"Authorization": "Bearer ${SCHEME_KEY:-}"}},
        {"name": "query", "url": "http://127.0.0.1:3", "query": {"serviceKey": "${QUERY_KEY:-}", "_type": "json"}},
        {"name": "keyed", "url": "http://127.0.0.1:4", "headers": {"Authorization": "Bearer ${SET_KEY}"},
         "query": {"base": "{base}"}},
    ]}})


def test_empty_credentials_names_each_header_or_parameter_that_resolves_to_nothing():
    config = parse_config(table(), "routes.yaml", {"SET_KEY": "k-123456", "SCHEME_KEY": ""})
    found = {u.name: empty_credentials(u) for u in config.upstreams()}
    assert found == {"bare": ["header X-Api-Key"], "scheme": ["header Authorization"],
                     "query": ["query serviceKey"], "keyed": []}


def test_the_start_line_has_the_version_and_each_keyless_upstream_gets_one_warning():
    config = parse_config(table(), "routes.yaml", {"SET_KEY": "k-123456"})
    with capture_logs() as logs:
        announce(config, ("127.0.0.1", 8080), ("127.0.0.1", 9090))
    start, *warnings = logs
    assert start["event"] == "resilience-proxy serving" and start["version"] == __version__
    assert [(w["log_level"], w["provider"], w["empty"]) for w in warnings] == [
        ("warning", "bare", ["header X-Api-Key"]), ("warning", "scheme", ["header Authorization"]),
        ("warning", "query", ["query serviceKey"])]
    assert "k-123456" not in repr(logs)


async def test_run_on_the_committed_table_without_keys_says_so_for_every_vendor():
    env = {k: v for k, v in os.environ.items() if k not in KEYS} | {"LOG_LEVEL": "info", "LOG_FORMAT": "json"}
    env["FX_PRIMARY_API_KEY"] = "a-key-that-is-set"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(ROOT / "routes.yaml"),
        "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    lines = []
    try:
        while True:
            raw = await asyncio.wait_for(process.stdout.readline(), 30)
            assert raw, b"".join(lines)
            lines.append(raw)
            record = orjson.loads(raw)
            if record.get("event", "").startswith("resilience-proxy serving"):
                start = record
            if record.get("kind") == "config" and record.get("provider") == "flights_odcloud":
                break  # the last upstream of the table
    finally:
        process.terminate()
        await process.wait()
    assert start["version"] == __version__
    warned = [orjson.loads(raw) for raw in lines if b'"kind":"config"' in raw.replace(b" ", b"")]
    assert [w["provider"] for w in warned] == ["fx_secondary", "flights_kac", "flights_odcloud"]
    assert b"a-key-that-is-set" not in b"".join(lines)
