"""transport helpers on the attempt path: the lazily masked URL and the end-to-end header filter."""

from __future__ import annotations

from yarl import URL

from proxy.chain.rewrite import MaskedUrl
from proxy.upstream.headers import end_to_end


def test_masked_url_masks_only_when_turned_into_text() -> None:
    class Upstream:
        secret_query = frozenset({"k"})
        secrets = frozenset({"s3cret-path"})

    url = URL("http://p.example/s3cret-path/latest?k=s3cret&api_key=x&symbols=KRW")
    masked = MaskedUrl(url, Upstream())  # type: ignore[arg-type]
    assert str(masked) == "http://p.example/***/latest?k=***&api_key=***&symbols=KRW"
    assert masked == "http://p.example/***/latest?k=***&api_key=***&symbols=KRW"
    assert "s3cret" not in repr(masked)


def test_end_to_end_drops_what_connection_names_and_keeps_the_rest() -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict([("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "5"),
                           ("Accept", "a"), ("accept", "b"), ("Cookie", "c")])
    assert end_to_end(headers) == [("Accept", "a"), ("accept", "b"), ("Cookie", "c")]
    assert end_to_end(headers, frozenset({"cookie"})) == [("Accept", "a"), ("accept", "b")]
    assert end_to_end(CIMultiDict([("Host", "h"), ("X-A", "1")])) == [("X-A", "1")]
