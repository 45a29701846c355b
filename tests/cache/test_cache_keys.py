"""Cache keys: which requests share a stored copy, and which must never."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict

from proxy.cache.keys import cache_key, normalise_accept_encoding, normalise_path, variant_key


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy:
    return CIMultiDictProxy(CIMultiDict(pairs))


def key(**overrides) -> str:
    args = dict(
        service="fx",
        method="GET",
        path="/fx/latest/USD",
        query=[("symbols", "EUR"), ("amount", "1")],
        headers=headers(("Accept-Encoding", "gzip, br")),
        vary=(),
        credential=None,
    )
    args.update(overrides)
    return cache_key(**args)


def test_key_starts_with_the_service_name_and_a_sha256_hex():
    service, _, digest = key().partition(":")
    assert service == "fx"
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_same_request_gives_same_key():
    assert key() == key()


def test_reordered_query_gives_same_key():
    assert key(query=[("amount", "1"), ("symbols", "EUR")]) == key()


def test_query_as_multidict_gives_same_key_as_list():
    assert key(query=MultiDict([("symbols", "EUR"), ("amount", "1")])) == key()


def test_repeated_query_names_keep_all_values():
    assert key(query=[("s", "a"), ("s", "b")]) != key(query=[("s", "a")])
    assert key(query=[("s", "b"), ("s", "a")]) == key(query=[("s", "a"), ("s", "b")])


def test_different_query_value_gives_different_key():
    assert key(query=[("symbols", "GBP"), ("amount", "1")]) != key()


def test_percent_encoded_unreserved_characters_give_same_key():
    assert key(path="/fx/latest/%55SD") == key()
    assert key(path="/fx/latest/%55%53%44") == key()
    assert key(path="/fx/%6c%61test/USD") == key()


def test_encoded_slash_is_not_a_slash():
    assert key(path="/fx/latest%2FUSD") != key()


def test_hex_case_in_reserved_escapes_does_not_matter():
    assert key(path="/fx/a%2fb") == key(path="/fx/a%2Fb")


def test_normalise_path_encodes_what_may_not_stand_literally():
    assert normalise_path("/a b/é") == "/a%20b/%C3%A9"
    assert normalise_path("/a%20b/%c3%a9") == "/a%20b/%C3%A9"
    assert normalise_path("/100%") == "/100%25"
    assert normalise_path("/%zz") == "/%25zz"


def test_normalise_path_leaves_dot_segments_alone():
    assert normalise_path("/a/../b") == "/a/../b"


def test_accept_encoding_token_order_case_and_whitespace_give_same_key():
    assert key(headers=headers(("Accept-Encoding", "BR,gzip"))) == key()
    assert key(headers=headers(("accept-encoding", " br ,  GZIP "))) == key()


def test_accept_encoding_split_over_two_header_lines_gives_same_key():
    assert key(headers=headers(("Accept-Encoding", "br"), ("Accept-Encoding", "gzip"))) == key()


def test_different_accept_encoding_gives_different_key():
    assert key(headers=headers(("Accept-Encoding", "gzip"))) != key()
    assert key(headers=headers()) != key()


def test_normalise_accept_encoding_removes_whitespace_and_sorts():
    assert normalise_accept_encoding("gzip; q=1.0, Identity, br") == "br,gzip;q=1.0,identity"


def test_head_shares_gets_key():
    assert key(method="HEAD") == key()
    assert key(method="get") == key()


def test_post_and_get_have_different_keys():
    assert key(method="POST") != key()


def test_different_service_gives_different_key():
    assert key(service="weather") != key()


def test_different_credentials_give_different_keys():
    alice, bob = key(credential="Bearer alice"), key(credential="Bearer bob")
    assert alice != bob
    assert alice != key()
    assert key(credential="Bearer alice") == alice


def test_credential_itself_is_not_in_the_key():
    assert "alice" not in key(credential="Bearer alice")


def test_vary_header_value_splits_the_cache():
    vary = ("Accept-Language",)
    en = key(vary=vary, headers=headers(("Accept-Encoding", "gzip, br"), ("Accept-Language", "en")))
    de = key(vary=vary, headers=headers(("Accept-Encoding", "gzip, br"), ("Accept-Language", "de")))
    absent = key(vary=vary)
    assert len({en, de, absent}) == 3


def test_vary_names_are_case_insensitive_and_unordered():
    h = headers(("Accept-Encoding", "gzip, br"), ("X-A", "1"), ("X-B", "2"))
    assert key(vary=("X-A", "x-b"), headers=h) == key(vary=("x-b", "x-a"), headers=h)


def test_unnamed_headers_do_not_split_the_cache():
    h = headers(("Accept-Encoding", "gzip, br"), ("User-Agent", "curl"))
    assert key(headers=h) == key()


def test_values_cannot_shift_between_fields_to_collide():
    assert key(query=[("a", "b=c")]) != key(query=[("a=b", "c")])
    assert key(path="/fx/a", query=[("b", "")]) != key(path="/fx/ab", query=[])


def test_a_variant_key_has_the_services_form_and_depends_on_the_key_the_names_and_the_values():
    primary = key()
    json = variant_key(primary, ("accept",), headers(("Accept", "application/json")))
    assert json.startswith("fx:") and len(json) == 3 + 64 and json != primary
    assert json == variant_key(primary, ("accept",), headers(("accept", "application/json")))
    assert json == variant_key(primary, ("accept",), headers(("Accept", "application/json"), ("X-Other", "1")))
    assert json != variant_key(primary, ("accept",), headers(("Accept", "text/csv")))
    assert json != variant_key(key(path="/fx/latest/EUR"), ("accept",), headers(("Accept", "application/json")))
    assert json != variant_key(primary, ("accept", "origin"), headers(("Accept", "application/json")))
    # absent and empty are different values
    assert variant_key(primary, ("accept",), headers()) != variant_key(primary, ("accept",), headers(("Accept", "")))
