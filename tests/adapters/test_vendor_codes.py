"""Result codes inside answers: reading them (JSON, XML envelopes, ODCloud's error object), the table in
the route table, and what each meaning does through the proxy against a scripted fake vendor."""

from __future__ import annotations

import gzip

import orjson
import pytest

from proxy.adapters.quota import DailyReset, KeyRing
from proxy.adapters.transform import TransformError, decode_document
from proxy.adapters.vendor_codes import Meaning, ResultCodes, Verdict, blamed_parameter
from proxy.config.parse import ConfigError, parse_config
from tests.fakes import Fail, Ok, eventually, route_table, start_proxy, stop_proxy

DATA_GO_KR = ResultCodes(
    code="response.header.resultCode || OpenAPI_ServiceResponse.cmmMsgHeader.returnReasonCode || code",
    message="response.header.resultMsg || OpenAPI_ServiceResponse.cmmMsgHeader.returnAuthMsg || msg",
    meanings={"00": Meaning.SUCCESS, "03": Meaning.EMPTY, "10": Meaning.CALLER_ERROR, "30": Meaning.KEY_REFUSED,
              "22": Meaning.QUOTA, "99": Meaning.VENDOR_ERROR, "-4": Meaning.KEY_REFUSED})

GATEWAY_XML = (b'<OpenAPI_ServiceResponse><cmmMsgHeader><errMsg>SERVICE ERROR</errMsg>'
               b'<returnAuthMsg>SERVICE_KEY_IS_NOT_REGISTERED_ERROR</returnAuthMsg>'
               b'<returnReasonCode>30</returnReasonCode></cmmMsgHeader></OpenAPI_ServiceResponse>')


def header(code: str, message: str = "") -> bytes:
    return orjson.dumps({"response": {"header": {"resultCode": code, "resultMsg": message}}})


def verdict(body: bytes, status: int = 200) -> Verdict | None:
    return DATA_GO_KR.verdict(decode_document(body, []), status)


# --- reading the code ----------------------------------------------------------------------

def test_a_code_in_a_json_header_is_read_with_its_message():
    assert verdict(header("03", "NODATA_ERROR")) == Verdict(Meaning.EMPTY, "03", "NODATA_ERROR")
    assert str(verdict(header("03", "NODATA_ERROR"))) == "result code 03 (NODATA_ERROR)"


def test_the_gateways_xml_envelope_is_read_even_where_json_was_asked():
    assert verdict(GATEWAY_XML) == Verdict(Meaning.KEY_REFUSED, "30", "SERVICE_KEY_IS_NOT_REGISTERED_ERROR")
    declared = b'<?xml version="1.0" encoding="UTF-8"?>\n' + GATEWAY_XML
    assert verdict(declared) == verdict(GATEWAY_XML)


def test_odclouds_error_object_has_a_number_code_read_as_written():
    found = verdict(orjson.dumps({"code": -4, "msg": "등록되지 않은 인증키 입니다."}), 400)
    assert found == Verdict(Meaning.KEY_REFUSED, "-4", "등록되지 않은 인증키 입니다.")


def test_an_unknown_code_in_a_2xx_is_a_vendor_error_but_a_4xx_keeps_its_own_meaning():
    assert verdict(header("77", "SOMETHING_NEW")) == Verdict(Meaning.VENDOR_ERROR, "77", "SOMETHING_NEW")
    assert verdict(header("77"), 404) is None
    assert verdict(orjson.dumps({"code": -4, "msg": "x"}), 404).meaning is Meaning.KEY_REFUSED  # known: it applies


@pytest.mark.parametrize("status", [500, 503, 302, 101])
def test_a_5xx_or_a_non_answer_status_decides_whatever_its_body_says(status):
    assert verdict(header("00"), status) is None
    assert verdict(header("99"), status) is None


def test_a_success_code_does_not_turn_a_4xx_into_an_answer():
    assert verdict(header("00"), 400) is None
    assert verdict(header("03"), 404) is None


@pytest.mark.parametrize("body", [b'{"data": []}', b'{"response": {"header": {}}}', b'[1, 2]', b'"00"',
                                  b'{"code": true}', b'{"code": null}', b'{"code": "  "}', b'{"code": [1]}'])
def test_an_answer_without_a_code_has_no_verdict(body):
    assert verdict(body) is None


