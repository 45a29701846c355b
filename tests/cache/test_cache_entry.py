"""Entry: freshness arithmetic and the msgpack envelope that must never execute what it reads."""

from __future__ import annotations

import pickle

import msgspec
import pytest

from proxy.cache.entry import Entry, decode_entry, encode_entry, vary_index

NOW = 1_733_040_000.0
VARIANT = "fx:" + "c" * 64


def make_entry(**overrides) -> Entry:
    fields = dict(
        status=200,
        headers=[("Content-Type", "application/json"), ("X-Rate", "1"), ("X-Rate", "2")],
        body=b'{"base": "USD"}',
        stored_at=NOW,
        fresh_until=NOW + 60,
        stale_until=NOW + 3600,
        upstream="fx_primary",
    )
    fields.update(overrides)
    return Entry(**fields)


def envelope(**overrides) -> dict:
    fields = dict(
        v=1,
        status=200,
        headers=[["Content-Type", "text/plain"]],
        body=b"hello",
        stored_at=NOW,
        fresh_until=NOW + 60,
        stale_until=NOW + 120,
        upstream="fx_primary",
    )
    fields.update(overrides)
    return fields


def test_round_trip_keeps_every_field_and_duplicate_headers_in_order():
    entry = make_entry()
    decoded = decode_entry(encode_entry(entry))
    assert decoded == entry
    assert decoded.headers == [("Content-Type", "application/json"), ("X-Rate", "1"), ("X-Rate", "2")]


def test_envelope_is_a_msgpack_map_with_the_documented_field_names():
    raw = msgspec.msgpack.decode(encode_entry(make_entry()))
    assert set(raw) == {"v", "status", "headers", "body", "stored_at", "fresh_until", "stale_until", "upstream"}
    assert raw["v"] == 1


def test_a_vary_index_is_a_version_2_envelope_that_round_trips_and_is_never_fresh():
    index = vary_index(("accept", "accept-language"), (VARIANT,), NOW, NOW + 3600)
    raw = msgspec.msgpack.decode(encode_entry(index))
    assert raw["v"] == 2 and raw["vary"] == ["accept", "accept-language"] and raw["variants"] == [VARIANT]
    decoded = decode_entry(encode_entry(index))
    assert decoded == index and decoded.is_index
    assert not decoded.is_fresh(NOW) and decoded.is_usable_stale(NOW)
    assert not make_entry().is_index


def test_age_counts_from_stored_at_and_is_never_negative():
    entry = make_entry()
    assert entry.age(NOW + 42.5) == 42.5
    assert entry.age(NOW - 10) == 0.0


def test_fresh_until_fresh_until_then_stale_until_stale_until():
    entry = make_entry()
    assert entry.is_fresh(NOW + 59.9)
    assert not entry.is_fresh(NOW + 60)
    assert entry.is_usable_stale(NOW + 3599.9)
    assert not entry.is_usable_stale(NOW + 3600)


def test_size_grows_with_body_and_headers():
    small = make_entry(body=b"", headers=[])
    big = make_entry(body=b"x" * 1000, headers=[("A", "b" * 50)])
    assert small.size >= 100
    assert big.size - small.size >= 1000 + 51


class WritesMarker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage \x00\xff\xfe not msgpack",
        b"\xc1",
        msgspec.msgpack.encode(envelope(v=2)),
        msgspec.msgpack.encode(envelope(v="1")),
        msgspec.msgpack.encode(envelope(status=99)),
        msgspec.msgpack.encode(envelope(status=600)),
        msgspec.msgpack.encode(envelope(status="200")),
        msgspec.msgpack.encode(envelope(body="a str, not bytes")),
        msgspec.msgpack.encode(envelope(headers=[["X-Only-Name"]])),
        msgspec.msgpack.encode(envelope(headers=[["X-Split", "a\r\nSet-Cookie: x=1"]])),
        msgspec.msgpack.encode(envelope(stored_at=float("nan"))),
        msgspec.msgpack.encode({k: v for k, v in envelope().items() if k != "stale_until"}),
        msgspec.msgpack.encode([1, 200, [], b"", NOW, NOW, NOW, "x"]),
        msgspec.msgpack.encode(envelope())[:-3],
        pickle.dumps({"status": 200}),
        msgspec.msgpack.encode(envelope(vary=["accept"], variants=[VARIANT])),
        msgspec.msgpack.encode(envelope(v=2, vary=["accept"])),
        msgspec.msgpack.encode(envelope(v=2, variants=[VARIANT])),
        msgspec.msgpack.encode(envelope(v=2, vary=["accept\r\nx"], variants=[VARIANT])),
        msgspec.msgpack.encode(envelope(v=2, vary=["accept"], variants=["rp:lock:fx:1"])),
    ],
    ids=[
        "empty", "garbage", "reserved-byte", "version-2", "version-as-str", "status-99", "status-600",
        "status-as-str", "body-as-str", "header-without-value", "header-with-crlf", "nan-time",
        "missing-field", "array-not-map", "truncated", "pickle", "index-as-version-1", "index-without-variants",
        "variants-without-vary", "vary-name-with-crlf", "variant-not-a-cache-key",
    ],
)
def test_decode_returns_none_for_malformed_data(data):
    assert decode_entry(data) is None


def test_decode_of_a_valid_hand_made_envelope_works():
    # the counterpart of the malformed cases: the same builder with nothing wrong decodes
    entry = decode_entry(msgspec.msgpack.encode(envelope()))
    assert entry is not None and entry.body == b"hello" and entry.status == 200


def test_decode_never_runs_a_pickle_payload(tmp_path):
    marker = tmp_path / "pwned"
    assert decode_entry(pickle.dumps(WritesMarker(str(marker)))) is None
    assert not marker.exists()


def test_decode_of_non_bytes_returns_none():
    assert decode_entry("a string") is None  # type: ignore[arg-type]
    assert decode_entry(None) is None  # type: ignore[arg-type]
