"""Resolving a target once (proxy/chain/resolve.py): refusals, service and route, the memo per table."""

from __future__ import annotations

import pytest

from proxy.chain import resolve as resolve_module
from proxy.chain.resolve import Refusal, Resolver, rest_of
from proxy.config.parse import parse_config
from tests.fakes import route_table


def table():
    fx = {"routes": [{"match": "/fx/latest/{base}"}], "upstreams": [{"name": "fx_primary", "url": "http://127.0.0.1:9/v6"}]}
    return parse_config(route_table({"fx": fx}), "routes.yaml", {})


def test_a_target_resolves_to_its_service_route_parameters_and_rest():
    found = Resolver(table())("/fx/latest/USD?symbols=KRW")
    assert found.refusal is None
    assert (found.service.name, found.route.name, dict(found.params)) == ("fx", "/fx/latest/{base}", {"base": "USD"})
    assert (found.path, found.decoded, found.rest, found.route_name) == (
        "/fx/latest/USD", "/fx/latest/USD", "/latest/USD", "/fx/latest/{base}")


def test_a_path_no_route_template_matches_still_has_its_service():
    found = Resolver(table())("/fx/history")
    assert found.refusal is None and found.route is None and found.route_name == "/fx"


@pytest.mark.parametrize("target, detail", [
    ("/fx/../admin", "dot segments"),
    ("/fx/%2e%2e/admin", "dot segments"),
    ("/fx/a?b#frag", "a raw # is not allowed"),
    ("//evil.example/fx", "must not start with //"),
    ("/fx/%252e", "percent-encoded escapes"),
])
def test_an_unsafe_target_is_refused_with_the_reason(target, detail):
    found = Resolver(table())(target)
    assert found.refusal is not None and (found.refusal.status, found.refusal.error) == (400, "bad_request")
    assert detail in found.refusal.detail
    assert found.service is None


def test_a_target_outside_every_service_is_no_route():
    assert Resolver(table())("/weather/today").refusal == Refusal(404, "no_route")


def test_the_memo_answers_every_query_of_a_path_with_one_resolution():
    resolver = Resolver(table())
    first = resolver("/fx/latest/USD?a=1")
    assert resolver("/fx/latest/USD?b=2") is first and resolver("/fx/latest/USD") is first


def test_what_is_not_worth_remembering_is_resolved_afresh():
    resolver = Resolver(table())
    assert resolver("/fx/a?x#y") is not resolver("/fx/a?x#y")  # refused for its query: not an item
    long = "/fx/" + "a" * 2000
    assert resolver(long) is not resolver(long)
    assert resolver(long).refusal is None


def test_the_memo_starts_again_when_full(monkeypatch):
    monkeypatch.setattr(resolve_module, "_MEMO_MAX", 3)
    resolver = Resolver(table())
    kept = resolver("/fx/latest/A")
    resolver("/fx/latest/B")
    resolver("/fx/latest/C")
    assert resolver("/fx/latest/A") is kept
    resolver("/fx/latest/D")  # the fourth clears the memo
    assert resolver("/fx/latest/A") is not kept


def test_the_shared_parameters_cannot_be_changed_by_one_request():
    found = Resolver(table())("/fx/latest/USD")
    with pytest.raises(TypeError):
        found.params["base"] = "EUR"  # type: ignore[index]


@pytest.mark.parametrize("path, prefix, rest", [
    ("/fx/latest/USD", "/fx", "/latest/USD"), ("/fx", "/fx", ""), ("/fx/", "/fx", "/"),
    ("/a/b/c", "/a/b", "/c"), ("/anything", "/", "/anything"), ("/%66x/latest", "/fx", "/latest"),
])
def test_the_rest_is_cut_on_segments(path, prefix, rest):
    assert rest_of(path, prefix) == rest
