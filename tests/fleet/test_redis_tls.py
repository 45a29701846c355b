"""`rediss://` with `cache.tls` files: the proxy reaches a TLS-only Redis that wants a client
certificate, and is refused by it without one."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.fakes import route_table
from tests.redis_servers import Servers, need_redis_tools, port_from_env

need_redis_tools()
if shutil.which("openssl") is None:
    pytest.skip("openssl is needed to make the test certificates", allow_module_level=True)


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)


def make_certificates(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    _openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr")
        _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-extfile", "san.cnf", "-out", f"{name}.crt")


@pytest.fixture(scope="module")
def tls_redis():
    with tempfile.TemporaryDirectory(prefix="rp-tls-") as name:
        directory = Path(name)
        make_certificates(directory)
        servers = Servers(directory)
        port = port_from_env("REDIS_TLS_PORT", 7115)
        plain = port + 1  # only so Servers can tell it started; the proxy uses the TLS port
        try:
            servers.start(plain, "--tls-port", str(port), "--tls-cert-file", str(directory / "server.crt"),
                          "--tls-key-file", str(directory / "server.key"), "--tls-ca-cert-file",
                          str(directory / "ca.pem"), "--tls-auth-clients", "yes")
            yield directory, port
        finally:
            servers.stop_all()


def tls_table(upstream: str, port: int, prefix: str, tls: dict) -> str:
    return route_table({"fx": {"timeout": "1s", "retry": "NONE", "cache": {"ttl": "1h"},
                               "upstreams": [{"name": "fx_primary", "url": upstream}]}},
                       cache={"backend": "redis", "url": f"rediss://127.0.0.1:{port}/0", "prefix": prefix, "tls": tls})


async def test_replicas_share_copies_over_tls_with_a_client_certificate(tls_redis, fake_upstream, proxy_factory,
                                                                       redis_prefix):
    directory, port = tls_redis
    upstream = await fake_upstream("primary")
    text = tls_table(upstream.url, port, redis_prefix, {"ca_file": str(directory / "ca.pem"),
                                                         "cert_file": str(directory / "client.crt"),
                                                         "key_file": str(directory / "client.key")})
    a, b = await proxy_factory(text), await proxy_factory(text)
    assert (await a.get("/fx/latest/USD")).headers["X-Cache"] == "MISS"
    assert (await b.get("/fx/latest/USD")).headers["X-Cache"] == "HIT"
    assert upstream.calls == 1 and a.process.runtime.store.connected


async def test_without_its_client_certificate_the_proxy_serves_without_the_cache(tls_redis, fake_upstream,
                                                                                 proxy_factory, redis_prefix):
    directory, port = tls_redis
    upstream = await fake_upstream("primary")
    proxy = await proxy_factory(tls_table(upstream.url, port, redis_prefix, {"ca_file": str(directory / "ca.pem")}))
    for base in ("USD", "EUR"):
        reply = await proxy.get(f"/fx/latest/{base}")
        assert (reply.status, reply.headers["X-Cache"]) == (200, "MISS")
    assert upstream.calls == 2
    assert proxy.process.runtime.store.connected is False