def test_a_vendor_message_is_one_bounded_line():
    found = verdict(header("99", "line one\nline two\t\x00" + "x" * 500))
    assert found is not None and found.message is not None
    assert "\n" not in found.message and "\x00" not in found.message
    assert found.message.startswith("line one line two x") and len(found.message) == 203


def test_a_key_the_vendor_echoes_in_its_message_is_hidden_in_every_form_before_it_is_cut():
    straddling = "x" * 195 + " ab+c/d== is not registered"  # cut at 200 first, "ab+c" would be left
    found = DATA_GO_KR.verdict(decode_document(header("30", straddling), []), 200, hide=["ab+c/d=="])
    assert found is not None and found.message == "x" * 195 + " *** ..." and "ab+c" not in found.message
    echo = "serviceKey=ab%2Bc%2Fd%3D%3D and ab+c/d== again"
    found = DATA_GO_KR.verdict(decode_document(header("10", echo), []), 200, hide=["ab+c/d==", "abc"])
    assert found is not None and found.message == "serviceKey=*** and *** again"  # "abc": too short to be a key


def test_a_failing_expression_over_an_odd_document_is_no_code():
    codes = ResultCodes(code="to_number(code)", meanings={"1": Meaning.SUCCESS})
    assert codes.verdict({"code": {"nested": 1}}, 200) is None
    assert codes.verdict({"code": "1"}, 200) == Verdict(Meaning.SUCCESS, "1")


# --- XML read as nested objects --------------------------------------------------------------

def test_xml_reads_as_the_json_shape_one_item_or_many_and_empty_elements_as_empty_strings():
    one = decode_document(b"<response><body><items><item><airFln>KE1203</airFln><gate/></item></items>"
                          b"<totalCount>1</totalCount></body></response>", [])
    assert one == {"response": {"body": {"items": {"item": {"airFln": "KE1203", "gate": ""}}, "totalCount": "1"}}}
    two = decode_document(b"<r><items><item><a>1</a></item><item><a>2</a></item></items><empty></empty></r>", [])
    assert two == {"r": {"items": {"item": [{"a": "1"}, {"a": "2"}]}, "empty": ""}}


def test_xml_namespaces_are_dropped_and_gzip_is_undone():
    body = gzip.compress(b'<ns:a xmlns:ns="urn:x"><ns:b>1</ns:b></ns:a>')
    assert decode_document(body, [("Content-Encoding", "gzip")]) == {"a": {"b": "1"}}


@pytest.mark.parametrize("body, reason", [
    (b'<!DOCTYPE r [<!ENTITY a "aaaa">]><r>&a;</r>', "DTD"),
    (b"<r><unclosed></r>", "well-formed"),
    (b"<a>" * 70 + b"</a>" * 70, "deeper than 64"),
    (b"<html>maintenance", "well-formed"),
    ('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE r [<!ENTITY a "a">]><r>&a;</r>'.encode("utf-16-le"),
     "ASCII-compatible"),
    (b"not json", "not JSON"),
])
def test_a_hostile_or_broken_body_is_refused_with_the_reason(body, reason):
    with pytest.raises(TransformError, match=reason):
        decode_document(body, [])


# --- quota resets and which parameter ---------------------------------------------------------

def test_the_daily_reset_is_the_next_midnight_korea_time_in_utc(clock):
    reset = DailyReset.parse("00:00+09:00")
    assert clock.time() == 1_733_040_000.0  # 2024-12-01T08:00:00Z, 17:00 in Seoul
    assert reset.next_after(clock.time()) == 1_733_065_200.0  # 2024-12-01T15:00:00Z, midnight in Seoul
    assert reset.next_after(1_733_065_200.0) == 1_733_065_200.0 + 86400  # at the reset: the next one
    assert reset.next_after(1_733_065_199.0) == 1_733_065_200.0
    assert DailyReset.parse("06:30Z").next_after(clock.time()) == 1_733_034_600.0 + 86400
    assert str(reset) == "00:00+09:00" and str(DailyReset.parse("23:15-03:30")) == "23:15-03:30"


@pytest.mark.parametrize("text", ["24:00+09:00", "00:00", "0:00+09:00", "00:00+15:00", "midnight", 0, None])
def test_a_bad_daily_reset_is_refused(text):
    with pytest.raises(ValueError, match="daily reset"):
        DailyReset.parse(text)


