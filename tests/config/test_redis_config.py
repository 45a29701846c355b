"""`cache.cluster`, `cache.sentinel`, `cache.tls` and `breaker.shared`: read once, refused with a
message naming the key, secrets never printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config.parse import ConfigError, parse_config
from proxy.fleet.connection import RedisTarget, SentinelSettings, TlsSettings, target_of

ROOT = Path(__file__).resolve().parents[2]


def table(cache: str, breaker: str = "") -> str:
    return f"""version: 1
cache:
{cache}
services:
  fx:
{breaker}
    upstreams:
      - name: fx_primary
        url: http://127.0.0.1:9
"""


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "routes.yaml", env or {})
    return caught.value.problems


@pytest.mark.parametrize("url", ["redis://h1:6379,h2:6379/0", "redis://h1,h2:6379/0", "rediss://h1:1;h2:2/0",
                                 "redis://user:pw@h1:1,h2:2/0"])
def test_a_url_with_several_hosts_is_refused_with_what_to_use_instead(url):
    problems = problems_of(table(f"  backend: redis\n  url: \"{url}\""))
    assert problems == ["routes.yaml:4: cache.url: one host only; for several use cache.sentinel.hosts, "
                        "or cache.cluster: true with one node of the cluster"]


def test_check_refuses_a_multi_host_url_with_exit_2_not_a_crash(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(table('  backend: redis\n  url: "redis://h1:6379,h2:6379/0"'))
    result = subprocess.run([sys.executable, "-m", "proxy", "check", str(path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{path}:4: cache.url: one host only; for several use cache.sentinel.hosts, "
                                          "or cache.cluster: true with one node of the cluster"]
    assert "Traceback" not in result.stderr


def test_a_sentinel_url_scheme_points_to_cache_sentinel():
    problems = problems_of(table('  backend: redis\n  url: "redis+sentinel://h1:26379/mymaster"'))
    assert problems == ["routes.yaml:4: cache.url: Sentinel is set with cache.sentinel: {hosts: [...], service: ...}, "
                        "not a URL"]


def test_a_sentinel_without_hosts_or_service_names_each_missing_key():
    problems = problems_of(table("  backend: redis\n  sentinel: {hosts: [], db: 0}"))
    assert problems == ["routes.yaml:4: cache.sentinel.hosts: a list of one or more Sentinels as host:port is needed",
                        "routes.yaml:4: cache.sentinel.service: the master's name as the Sentinels know it "
                        "(e.g. mymaster) is needed"]


@pytest.mark.parametrize("hosts, bad", [('["h1"]', "'h1'"), ('["h1:0"]', "'h1:0'"), ('["h1:x"]', "'h1:x'"),
                                        ("[26379]", "26379"), ('["bad host:1"]', "'bad host:1'")])
def test_a_sentinel_host_that_is_not_host_port_is_named(hosts, bad):
    problems = problems_of(table(f"  backend: redis\n  sentinel: {{hosts: {hosts}, service: mymaster}}"))
    assert problems == [f"routes.yaml:4: cache.sentinel.hosts: expected host:port, got {bad}"]


def test_cluster_and_sentinel_together_are_refused():
    problems = problems_of(table("  backend: redis\n  url: redis://127.0.0.1:7000\n  cluster: true\n"
                                 "  sentinel: {hosts: ['127.0.0.1:26379'], service: mymaster}"))
    assert problems == ["routes.yaml:6: cache.cluster and cache.sentinel: set one of them (a Cluster fails over by "
                        "itself; Sentinel watches one master)"]


def test_a_cluster_url_naming_another_database_is_refused():
    problems = problems_of(table("  backend: redis\n  url: redis://127.0.0.1:7000/3\n  cluster: true"))
    assert problems == ["routes.yaml:4: cache.url: a Cluster has only database 0"]


def test_tls_files_that_do_not_exist_are_named(tmp_path):
    missing = tmp_path / "ca.pem"
    problems = problems_of(table(f"  backend: redis\n  url: rediss://127.0.0.1:6380/0\n  tls: {{ca_file: '{missing}'}}"))
    assert problems == [f"routes.yaml:5: cache.tls.ca_file: no readable file at {str(missing)!r}"]


def test_a_client_certificate_needs_its_key_and_tls_needs_rediss(tmp_path):
    cert = tmp_path / "client.crt"
    cert.write_text("x")
    problems = problems_of(table(f"  backend: redis\n  url: redis://127.0.0.1:6380/0\n  tls: {{cert_file: '{cert}'}}"))
    assert problems == ["routes.yaml:5: cache.tls: cert_file and key_file go together (a client certificate and "
                        "its key)",
                        "routes.yaml:5: cache.tls: needs a rediss:// cache.url (TLS files for a plain connection)"]


def test_topology_keys_without_the_redis_backend_are_refused():
    problems = problems_of(table("  backend: memory\n  cluster: true"))
    assert problems == ["routes.yaml:4: cache.cluster: only with cache.backend: redis"]


def test_a_shared_breaker_needs_the_redis_backend():
    problems = problems_of(table("  backend: memory", "    breaker: {profile: FAST, shared: true}"))
    assert problems == ["routes.yaml:8: services.fx: breaker.shared: true (upstream 'fx_primary') needs "
                        "cache.backend: redis, where replicas share it"]
    assert problems_of(table("  backend: redis", "    breaker: {profile: FAST, shared: yes please}")) == [
        "routes.yaml:6: services.fx.breaker.shared: expected true or false, got a string"]


def test_valid_topologies_become_typed_settings(tmp_path):
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "client.crt", "client.key"))
    for path in (ca, cert, key):
        path.write_text("x")
    cluster = parse_config(table("  backend: redis\n  url: redis://10.0.0.5:7000\n  cluster: true",
                                 "    breaker: {profile: FAST, shared: true}"), "routes.yaml", {})
    assert target_of(cluster.cache) == RedisTarget("redis://10.0.0.5:7000", cluster=True)
    assert cluster.services["fx"].upstreams[0].breaker.shared is True
    assert cluster.services["fx"].upstreams[0].breaker.fail_threshold == 3
    assert cluster.effective["cache"]["cluster"] is True

    env = {"REDIS_PASSWORD": "hunter2-redis"}
    sentinel = parse_config(table("  backend: redis\n  sentinel: {hosts: ['10.0.0.1:26379', '[::1]:26380'], "
                                  "service: mymaster, db: 2, password: \"${REDIS_PASSWORD:-}\"}"), "routes.yaml", env)
    assert sentinel.cache.sentinel == SentinelSettings(hosts=(("10.0.0.1", 26379), ("::1", 26380)), service="mymaster",
                                                       db=2, password="hunter2-redis")
    assert target_of(sentinel.cache).shape == "sentinel"
    assert "hunter2-redis" in sentinel.secrets
    assert sentinel.effective["cache"]["sentinel"]["password"] == "***"
    assert "hunter2-redis" not in repr(sentinel.effective)
    assert "url" not in sentinel.effective["cache"]  # not used: the Sentinels name the master

    tls = parse_config(table(f"  backend: redis\n  url: rediss://10.0.0.5:6380/0\n  tls: {{ca_file: '{ca}', "
                             f"cert_file: '{cert}', key_file: '{key}'}}"), "routes.yaml", {})
    assert tls.cache.tls == TlsSettings(ca_file=str(ca), cert_file=str(cert), key_file=str(key))


@pytest.mark.parametrize("key", ["password", "sentinel_password"])
def test_a_sentinel_password_that_is_not_text_is_refused_by_name(key):
    problems = problems_of(table(f"  backend: redis\n  sentinel: {{hosts: ['h1:26379'], service: mymaster, {key}: [1]}}"))
    assert len(problems) == 1 and problems[0].startswith(f"routes.yaml:4: cache.sentinel.{key}: ")
