"""What may be answered from the cache, and what may be stored."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.rules import (
    HIT_SCREENED,
    has_credentials,
    is_conditional,
    parse_cache_control,
    request_bypass_reason,
    response_storable,
    vary_covered,
    vary_names,
)

STATUSES = frozenset({200, 203, 301, 404})
MAX = 1000


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy:
    return CIMultiDictProxy(CIMultiDict(pairs))


def storable(status=200, hdrs=(), body_len: int | None = 10) -> str | None:
    return response_storable(status, headers(*hdrs), body_len, cache_statuses=STATUSES, max_body_bytes=MAX)


@pytest.mark.parametrize("method", ["GET", "HEAD", "get"])
def test_plain_get_and_head_are_cacheable(method):
    assert request_bypass_reason(method, headers(("Accept", "application/json"))) is None


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_bypass_with_reason_method(method):
    assert request_bypass_reason(method, headers()) == "method"


@pytest.mark.parametrize("name", ["Authorization", "authorization", "Cookie", "COOKIE"])
def test_credentials_bypass_with_reason_credentials(name):
    assert request_bypass_reason("GET", headers((name, "secret"))) == "credentials"
    assert has_credentials(headers((name, "secret")))


def test_a_get_or_head_with_a_body_bypasses_with_reason_body():
    assert request_bypass_reason("GET", headers(), has_body=True) == "body"
    assert request_bypass_reason("HEAD", headers(("Authorization", "x")), has_body=True) == "body"
    assert request_bypass_reason("POST", headers(), has_body=True) == "method"


def test_no_credentials_detected_without_authorization_or_cookie():
    assert not has_credentials(headers(("X-Api-Key", "k")))


def test_credentials_do_not_bypass_when_the_route_keys_by_credential():
    assert request_bypass_reason("GET", headers(("Authorization", "Bearer a")), keyed_by_credential=True) is None


def test_request_no_store_bypasses_even_on_a_route_keyed_by_credential():
    h = headers(("Authorization", "Bearer a"), ("Cache-Control", "No-Store"))
    assert request_bypass_reason("GET", h, keyed_by_credential=True) == "no-store"


def test_request_no_store_bypasses_with_reason_no_store():
    assert request_bypass_reason("GET", headers(("Cache-Control", "max-age=0, no-store"))) == "no-store"


def test_request_no_cache_is_not_no_store():
    assert request_bypass_reason("GET", headers(("Cache-Control", "no-cache"))) is None


def test_a_plain_200_is_storable():
    assert storable(hdrs=[("Cache-Control", "public, max-age=60")]) is None


@pytest.mark.parametrize("status", [500, 502, 204, 302])
def test_statuses_outside_the_list_are_not_stored(status):
    assert storable(status=status) == "status"


def test_set_cookie_is_never_stored():
    assert storable(hdrs=[("set-cookie", "id=1")]) == "set-cookie"


@pytest.mark.parametrize("value", ["no-store", "NO-STORE", "max-age=60,no-store", " public ,  no-store "])
def test_response_no_store_is_never_stored(value):
    assert storable(hdrs=[("Cache-Control", value)]) == "no-store"


@pytest.mark.parametrize(
    "value", ["private", "Private", 'private="Set-Cookie"', 'max-age=60, private="X-A, X-B"', "public,private"]
)
def test_response_private_is_never_stored(value):
    assert storable(hdrs=[("Cache-Control", value)]) == "private"


def test_private_in_a_second_cache_control_line_counts():
    assert storable(hdrs=[("Cache-Control", "max-age=60"), ("Cache-Control", "private")]) == "private"


def test_directive_names_inside_quoted_arguments_do_not_count():
    assert storable(hdrs=[("Cache-Control", 'no-cache="private, no-store"')]) is None


def test_similar_directive_names_do_not_count():
    assert storable(hdrs=[("Cache-Control", "privateish, no-stores")]) is None


def test_body_over_the_limit_is_too_large():
    assert storable(body_len=MAX) is None
    assert storable(body_len=MAX + 1) == "too-large"


def test_unknown_body_length_is_too_large():
    assert storable(body_len=None) == "too-large"


def test_parse_cache_control_reads_arguments():
    parsed = parse_cache_control(headers(("Cache-Control", 'Max-Age=60, private="a, b", no-store')))
    assert parsed == {"max-age": "60", "private": "a, b", "no-store": None}


def test_vary_names_come_from_every_vary_line_lower_cased():
    hdrs = headers(("Vary", "Accept , Accept-Language"), ("vary", "ORIGIN,,"))
    assert vary_names(hdrs) == {"accept", "accept-language", "origin"}
    assert vary_names([("Vary", "Accept"), ("VARY", "x-a")]) == {"accept", "x-a"}  # an Entry's header pairs
    assert vary_names(headers()) == frozenset()


@pytest.mark.parametrize("vary", ["*", "Accept, *", " * "])
def test_vary_star_is_never_stored(vary):
    assert storable(hdrs=[("Vary", vary)]) == "vary-star"
    assert storable(hdrs=[("Vary", "Accept")]) is None  # a named header is stored as a variant


def test_a_copy_is_covered_when_its_key_covers_everything_it_varies_on():
    keyed = frozenset({"accept-encoding"})
    assert vary_covered([("Vary", "Accept-Encoding")], keyed)
    assert vary_covered([], keyed)
    assert not vary_covered([("Vary", "Accept-Encoding, Accept")], keyed)
    assert vary_covered([("Vary", "Accept-Encoding, Accept")], keyed | {"accept"})


@pytest.mark.parametrize("name", ["If-None-Match", "if-modified-since", "If-Match", "If-Unmodified-Since",
                                  "If-Range", "Range"])
def test_conditional_and_range_requests_are_the_upstreams_to_answer(name):
    assert is_conditional(headers((name, "x")))
    assert name.lower().encode() in HIT_SCREENED  # the fast path leaves them to the full path


def test_a_plain_request_is_not_conditional():
    assert not is_conditional(headers(("Accept", "*/*"), ("If-Unknown", "x")))


def test_the_hit_screen_covers_every_request_the_full_path_would_not_answer_from_a_shared_copy():
    """A request the HIT stage answers is one the full path would answer from the same copy."""
    for name, value in [("Authorization", "Bearer t"), ("Cookie", "a=1"), ("Cache-Control", "no-store"),
                        ("Content-Length", "3"), ("Transfer-Encoding", "chunked"), ("If-None-Match", '"v1"')]:
        screened = name.lower().encode() in HIT_SCREENED
        full_path_bypasses = is_conditional(headers((name, value))) or request_bypass_reason(
            "GET", headers((name, value)), has_body=name in ("Content-Length", "Transfer-Encoding")) is not None
        assert screened and full_path_bypasses, name
    assert b"expect" in HIT_SCREENED and b"accept" not in HIT_SCREENED and b"accept-encoding" not in HIT_SCREENED