def test_a_key_rested_until_a_time_says_why_until_it_comes_back(clock):
    ring = KeyRing(("k-one", "k-two"), clock, 3600.0)
    assert ring.rest(0, clock.time() + 60, "result code 22 (LIMITED)") == clock.time() + 60
    assert ring.current() == (1, "k-two")
    assert ring.snapshot()[0]["reason"] == "result code 22 (LIMITED)"
    assert ring.rest(0, clock.time() + 30, "shorter") == clock.time() + 60  # a shorter rest changes nothing
    assert ring.snapshot()[0]["reason"] == "result code 22 (LIMITED)"
    clock.advance(60)
    assert ring.current() == (0, "k-one") and ring.snapshot()[0]["reason"] is None


def test_the_blamed_parameter_is_the_one_the_vendor_names_else_every_one_from_the_request():
    sent = [("schFln", "flight"), ("schAirCode", "airport")]
    assert blamed_parameter("INVALID_REQUEST_PARAMETER_ERROR(schFln)", sent) == \
        "the vendor refused {flight} (sent as schFln)"
    assert blamed_parameter("INVALID_REQUEST_PARAMETER_ERROR", sent) == \
        "the vendor refused one of the request's parameters: {flight} (sent as schFln), {airport} (sent as schAirCode)"
    assert blamed_parameter("schFlnX is wrong", sent).startswith("the vendor refused one of")  # whole words only
    assert blamed_parameter(None, []) == "the vendor refused the request's parameters"


# --- the table in the route table ------------------------------------------------------------

def vendor_table(result_codes: object, **upstream: object) -> str:
    return route_table({"flights": {"retry": "NONE", "routes": [{"match": "/flights/status/{flight}"}], "upstreams": [
        {"name": "vendor", "url": "http://127.0.0.1:9", "query": {"flightNo": "{flight}"},
         "result_codes": result_codes, **upstream}]}})


CODES = {"code": DATA_GO_KR.code, "message": DATA_GO_KR.message, "daily_reset": "00:00+09:00",
         "codes": {"00": "success", "03": "empty", "10": "caller_error", "30": "key_refused", "22": "quota",
                   "99": "vendor_error", "-4": "key_refused"}}


def test_the_table_is_parsed_and_shown_by_check():
    config = parse_config(vendor_table(CODES), "routes.yaml", {})
    codes = config.services["flights"].upstreams[0].result_codes
    assert codes is not None and codes.meanings["03"] is Meaning.EMPTY and codes.meanings["22"] is Meaning.QUOTA
    assert codes.daily_reset == DailyReset(0, 540)
    shown = config.effective["services"]["flights"]["upstreams"][0]["result_codes"]
    assert shown == {**CODES, "daily_reset": "00:00+09:00"}


def problems(result_codes: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(vendor_table(result_codes), "routes.yaml", {})
    return caught.value.problems


def test_check_rejects_an_unknown_meaning_at_its_line():
    text = vendor_table({**CODES, "codes": {"00": "success", "03": "nodata"}})
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "nodata" in row)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "routes.yaml", {})
    assert caught.value.problems == [
        f"routes.yaml:{line}: services.flights.upstreams[0].result_codes.codes.03: unknown meaning 'nodata' "
        "(use success, empty, caller_error, key_refused, quota, vendor_error)"]


@pytest.mark.parametrize("result_codes, expected", [
    ({"codes": {"00": "success"}}, "result_codes: `code` is required"),
    ({"code": "response.header[", "codes": {"00": "success"}}, "result_codes.code: invalid JMESPath"),
    ({"code": "a", "message": "b(", "codes": {"00": "success"}}, "result_codes.message: invalid JMESPath"),
    ({"code": "a", "codes": {}}, "result_codes.codes: expected a mapping of code to meaning"),
    ({"code": "a"}, "result_codes.codes: expected a mapping of code to meaning"),
    ({"code": "a", "codes": ["00"]}, "result_codes.codes: expected a mapping, got a list"),
    ({"code": "a", "codes": {"00": "success"}, "daily_reset": "midnight"}, "result_codes.daily_reset: bad daily reset"),
    ({"code": "a", "codes": {" 00": "success"}}, "code ' 00' has spaces around it"),
    ({"code": "a", "codes": {"00": "success"}, "unknown": 1}, "result_codes: unknown key 'unknown'"),
    ("response.header.resultCode", "result_codes: expected a mapping, got a string"),
])
def test_check_rejects_a_bad_table_and_says_what_is_wrong(result_codes, expected):
    found = problems(result_codes)
    assert any(expected in problem for problem in found), found


