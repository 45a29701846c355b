"""The bundled flights providers as committed: KAC and ODCloud's real endpoints, parameters and answer
shapes, their transforms and result-code tables, and each code class end to end through the proxy
against the bundled mock vendors (real servers on 127.0.0.1)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import yaml

from proxy.adapters.transform import TransformError, decode_document, normalise
from proxy.adapters.vendor_codes import Meaning
from proxy.config.model import Upstream
from proxy.config.parse import load_config, parse_config
from proxy.demo.mocks import (
    DEMO_SERVICE_KEY,
    KAC_DOMESTIC_SCHEDULES,
    KAC_STATUS,
    ODCLOUD_DOMESTIC,
    ODCLOUD_INTERNATIONAL,
    MockProviders,
)
from proxy.demo.mocks.providers import COMMITTED_ROUTES

KEY = DEMO_SERVICE_KEY
ENCODED_KEY = "ZGVtby1rZXk%2BZm9yL3RoZS9tb2Nrcw%3D%3D"


def committed_upstream(name: str) -> Upstream:
    config = load_config(COMMITTED_ROUTES, env={})
    return next(u for u in config.upstreams() if u.name == name)


KAC = committed_upstream("flights_kac")
ODCLOUD = committed_upstream("flights_odcloud")


def normalised(upstream: Upstream, body: bytes | dict[str, Any]) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    out, _ = normalise(upstream.transform or "", {"upstream": upstream.name}, decode_document(raw, []), [])
    return orjson.loads(out)


def meaning(upstream: Upstream, body: bytes | dict[str, Any], status: int = 200) -> Meaning | None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    assert upstream.result_codes is not None
    verdict = upstream.result_codes.verdict(decode_document(raw, []), status)
    return verdict.meaning if verdict is not None else None


def kac_answer(items: Any, code: str = "00") -> dict[str, Any]:
    return {"response": {"header": {"resultCode": code, "resultMsg": "NORMAL SERVICE."},
                         "body": {"items": items, "numOfRows": 10, "pageNo": 1, "totalCount": 1}}}


# --- transforms against recorded-shape answers ---------------------------------------------------

def test_kac_domestic_schedules_one_item_is_an_object():
    item = {"airlineKorean": "대한항공", "airlineEnglish": "KOREAN AIR", "arrivalcity": "제주", "domesticArrivalTime": "0835",
            "domesticEddate": "2025-03-29", "domesticNum": "KE1203", "domesticStartTime": "0730",
            "domesticStdate": "2024-10-27", "startcity": "김포", "domesticMon": "Y"}
    assert normalised(KAC, kac_answer({"item": item})) == {"flights": [
        {"flight": "KE1203", "airline": "KOREAN AIR", "scheduled": "0730", "estimated": None, "gate": None,
         "status": None}], "source": "flights_kac"}


def test_kac_international_schedules_a_list_with_korean_airline_names():
    items = [{"airlineKorean": "대한항공", "airport": "인천", "city": "나리타", "internationalIoType": "OUT",
              "internationalNum": "KE703", "internationalTime": "0900"},
             {"airlineKorean": "아시아나항공", "airport": "인천", "city": "나리타", "internationalIoType": "OUT",
              "internationalNum": "OZ102", "internationalTime": "0930"}]
    flights = normalised(KAC, kac_answer({"item": items}))["flights"]
    assert [(f["flight"], f["airline"], f["scheduled"]) for f in flights] == [("KE703", "대한항공", "0900"),
                                                                             ("OZ102", "아시아나항공", "0930")]


def test_kac_status_gives_estimate_gate_and_remark_and_the_korean_remark_when_no_english_one():
    items = [{"airFln": "OZ8915", "airlineEnglish": "ASIANA AIRLINES", "airlineKorean": "아시아나항공", "std": "0800",
              "etd": "0840", "gate": "11", "rmkEng": "DELAYED", "rmkKor": "지연", "io": "O", "line": "국내"},
             {"airFln": "7C103", "airlineKorean": "제주항공", "std": "0825", "etd": "", "gate": "", "rmkEng": "",
              "rmkKor": "결항"}]
    assert normalised(KAC, kac_answer({"item": items}))["flights"] == [
        {"flight": "OZ8915", "airline": "ASIANA AIRLINES", "scheduled": "0800", "estimated": "0840", "gate": "11",
         "status": "DELAYED"},
        {"flight": "7C103", "airline": "제주항공", "scheduled": "0825", "estimated": None, "gate": None, "status": "결항"}]


def test_kac_status_in_xml_reads_like_its_json():
    xml = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?><response><header><resultCode>00</resultCode>'
           '<resultMsg>NORMAL SERVICE.</resultMsg></header><body><items><item><airFln>KE1203</airFln>'
           '<airlineEnglish>KOREAN AIR</airlineEnglish><std>0730</std><etd>0734</etd><gate>3</gate>'
           '<rmkEng>DEPARTED</rmkEng><rmkKor>출발</rmkKor></item></items><numOfRows>10</numOfRows><pageNo>1</pageNo>'
           '<totalCount>1</totalCount></body></response>').encode()
    assert meaning(KAC, xml) is Meaning.SUCCESS
    assert normalised(KAC, xml)["flights"] == [{"flight": "KE1203", "airline": "KOREAN AIR", "scheduled": "0730",
                                                "estimated": "0734", "gate": "3", "status": "DEPARTED"}]


@pytest.mark.parametrize("body", [
    kac_answer(""),                                                                     # JSON: "items": ""
    {"response": {"header": {"resultCode": "03", "resultMsg": "NODATA_ERROR"}}},        # NODATA, no body
    b"<response><header><resultCode>03</resultCode><resultMsg>NODATA_ERROR</resultMsg></header></response>",
    b"<response><header><resultCode>00</resultCode></header><body><items/><totalCount>0</totalCount></body></response>",
])
def test_kac_no_flights_in_every_shape_is_an_empty_list(body):
    assert normalised(KAC, body) == {"flights": [], "source": "flights_kac"}
    assert meaning(KAC, body) in (Meaning.SUCCESS, Meaning.EMPTY)


def test_an_answer_not_in_the_vendors_shape_fails_the_transform_instead_of_passing_as_empty():
    for upstream, body in ((KAC, {"unexpected": "shape"}), (ODCLOUD, {"unexpected": "shape"}),
                           (ODCLOUD, {"data": "not a list"})):
        with pytest.raises(TransformError, match="produced nothing"):
            normalised(upstream, body)


def test_odcloud_domestic_and_international_datasets_name_their_columns_differently():
    domestic = {"page": 1, "perPage": 10, "totalCount": 1110, "currentCount": 1, "matchCount": 1, "data": [
        {"항공사": "대한항공", "항공편명": "KE1203", "출발공항": "GMP", "도착공항": "CJU", "출발시각": "0730", "도착시각": "0835",
         "운항요일": "월화수목금토일", "시작일자": "2024-10-27", "종료일자": "2025-03-29"}]}
    international = {"page": 1, "perPage": 10, "totalCount": 172, "currentCount": 1, "matchCount": 1, "data": [
        {"항공사": "아시아나항공", "운항편명": "OZ102", "출발공항": "ICN", "도착공항": "NRT", "출발시간": "09:30",
         "도착시간": "12:00", "운항요일": "월화수목금토일", "국내_국제": "국제"}]}
    older = {"data": [{"편명": "OZ8120", "항공사": "AAR", "출발공항": "CJU", "출발시간": "07:55"}]}  # an older uddi
    assert normalised(ODCLOUD, domestic)["flights"] == [{"flight": "KE1203", "airline": "대한항공", "scheduled": "0730",
                                                        "estimated": None, "gate": None, "status": None}]
    assert normalised(ODCLOUD, international)["flights"][0]["flight"] == "OZ102"
    assert normalised(ODCLOUD, international)["flights"][0]["scheduled"] == "09:30"
    assert normalised(ODCLOUD, older)["flights"][0]["flight"] == "OZ8120"
    assert normalised(ODCLOUD, {"data": [], "matchCount": 0}) == {"flights": [], "source": "flights_odcloud"}
    assert meaning(ODCLOUD, domestic) is None  # a success carries no code at all


GATEWAY = (b"<OpenAPI_ServiceResponse><cmmMsgHeader><errMsg>SERVICE ERROR</errMsg>"
           b"<returnAuthMsg>LIMITED_NUMBER_OF_SERVICE_REQUESTS_EXCEEDS_ERROR</returnAuthMsg>"
           b"<returnReasonCode>22</returnReasonCode></cmmMsgHeader></OpenAPI_ServiceResponse>")


@pytest.mark.parametrize("upstream, body, status, expected", [
    (KAC, GATEWAY, 200, Meaning.QUOTA),
    (KAC, GATEWAY.replace(b"22", b"30"), 200, Meaning.KEY_REFUSED),
    (ODCLOUD, GATEWAY, 200, Meaning.QUOTA),
    (KAC, kac_answer("", "11"), 200, Meaning.CALLER_ERROR),
    (KAC, kac_answer("", "04"), 200, Meaning.VENDOR_ERROR),
    (KAC, kac_answer("", "77"), 200, Meaning.VENDOR_ERROR),        # unknown: the vendor failed
    (ODCLOUD, {"code": -4, "msg": "등록되지 않은 인증키 입니다."}, 400, Meaning.KEY_REFUSED),
    (ODCLOUD, {"code": -401, "msg": "유효하지 않은 인증키 입니다."}, 401, Meaning.KEY_REFUSED),
    (ODCLOUD, {"code": -10, "msg": "트래픽 허용 횟수를 초과하였습니다."}, 400, Meaning.QUOTA),
    (ODCLOUD, {"code": -2, "msg": "요청하신 파라미터가 적합하지 않습니다."}, 400, Meaning.CALLER_ERROR),
    (ODCLOUD, {"code": -1, "msg": "시스템 내부 오류가 발생하였습니다."}, 400, Meaning.VENDOR_ERROR),
])
def test_the_shipped_tables_give_each_error_envelope_its_meaning(upstream, body, status, expected):
    assert meaning(upstream, body, status) is expected


def test_both_shipped_tables_reset_quotas_at_midnight_korea_time():
    assert str(KAC.result_codes.daily_reset) == str(ODCLOUD.result_codes.daily_reset) == "00:00+09:00"


# --- through the proxy, against the bundled mock vendors ----------------------------------------------

@pytest.fixture
async def mocks():
    providers = MockProviders()
    await providers.start()
    yield providers
    await providers.stop()


def with_kac_keys(text: str) -> str:
    """The table with flights_kac rotating two keys, as docs/adapters.md shows for a second key."""
    document = yaml.safe_load(text)
    kac = document["services"]["flights"]["upstreams"][0]
    kac["query"]["serviceKey"] = "{key}"
    kac["keys"] = ["${KAC_API_KEY}", "${KAC_API_KEY_2}"]
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


async def test_a_key_pasted_encoded_or_decoded_reaches_the_vendor_as_the_same_query(mocks, proxy_factory, clock):
    text = mocks.committed_route_table()
    seen = []
    for env in (mocks.env, {"KAC_API_KEY": KEY, "ODCLOUD_API_KEY": ENCODED_KEY}):
        proxy = await proxy_factory(text, clock=clock, env=env)
        assert (await proxy.get("/flights/status/KE1203")).status == 200
        mocks.flights_kac.fail(503)
        assert (await proxy.get("/flights/schedules/GMP")).headers["X-Upstream"] == "flights_odcloud"
        mocks.flights_kac.heal()
        kac, odcloud = mocks.flights_kac.seen[-2], mocks.flights_odcloud.seen[-1]
        assert kac.query["serviceKey"] == odcloud.query["serviceKey"] == KEY  # the vendors read the key exactly
        seen.append((kac.path_qs, odcloud.path_qs))
    assert seen[0] == seen[1]
    assert f"serviceKey={ENCODED_KEY}" in seen[0][0] and f"serviceKey={ENCODED_KEY}" in seen[0][1]
    assert "%EC%B6%9C%EB%B0%9C%EA%B3%B5%ED%95%AD=GMP" in seen[0][1]  # 출발공항, UTF-8, encoded once


async def test_a_hundred_unknown_flights_are_empty_answers_and_the_breaker_stays_closed(mocks, proxy_factory, clock):
    proxy = await proxy_factory(mocks.committed_route_table(), clock=clock, env=mocks.env)
    for n in range(100):
        response = await proxy.get(f"/flights/status/ZZ{n}")
        assert response.status == 200, await response.text()
        assert await response.json() == {"flights": [], "source": "flights_kac"}
    assert mocks.flights_kac.calls == 100
    breaker = proxy.breaker("flights_kac")
    assert breaker.state.value == "CLOSED" and breaker.failures == 0
    again = await proxy.get("/flights/status/ZZ7")
    assert again.headers["X-Cache"] == "HIT" and mocks.flights_kac.calls == 100  # cached with the route's ttl
    clock.advance(5 * 60 + 1)
    assert (await proxy.get("/flights/status/ZZ7")).headers["X-Cache"] != "HIT"


async def test_a_missing_parameter_is_a_400_naming_it_with_no_retry_and_no_breaker_failure(mocks, proxy_factory, clock):
    proxy = await proxy_factory(mocks.committed_route_table(), clock=clock, env=mocks.env)
    mocks.flights_kac.answer_code("11")
    response = await proxy.get("/flights/status/KE1203")
    body = await response.json()
    assert response.status == 400 and body["error"] == "invalid_request"
    assert body["attempts"][0] == {
        "upstream": "flights_kac", "outcome": "caller_error", "status": 200,
        "detail": "result code 11 (NO_MANDATORY_REQUEST_PARAMETERS_ERROR): the vendor refused one of the request's "
                  "parameters: {flight} (sent as schFln)"}
    assert mocks.flights_kac.calls == 1 and proxy.breaker("flights_kac").failures == 0


async def test_a_spent_quota_rests_the_key_until_midnight_in_seoul_and_the_next_key_is_used(mocks, proxy_factory,
                                                                                           clock):
    env = {**mocks.env, "KAC_API_KEY": "first-key+/=", "KAC_API_KEY_2": "second-key+/="}
    mocks.flights_kac.service_keys = {"first-key+/=", "second-key+/="}
    mocks.flights_kac.answer_code("22", key="first-key+/=")
    proxy = await proxy_factory(with_kac_keys(mocks.committed_route_table()), clock=clock, env=env)
    response = await proxy.get("/flights/status/OZ8915")
    assert response.status == 200 and response.headers["X-Upstream"] == "flights_kac"
    assert [seen.query["serviceKey"] for seen in mocks.flights_kac.seen] == ["first-key+/=", "second-key+/="]
    circuits = await (await proxy.get("/health/integrations/circuits")).json()
    keys = next(c for c in circuits["circuits"] if c["provider"] == "flights_kac")["keys"]
    assert [k["spentUntil"] for k in keys] == ["2024-12-01T15:00:00.000Z", None]  # 00:00 in Seoul
    assert keys[0]["reason"] == "result code 22 (LIMITED_NUMBER_OF_SERVICE_REQUESTS_EXCEEDS_ERROR)"
    assert proxy.breaker("flights_kac").failures == 0
    clock.advance(7 * 3600 - 1)
    await proxy.get("/flights/status/KE1203")
    assert mocks.flights_kac.seen[-1].query["serviceKey"] == "second-key+/="
    clock.advance(1)  # midnight in Seoul: the quota is back
    mocks.flights_kac.heal()
    await proxy.get("/flights/status/LJ305")
    assert mocks.flights_kac.seen[-1].query["serviceKey"] == "first-key+/="


async def test_a_key_the_portal_does_not_know_rests_and_the_next_key_is_used(mocks, proxy_factory, clock):
    env = {**mocks.env, "KAC_API_KEY": "unregistered", "KAC_API_KEY_2": KEY}
    proxy = await proxy_factory(with_kac_keys(mocks.committed_route_table()), clock=clock, env=env)
    response = await proxy.get("/flights/status/KE1203")
    assert response.status == 200 and [f["flight"] for f in (await response.json())["flights"]] == ["KE1203"]
    assert [seen.query["serviceKey"] for seen in mocks.flights_kac.seen] == ["unregistered", KEY]
    circuits = await (await proxy.get("/health/integrations/circuits")).json()
    keys = next(c for c in circuits["circuits"] if c["provider"] == "flights_kac")["keys"]
    assert keys[0]["spentUntil"] == "2024-12-01T09:00:00.000Z"  # like after a 401: key_cooldown
    assert keys[0]["reason"] == "result code 30 (SERVICE_KEY_IS_NOT_REGISTERED_ERROR)"


async def test_a_vendor_error_falls_back_to_the_secondary_and_is_never_cached(mocks, proxy_factory, clock):
    proxy = await proxy_factory(mocks.committed_route_table(), clock=clock, env=mocks.env)
    mocks.flights_kac.answer_code("99")
    response = await proxy.get("/flights/schedules/GMP")
    assert response.status == 200 and response.headers["X-Upstream"] == "flights_odcloud"
    assert [f["flight"] for f in (await response.json())["flights"]] == ["KE1203", "OZ8915", "7C103", "LJ305", "KE1107"]
    assert mocks.flights_kac.calls == 1 and proxy.breaker("flights_kac").failures == 1
    assert mocks.flights_odcloud.seen[-1].path == ODCLOUD_DOMESTIC
    await mocks.flights_odcloud.go_down()
    failed = await proxy.get("/flights/schedules/CJU")
    attempts = [(a["upstream"], a["outcome"]) for a in (await failed.json())["attempts"]]
    assert failed.status == 502 and attempts[0] == ("flights_kac", "vendor_error")
    mocks.flights_kac.heal()
    fresh = await proxy.get("/flights/schedules/CJU")  # the 99 was never stored: a MISS, answered by KAC
    assert (fresh.status, fresh.headers["X-Cache"], fresh.headers["X-Upstream"]) == (200, "MISS", "flights_kac")
    assert mocks.flights_kac.seen[-1].path == KAC_DOMESTIC_SCHEDULES


async def test_odclouds_quota_code_on_a_4xx_rests_it_and_kac_answers(mocks, proxy_factory, clock):
    document = yaml.safe_load(mocks.committed_route_table())
    flights = document["services"]["flights"]
    flights["upstreams"].reverse()  # ODCloud first, as the original system had it for schedules
    proxy = await proxy_factory(yaml.safe_dump(document, allow_unicode=True), clock=clock, env=mocks.env)
    mocks.flights_odcloud.answer_code(-10)
    response = await proxy.get("/flights/schedules/international/ICN")
    assert response.status == 200 and response.headers["X-Upstream"] == "flights_kac"
    assert [f["flight"] for f in (await response.json())["flights"]] == ["KE703", "OZ102"]
    assert mocks.flights_odcloud.seen[-1].path == ODCLOUD_INTERNATIONAL
    circuits = await (await proxy.get("/health/integrations/circuits")).json()
    odcloud = next(c for c in circuits["circuits"] if c["provider"] == "flights_odcloud")
    assert odcloud["restingUntil"] == "2024-12-01T09:00:00.000Z"  # until the reset, at most max_rest (1 h)
    assert odcloud["failures"] == 0
    await proxy.get("/flights/schedules/international/GMP")
    assert mocks.flights_odcloud.calls == 1  # resting: not called


async def test_the_status_routes_send_the_parameters_the_status_api_needs(mocks, proxy_factory, clock):
    proxy = await proxy_factory(mocks.committed_route_table(), clock=clock, env=mocks.env)
    mocks.board.set_status("KE703", "DELAYED", estimated="0945")
    response = await proxy.get("/flights/status/international/KE703")
    assert await response.json() == {"flights": [{"flight": "KE703", "airline": "KOREAN AIR", "scheduled": "0900",
                                                  "estimated": "0945", "gate": "251", "status": "DELAYED"}],
                                     "source": "flights_kac"}
    query = mocks.flights_kac.seen[-1].query
    assert mocks.flights_kac.seen[-1].path == KAC_STATUS
    assert {k: query[k] for k in ("schFln", "schLineType", "schIOType", "schStTime", "schEdTime", "_type")} == \
        {"schFln": "KE703", "schLineType": "I", "schIOType": "O", "schStTime": "0000", "schEdTime": "2400",
         "_type": "json"}
    assert "schDeptCityCode" not in query and "schFlightNum" not in query  # those are the schedule list's


async def test_a_status_lookup_never_sends_odcloud_a_path_it_does_not_have(mocks, proxy_factory, clock):
    proxy = await proxy_factory(mocks.committed_route_table(), clock=clock, env=mocks.env)
    mocks.flights_kac.fail(503)
    response = await proxy.get("/flights/status/KE1203")
    attempts = [(a["upstream"], a["outcome"]) for a in (await response.json())["attempts"]]
    assert response.status == 502 and ("flights_odcloud", "no_path") in attempts
    assert mocks.flights_odcloud.calls == 0 and proxy.breaker("flights_odcloud").failures == 0


def test_the_committed_table_loads_without_any_flights_key():
    config = parse_config(COMMITTED_ROUTES.read_text(), "routes.yaml", {})
    assert [u.name for u in config.services["flights"].upstreams] == ["flights_kac", "flights_odcloud"]
