"""Route matching and upstream path templates (proxy/config/routing.py), pure; the target check is in test_targets.py."""

from __future__ import annotations

import pytest

from proxy.config.routing import MatchPattern, Template, prefix_matches, prefixes_overlap


@pytest.mark.parametrize("path, expected", [
    ("/fx/latest/USD", {"base": "USD"}),
    ("/fx/latest/USD/", {"base": "USD"}),            # one trailing slash is the same route
    ("/fx/latest/U S$D", {"base": "U S$D"}),        # any characters but a slash
    ("/fx/latest", None),
    ("/fx/latest/USD/EUR", None),                   # a placeholder is one segment, never two
    ("/fx/latest//", None),
    ("/fx/latestUSD", None),
])
def test_a_placeholder_matches_exactly_one_path_segment(path, expected):
    assert MatchPattern.compile("/fx/latest/{base}").match(path) == expected


def test_regex_characters_in_a_match_are_literal():
    pattern = MatchPattern.compile("/a.b/{x}+(y)")
    assert pattern.match("/a.b/1+(y)") == {"x": "1"}
    assert pattern.match("/aXb/1+(y)") is None


def test_a_pattern_names_its_placeholders_in_order():
    assert MatchPattern.compile("/fx/rate/{base}/{quote}").names == ("base", "quote")


def test_rendering_for_the_wire_encodes_each_value_so_it_stays_one_segment():
    template = Template.parse("/v6/latest/{base}")
    assert template.names == ("base",)
    assert template.render({"base": "../x?y#z"}, encode=True) == "/v6/latest/..%2Fx%3Fy%23z"
    assert template.render({"base": "a:b@c"}, encode=True) == "/v6/latest/a:b@c"  # pchar kept
    assert template.render({"base": "김포"}, encode=True) == "/v6/latest/%EA%B9%80%ED%8F%AC"


def test_rendering_without_encoding_leaves_values_for_a_later_encoder():
    assert Template.parse("{key}").render({"key": "a b/c"}, encode=False) == "a b/c"


def test_a_template_without_placeholders_is_its_text():
    assert Template.parse("/static").render({}, encode=True) == "/static"


def test_a_missing_value_is_an_error_not_an_empty_segment():
    with pytest.raises(KeyError):
        Template.parse("/v/{base}").render({}, encode=True)


@pytest.mark.parametrize("prefix, path, matches", [
    ("/fx", "/fx", True), ("/fx", "/fx/latest", True), ("/fx", "/fxy", False), ("/fx", "/f", False),
    ("/", "/anything", True),
])
def test_a_prefix_matches_on_a_segment_boundary(prefix, path, matches):
    assert prefix_matches(prefix, path) is matches


def test_prefixes_overlap_when_either_contains_the_other():
    assert prefixes_overlap("/fx", "/fx/v2") and prefixes_overlap("/fx/v2", "/fx")
    assert not prefixes_overlap("/fx", "/fxv2")