def test_an_unquoted_code_is_refused_because_yaml_reads_00_as_the_number_0():
    text = vendor_table(CODES).replace("'00': success", "00: success")
    assert "00: success" in text
    with pytest.raises(ConfigError, match="keys must be strings, got 0"):
        parse_config(text, "routes.yaml", {})


# --- what each meaning does, through the proxy ---------------------------------------------------

def codes_table(url: str, *, keys: list[str] | None = None, secondary: str | None = None) -> str:
    vendor: dict[str, object] = {"name": "vendor", "url": url, "result_codes": CODES,
                                 "query": {"flightNo": "{flight}", "serviceKey": "{key}" if keys else "only-key"},
                                 "transform": "{flights: to_array(response.body.items.item || `[]`)[].{flight: no}, "
                                              "source: '{upstream}'}"}
    if keys:
        vendor["keys"] = keys
    upstreams = [vendor]
    if secondary:
        upstreams.append({"name": "other", "url": secondary})
    return route_table({"flights": {"retry": "DEFAULT", "cache": {"ttl": "5m"},
                                    "routes": [{"match": "/flights/status/{flight}"}], "upstreams": upstreams}})


def answer(code: str, message: str = "", items: object = "") -> Ok:
    return Ok(body=orjson.dumps({"response": {"header": {"resultCode": code, "resultMsg": message},
                                              "body": {"items": items}}}))


async def test_an_empty_code_is_an_empty_answer_cached_and_never_a_breaker_failure(fake_upstream, proxy_factory, clock):
    vendor = await fake_upstream("vendor")
    vendor.default = answer("03", "NODATA_ERROR")
    proxy = await proxy_factory(codes_table(vendor.url), clock=clock)
    for n in range(20):
        response = await proxy.get(f"/flights/status/ZZ{n}")
        assert response.status == 200 and await response.json() == {"flights": [], "source": "vendor"}
    again = await proxy.get("/flights/status/ZZ0")
    assert again.headers["X-Cache"] == "HIT" and vendor.calls == 20
    assert proxy.breaker("vendor").state.value == "CLOSED" and proxy.breaker("vendor").failures == 0


async def test_a_caller_error_is_not_retried_not_a_failure_and_a_400_naming_the_parameter(fake_upstream, proxy_factory,
                                                                                         clock):
    vendor = await fake_upstream("vendor")
    vendor.default = answer("10", "INVALID_REQUEST_PARAMETER_ERROR(flightNo)")
    proxy = await proxy_factory(codes_table(vendor.url), clock=clock)
    response = await proxy.get("/flights/status/K-1")
    body = await response.json()
    assert response.status == 400 and body["error"] == "invalid_request"
    assert body["attempts"] == [{"upstream": "vendor", "outcome": "caller_error", "status": 200, "detail":
                                 "result code 10 (INVALID_REQUEST_PARAMETER_ERROR(flightNo)): the vendor refused "
                                 "{flight} (sent as flightNo)"}]
    assert vendor.calls == 1 and proxy.breaker("vendor").failures == 0
    assert (await proxy.get("/flights/status/K-1")).headers["X-Cache"] == "MISS"  # never cached
    assert vendor.calls == 2


async def test_caller_errors_do_not_make_the_vendor_look_unhealthy(fake_upstream, proxy_factory, clock):
    vendor = await fake_upstream("vendor")
    vendor.default = answer("10", "INVALID_REQUEST_PARAMETER_ERROR")
    proxy = await proxy_factory(codes_table(vendor.url), clock=clock)
    for n in range(10):
        assert (await proxy.get(f"/flights/status/bad-{n}")).status == 400
    stats = await (await proxy.get("/health/integrations/stats?minutes=5")).json()
    assert stats["providers"]["vendor"]["requests"] == 10 and stats["providers"]["vendor"]["errors"] == 0
    health = await (await proxy.get("/health")).json()
    assert health["services"]["flights"]["providers"][0]["status"] == "HEALTHY"
    metrics = await (await proxy.client.get(proxy.metrics_url + "/metrics")).text()
    assert 'external_requests_total{outcome="caller_error",provider="vendor",service="flights"} 10.0' in metrics
    assert 'reason="caller_error"' not in metrics


