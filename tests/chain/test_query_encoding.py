"""Upstream queries are percent-encoded exactly once: API keys pasted "encoded" or "decoded", Korean
parameter names and values, and the query part of a route's per-upstream path."""

from __future__ import annotations

import pytest
import yaml
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.chain.exchange import Exchange
from proxy.chain.rewrite import NoPathForUpstream, build_url
from proxy.config.parse import ConfigError, parse_config
from proxy.config.values import decoded_once
from tests.fakes import route_table

# A data.go.kr key as the portal shows it: "decoded", and "encoded" (percent-encoded once).
DECODED = "fbbYsG27+DtQ4lJN8/eeOAZrsZ==/a+b="
ENCODED = "fbbYsG27%2BDtQ4lJN8%2FeeOAZrsZ%3D%3D%2Fa%2Bb%3D"


def table(**upstream: object) -> str:
    return route_table({"flights": {"routes": [
        {"match": "/flights/schedules/{airport}",
         "paths": {"vendor": "/15043890/v1/uddi:57dcf102?page=1&perPage=100&출발공항={airport}"}},
        {"match": "/flights/status/{flight}",
         "paths": {"vendor": "/status?schFln={flight}&schLineType=D&serviceKey=route-wins"}},
    ], "upstreams": [{"name": "vendor", "url": "https://api.example/api", **upstream}]}})


def url_for(text: str, path: str, env: dict[str, str] | None = None, *, query: tuple = ()) -> URL:
    config = parse_config(text, "routes.yaml", env or {})
    service = config.services["flights"]
    route, params = service.route_for(path)
    upstream = service.upstreams[0]
    exchange = Exchange("rid", "GET", service, route, params, path, path[len(service.prefix):], query,
                        CIMultiDictProxy(CIMultiDict()), 0.0)
    values = {**params, "upstream": upstream.name}
    if upstream.keys:
        values["key"] = upstream.keys[0]
    return build_url(upstream, exchange, values)


@pytest.mark.parametrize("form", [DECODED, ENCODED])
def test_a_key_in_either_form_gives_the_same_query(form):
    for text in (table(query={"serviceKey": "${ODCLOUD_API_KEY}"}),
                 table(query={"serviceKey": "{key}"}, keys=["${ODCLOUD_API_KEY}"])):
        url = url_for(text, "/flights/schedules/GMP", {"ODCLOUD_API_KEY": form})
        assert "serviceKey=fbbYsG27%2BDtQ4lJN8/eeOAZrsZ%3D%3D/a%2Bb%3D" in url.raw_query_string.split("&")
        assert url.query["serviceKey"] == DECODED  # what the vendor reads back: the key, exactly
        assert "%25" not in url.raw_query_string  # nothing encoded twice


def test_korean_names_and_values_are_utf8_percent_encoded_once():
    url = url_for(table(), "/flights/schedules/김포", query=(("운항일자", "20250116"),))
    assert url.raw_path == "/api/15043890/v1/uddi:57dcf102"
    assert url.raw_query_string == ("%EC%9A%B4%ED%95%AD%EC%9D%BC%EC%9E%90=20250116&page=1&perPage=100"
                                    "&%EC%B6%9C%EB%B0%9C%EA%B3%B5%ED%95%AD=%EA%B9%80%ED%8F%AC")
    assert url.query["출발공항"] == "김포" and url.query["운항일자"] == "20250116"


def test_a_callers_value_that_looks_encoded_is_a_value_and_not_decoded_again():
    url = url_for(table(), "/flights/schedules/%EA%B9%80")  # the path's own escapes were undone before routing
    assert url.query["출발공항"] == "%EA%B9%80"


def test_a_route_query_is_only_sent_on_its_route_and_wins_over_the_upstreams():
    text = table(query={"serviceKey": "upstream-key", "_type": "json"})
    schedules = url_for(text, "/flights/schedules/GMP")
    assert dict(schedules.query) == {"page": "1", "perPage": "100", "출발공항": "GMP", "serviceKey": "upstream-key",
                                     "_type": "json"}
    status = url_for(text, "/flights/status/KE1203")
    assert dict(status.query) == {"schFln": "KE1203", "schLineType": "D", "serviceKey": "route-wins", "_type": "json"}


def test_a_caller_cannot_override_or_smuggle_route_query_values():
    status = url_for(table(), "/flights/status/KE1&schLineType=I", query=(("schLineType", "I"),))
    assert status.query.getall("schLineType") == ["D"]
    assert status.query["schFln"] == "KE1&schLineType=I"


def test_a_route_query_naming_a_placeholder_its_match_lacks_is_refused():
    text = table().replace("schFln={flight}", "schFln={flight}&schAirCode={airport}")
    with pytest.raises(ConfigError, match=r"route '/flights/status/\{flight\}' path for vendor uses \{airport\} "
                                          "not in its match"):
        parse_config(text, "routes.yaml", {})


def test_a_route_query_that_is_not_name_value_pairs_is_refused():
    with pytest.raises(ConfigError, match="the query after \\? must be name=value pairs"):
        parse_config(table().replace("schLineType=D", "schLineType"), "routes.yaml", {})


def test_check_shows_a_route_path_with_its_query():
    config = parse_config(table(), "routes.yaml", {})
    paths = [r["paths"]["vendor"] for r in config.effective["services"]["flights"]["routes"]]
    assert paths[1] == "/status?schFln={flight}&schLineType=D&serviceKey=route-wins"


@pytest.mark.parametrize("off", ["off", False])
def test_paths_off_means_the_upstream_does_not_serve_the_route(off):
    document = yaml.safe_load(table())
    document["services"]["flights"]["routes"][1]["paths"]["vendor"] = off
    config = parse_config(yaml.safe_dump(document, allow_unicode=True), "routes.yaml", {})
    service = config.services["flights"]
    route, params = service.route_for("/flights/status/KE1")
    exchange = Exchange("rid", "GET", service, route, params, "/flights/status/KE1", "/status/KE1", (),
                        CIMultiDictProxy(CIMultiDict()), 0.0)
    with pytest.raises(NoPathForUpstream):
        build_url(service.upstreams[0], exchange, {**params, "upstream": "vendor"})
    assert config.effective["services"]["flights"]["routes"][1]["paths"] == {"vendor": "off"}


@pytest.mark.parametrize("text, expected", [
    (ENCODED, DECODED), (DECODED, DECODED), ("100%", "100%"), ("%ZZ", "%ZZ"), ("a%FFb", "a%FFb"),
    ("%252B", "%2B"),  # an encoded key encoded again by hand: decoded once only, so the vendor says which
])
def test_decoded_once(text, expected):
    assert decoded_once(text) == expected


def test_both_forms_of_a_key_are_secrets_kept_out_of_logs():
    text = table(query={"serviceKey": "${ODCLOUD_API_KEY}"})
    config = parse_config(text, "routes.yaml", {"ODCLOUD_API_KEY": ENCODED})
    assert {ENCODED, DECODED} <= config.secrets
