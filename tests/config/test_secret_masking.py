"""Secrets from `${VAR}` never leave the proxy in any form: not in attempt logs (a key in the URL's
path, a key with `/` or spaces percent- or plus-encoded), not in `check`'s output, not in its errors."""

from __future__ import annotations

import io
import re
from urllib.parse import quote, quote_plus

import structlog
from yarl import URL

from proxy.chain.rewrite import masked_url
from proxy.config.parse import parse_config
from proxy.masking import Masker
from proxy.observability import logs
from tests.fakes import Fail, route_table
from tests.config.test_config import _cli

# A key as some vendors issue them: a slash, a space, a plus and a percent sign.
ODD_KEY = "pk/LIVE 7f3a+9c2e%d"
PATH_KEY = "pathkey-LIVE-51b0d4aa"


def every_form(secret: str) -> list[str]:
    """What a leak could look like: as it is, or as any encoder would have written it."""
    return [secret, quote(secret, safe=""), quote(secret, safe="/"), quote_plus(secret), quote(secret, safe="/+"),
            quote(secret, safe="-._~!$&'()*+,;=:@"), URL("http://h").with_query({"k": secret}).raw_query_string[2:]]


def leaks(text: str, *secrets: str) -> list[str]:
    return [form for secret in secrets for form in every_form(secret) if form in text]


def test_every_encoding_of_a_secret_is_masked():
    mask = Masker([ODD_KEY, "tok\\en'x"])
    lower_hex = [re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), form) for form in every_form(ODD_KEY)]
    for form in every_form(ODD_KEY) + lower_hex:
        assert mask(f"GET /v1/{form}/x") == "GET /v1/***/x", form
    assert mask(f"bad value {ODD_KEY!r}") == "bad value '***'"
    assert mask(repr("tok\\en'x")) == '"***"'  # as repr writes it: the backslash doubled
    assert mask("pk/LIVE 7f3a+9c2e%e and pk/LIVE") == "pk/LIVE 7f3a+9c2e%e and pk/LIVE"  # not the key
    assert not Masker() and Masker()("nothing") == "nothing"


def test_masked_url_hides_a_key_substituted_into_the_url_or_the_path():
    config = parse_config(route_table({"fx": {"upstreams": [
        {"name": "fx_primary", "url": "https://api.vendor.example/${PATH_KEY}", "path": "/v1/${PATH_KEY}/latest",
         "query": {"sig": "${ODD_KEY}"}}]}}), "routes.yaml", {"PATH_KEY": PATH_KEY, "ODD_KEY": ODD_KEY})
    upstream = config.services["fx"].upstreams[0]
    url = upstream.url.with_path(f"/{PATH_KEY}/v1/{PATH_KEY}/latest", encoded=True).with_query({"sig": ODD_KEY})
    text = masked_url(url, upstream)
    assert leaks(text, PATH_KEY, ODD_KEY) == []
    assert text == "https://api.vendor.example/***/v1/***/latest?sig=***"


async def test_attempt_logs_never_carry_a_key_from_the_url_the_path_or_keys(fake_upstream, proxy_factory, clock):
    primary = await fake_upstream("primary")
    secondary = await fake_upstream("secondary")
    primary.default = Fail(503)  # a failed attempt is logged at warning level: the line operators read
    text = route_table({"fx": {"retry": "NONE", "routes": [{"match": "/fx/latest/{base}"}], "upstreams": [
        {"name": "fx_primary", "url": primary.url + "/${PATH_KEY}", "path": "/v1/${PATH_KEY}/latest/{base}",
         "headers": {"X-Key": "${ODD_KEY}"}},
        {"name": "fx_secondary", "url": secondary.url, "path": "/v2/{key}/latest/{base}",
         "query": {"token": "{key}"}, "keys": ["${ROTATED_KEY}"]}]}})
    env = {"PATH_KEY": PATH_KEY, "ODD_KEY": ODD_KEY, "ROTATED_KEY": "rk/LIVE key+0c1d"}
    buffer = io.StringIO()
    logs.configure("debug", "json", stream=buffer)
    try:
        proxy = await proxy_factory(text, clock=clock, env=env)
        answer = await proxy.get("/fx/latest/USD")
        proxy.process.bus.deliver_waiting()
    finally:
        structlog.reset_defaults()
    assert answer.status == 200 and answer.headers["X-Upstream"] == "fx_secondary"
    # the keys did reach the upstreams, encoded as a path segment and a query value
    assert primary.seen[0].path_qs == f"/{PATH_KEY}/v1/{PATH_KEY}/latest/USD"
    assert primary.seen[0].headers["X-Key"] == ODD_KEY
    assert secondary.seen[0].path_qs.startswith("/v2/rk%2FLIVE%20key+0c1d/latest/USD?token=rk/LIVE+key%2B0c1d")
    output = buffer.getvalue()
    assert '"kind":"attempt"' in output and "/latest/USD" in output
    assert leaks(output, *env.values()) == []


def test_check_masks_a_key_in_the_url_or_the_path_instead_of_crashing(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(route_table({"fx": {"routes": [{"match": "/fx/latest/{base}",
                                                    "paths": {"fx_primary": "/r/${PATH_KEY}/{base}"}}],
                                        "upstreams": [{"name": "fx_primary", "url": "https://api.example/${PATH_KEY}",
                                                       "path": "/v1/${PATH_KEY}/latest/{base}",
                                                       "keys": ["${ODD_KEY}"]}]}}))
    result = _cli("check", str(path), env={"PATH_KEY": PATH_KEY, "ODD_KEY": ODD_KEY})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert leaks(result.stdout + result.stderr, PATH_KEY, ODD_KEY) == []
    assert "url: https://api.example/***" in result.stdout
    assert "path: /v1/***/latest/{base}" in result.stdout
    assert "fx_primary: /r/***/{base}" in result.stdout


def test_check_errors_never_quote_a_value_from_the_environment(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(
        "version: 1\n"
        "services:\n"
        "  fx:\n"
        "    timeout: ${ODD_KEY}\n"
        "    upstreams:\n"
        "      - {name: a, url: 'gopher://${PATH_KEY}'}\n"
        "      - {name: b, url: 'http://b', headers: {'X-Key': '${PATH_KEY}'}, keys: '${ODD_KEY}'}\n")
    result = _cli("check", str(path), env={"PATH_KEY": PATH_KEY, "ODD_KEY": ODD_KEY})
    assert result.returncode == 2
    assert leaks(result.stdout + result.stderr, PATH_KEY, ODD_KEY) == []
    errors = result.stderr.splitlines()
    assert f"{path}:4: services.fx.timeout: bad duration '***': use 500ms, 30s, 5m, 1h, 7d or a number of seconds" \
        in errors
    assert f"{path}:6: services.fx.upstreams[0].url: upstream URL must be http:// or https://, got 'gopher://***'" \
        in errors


def test_a_path_that_no_request_line_can_carry_is_refused_by_check_and_run(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text("version: 1\nservices:\n  fx:\n    upstreams:\n"
                    "      - {name: a, url: 'http://a', path: '/v1/${ODD_KEY}/latest'}\n")
    for command in (["check", str(path)], ["run", "--config", str(path), "--listen", "127.0.0.1:0"]):
        result = _cli(*command, env={"ODD_KEY": ODD_KEY})
        assert result.returncode == 2, result.stderr
        assert f"{path}:5: services.fx.upstreams[0].path: '/v1/***/latest' has characters a URL path cannot carry" \
               in result.stderr
        assert leaks(result.stdout + result.stderr, ODD_KEY) == []