async def test_a_caller_error_still_lets_the_next_upstream_answer(fake_upstream, proxy_factory, clock):
    vendor, other = await fake_upstream("vendor"), await fake_upstream("other")
    vendor.default = answer("10", "INVALID_REQUEST_PARAMETER_ERROR")
    proxy = await proxy_factory(codes_table(vendor.url, secondary=other.url), clock=clock)
    response = await proxy.get("/flights/status/KE1")
    assert response.status == 200 and response.headers["X-Upstream"] == "other"


async def test_a_vendor_error_in_a_200_falls_back_counts_against_the_breaker_and_is_never_cached(
        fake_upstream, proxy_factory, clock):
    vendor, other = await fake_upstream("vendor"), await fake_upstream("other")
    vendor.default = answer("99", "UNKNOWN_ERROR")
    proxy = await proxy_factory(codes_table(vendor.url, secondary=other.url), clock=clock)
    response = await proxy.get("/flights/status/KE1")
    assert response.status == 200 and response.headers["X-Upstream"] == "other"
    assert vendor.calls == 1  # a vendor error is not retried: portals count every call against a daily quota
    assert proxy.breaker("vendor").failures == 1
    vendor.default = answer("00", items={"item": {"no": "KE1"}})
    other.default = Fail(503)
    clock.advance(3600)  # past any copy's ttl: only a fresh answer would do
    fresh = await proxy.get("/flights/status/KE1")
    assert fresh.headers["X-Upstream"] == "vendor" and await fresh.json() == {"flights": [{"flight": "KE1"}],
                                                                             "source": "vendor"}


async def test_an_unknown_code_in_a_200_is_a_vendor_error(fake_upstream, proxy_factory, clock):
    vendor = await fake_upstream("vendor")
    vendor.default = answer("12", "NO_OPENAPI_SERVICE_ERROR")
    proxy = await proxy_factory(codes_table(vendor.url), clock=clock)
    body = await (await proxy.get("/flights/status/KE1")).json()
    assert body["attempts"][0]["outcome"] == "vendor_error"
    assert body["attempts"][0]["detail"] == "result code 12 (NO_OPENAPI_SERVICE_ERROR)"


async def test_a_spent_quota_rests_the_key_until_midnight_in_seoul_and_the_next_key_answers(
        fake_upstream, proxy_factory, clock):
    vendor = await fake_upstream("vendor")
    vendor.script(answer("22", "LIMITED_NUMBER_OF_SERVICE_REQUESTS_EXCEEDS_ERROR"))
    vendor.default = answer("00", items={"item": [{"no": "KE1"}]})
    proxy = await proxy_factory(codes_table(vendor.url, keys=["key-one-1111", "key-two-2222"]), clock=clock)
    response = await proxy.get("/flights/status/KE1")
    assert response.status == 200 and await response.json() == {"flights": [{"flight": "KE1"}], "source": "vendor"}
    assert [seen.path_qs.split("serviceKey=")[1] for seen in vendor.seen] == ["key-one-1111", "key-two-2222"]
    circuits = await (await proxy.get("/health/integrations/circuits")).json()
    spent = circuits["circuits"][0]["keys"][0]
    assert spent["spentUntil"] == "2024-12-01T15:00:00.000Z"  # 00:00 in Seoul
    assert spent["reason"] == "result code 22 (LIMITED_NUMBER_OF_SERVICE_REQUESTS_EXCEEDS_ERROR)"
    clock.advance(7 * 3600 - 1)
    await proxy.get("/flights/status/KE2")
    assert vendor.seen[-1].path_qs.endswith("serviceKey=key-two-2222")
    clock.advance(1)
    await proxy.get("/flights/status/KE3")
    assert vendor.seen[-1].path_qs.endswith("serviceKey=key-one-1111")


