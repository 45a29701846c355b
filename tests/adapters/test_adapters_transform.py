"""Answer normalisation (proxy/adapters/transform.py): expressions, placeholders, decoding, headers."""

from __future__ import annotations

import gzip

import orjson
import pytest

from proxy.adapters.transform import TransformError, check_expression, decode_json, evaluate, normalise, placeholders


def test_placeholders_are_filled_and_multiselect_keys_left_alone():
    expression = "{base: base_code, rate: rates.{quote}, source: '{upstream}'}"
    assert placeholders(expression) == {"quote", "upstream"}
    document = {"base_code": "USD", "rates": {"KRW": 1400}}
    assert evaluate(expression, {"quote": "KRW", "upstream": "fx_primary"}, document) == \
        {"base": "USD", "rate": 1400, "source": "fx_primary"}


@pytest.mark.parametrize("value", ["K'RW", "a b", "x" * 65, "", "a.b"])
def test_a_placeholder_value_that_could_change_the_expression_is_refused(value):
    with pytest.raises(TransformError, match=r"the value of \{quote\} cannot be used"):
        evaluate("rates.{quote}", {"quote": value}, {"rates": {}})


def test_a_bad_expression_is_reported_when_configured():
    assert check_expression("{a: b", set()) is not None and "JMESPath" in check_expression("{a: b", set())
    assert check_expression("rates.{quote}", {"quote"}) is None


def test_normalise_gives_json_and_drops_the_headers_that_described_the_old_body():
    headers = [("Content-Type", "text/plain"), ("ETag", '"1"'), ("Content-Length", "9"), ("X-Vendor", "v")]
    body, kept = normalise("{v: a}", {}, {"a": 1}, headers)
    assert orjson.loads(body) == {"v": 1}
    assert kept == [("X-Vendor", "v"), ("Content-Type", "application/json")]


@pytest.mark.parametrize("document", [{"result": "error"}, {}])
def test_a_transform_that_produces_nothing_is_a_failure_not_an_empty_answer(document):
    with pytest.raises(TransformError, match="produced nothing"):
        normalise("result == 'success' && {v: v}", {}, document, [])


def test_a_gzipped_json_body_is_decoded():
    assert decode_json(gzip.compress(b'{"a": 1}'), [("Content-Encoding", "gzip")]) == {"a": 1}


@pytest.mark.parametrize("body, headers, reason", [
    (b"<html/>", [], "not JSON"),
    (b"{}", [("Content-Encoding", "br")], "br-encoded"),
    (b"not gzip", [("Content-Encoding", "gzip")], "cannot decode gzip"),
])
def test_a_body_that_cannot_be_read_says_why(body, headers, reason):
    with pytest.raises(TransformError, match=reason):
        decode_json(body, headers)