async def test_a_refused_key_rests_for_the_cooldown_like_after_a_401(fake_upstream, proxy_factory, clock):
    vendor = await fake_upstream("vendor")
    vendor.script(Ok(body=GATEWAY_XML, headers={"Content-Type": "text/xml"}))
    vendor.default = answer("00", items="")
    proxy = await proxy_factory(codes_table(vendor.url, keys=["key-one-1111", "key-two-2222"]), clock=clock)
    response = await proxy.get("/flights/status/KE1")
    assert response.status == 200 and vendor.calls == 2
    keys = (await (await proxy.get("/health/integrations/circuits")).json())["circuits"][0]["keys"]
    assert keys[0]["spentUntil"] == "2024-12-01T09:00:00.000Z"  # key_cooldown: 1 h
    assert keys[0]["reason"] == "result code 30 (SERVICE_KEY_IS_NOT_REGISTERED_ERROR)"
    assert proxy.breaker("vendor").failures == 0


async def test_with_no_key_list_a_refused_key_rests_the_upstream_and_the_next_one_answers(
        fake_upstream, proxy_factory, clock):
    vendor, other = await fake_upstream("vendor"), await fake_upstream("other")
    vendor.default = Ok(body=GATEWAY_XML, headers={"Content-Type": "text/xml"})
    proxy = await proxy_factory(codes_table(vendor.url, secondary=other.url), clock=clock)
    first = await proxy.get("/flights/status/KE1")
    assert first.headers["X-Upstream"] == "other" and vendor.calls == 1
    second = await proxy.get("/flights/status/KE2")
    assert second.headers["X-Upstream"] == "other" and vendor.calls == 1  # resting: not called
    body = await (await proxy.get("/health/integrations/circuits")).json()
    assert body["circuits"][0]["restingUntil"] == "2024-12-01T09:00:00.000Z"


async def test_an_odcloud_error_object_on_a_4xx_is_a_refused_key_not_a_4xx_passed_through(
        fake_upstream, proxy_factory, clock):
    vendor, other = await fake_upstream("vendor"), await fake_upstream("other")
    vendor.default = Fail(400, body=orjson.dumps({"code": -4, "msg": "등록되지 않은 인증키 입니다."}))
    proxy = await proxy_factory(codes_table(vendor.url, secondary=other.url), clock=clock)
    response = await proxy.get("/flights/status/KE1")
    assert response.status == 200 and response.headers["X-Upstream"] == "other"


async def test_a_vendor_echoing_the_key_never_shows_it_to_the_caller(fake_upstream, proxy_factory, clock):
    vendor = await fake_upstream("vendor")
    vendor.default = answer("10", "INVALID_REQUEST_PARAMETER_ERROR: flightNo=K-1&serviceKey=key-one-1111")
    proxy = await proxy_factory(codes_table(vendor.url, keys=["key-one-1111", "key-two-2222"]), clock=clock)
    body = await (await proxy.get("/flights/status/K-1")).text()
    assert "key-one-1111" not in body and "serviceKey=***" in body


async def test_a_key_refused_by_a_result_code_rests_on_every_replica(fake_upstream, redis_url, redis_prefix, clock):
    vendor = await fake_upstream("vendor")
    vendor.script(answer("22", "LIMITED_NUMBER_OF_SERVICE_REQUESTS_EXCEEDS_ERROR"))
    vendor.default = answer("00", items="")
    text = codes_table(vendor.url, keys=["key-one-1111", "key-two-2222"]).replace(
        "services:", f"cache:\n  backend: redis\n  url: {redis_url}\n  prefix: '{redis_prefix}'\nservices:")
    a, b = await start_proxy(text, clock=clock), await start_proxy(text, clock=clock)
    try:
        assert await eventually(lambda: b.process.fleet.listening, within=3.0)
        assert (await a.get("/flights/status/KE1")).status == 200
        ring = b.process.runtime.keyrings["vendor"]
        assert await eventually(lambda: ring.current()[1] == "key-two-2222", within=3.0)
        assert ring.snapshot()[0]["spentUntil"] == 1_733_065_200.0  # the daily reset, learnt from the other replica
        await b.get("/flights/status/KE2")
        assert [seen.path_qs.split("serviceKey=")[1] for seen in vendor.seen] == \
            ["key-one-1111", "key-two-2222", "key-two-2222"]
    finally:
        await stop_proxy(a)
        await stop_proxy(b)
