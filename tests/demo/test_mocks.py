"""The bundled mock providers: vendor shapes, fault switches, call counts, and the committed route table pointed at them."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
import yaml

from proxy.config.parse import load_config, parse_config
from proxy.demo.mocks import (
    DEMO_SERVICE_KEY,
    KAC_DOMESTIC_SCHEDULES,
    KAC_INTERNATIONAL_SCHEDULES,
    KAC_STATUS,
    MAX_HANG,
    ODCLOUD_DOMESTIC,
    ODCLOUD_INTERNATIONAL,
    ExchangeRateApiMock,
    FrankfurterMock,
    MockProviders,
)
from proxy.demo.mocks.providers import COMMITTED_ROUTES, VENDOR_URLS

KEY = DEMO_SERVICE_KEY
STATUS = {"serviceKey": KEY, "_type": "json", "schLineType": "D", "schIOType": "O", "schStTime": "0000",
          "schEdTime": "2400"}


@pytest.fixture
async def client():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def mocks():
    providers = MockProviders()
    await providers.start()
    yield providers
    await providers.stop()


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict, str]:
    async with client.get(url) as response:
        return response.status, dict(response.headers), await response.text()


# --- vendor shapes ----------------------------------------------------------------------------

async def test_exchange_rate_api_mock_answers_like_open_er_api(mocks, client):
    async with client.get(mocks.fx_primary.url + "/v6/latest/usd") as response:
        assert response.status == 200
        body = await response.json()
    assert body["result"] == "success"
    assert body["base_code"] == "USD"
    assert body["rates"]["USD"] == 1.0
    assert body["rates"]["KRW"] == 1396.5
    assert re.fullmatch(r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000", body["time_last_update_utc"])


async def test_exchange_rate_api_mock_rejects_an_unknown_currency_with_unsupported_code(mocks, client):
    async with client.get(mocks.fx_primary.url + "/v6/latest/XXX") as response:
        assert response.status == 404
        assert await response.json() == {"result": "error", "error-type": "unsupported-code"}


async def test_frankfurter_mock_answers_like_frankfurter(mocks, client):
    async with client.get(mocks.fx_secondary.url + "/latest?from=USD") as response:
        assert response.status == 200
        body = await response.json()
    assert body["amount"] == 1.0 and body["base"] == "USD"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", body["date"])
    assert "USD" not in body["rates"]  # Frankfurter leaves the base out
    assert body["rates"]["EUR"] == 0.9467
    async with client.get(mocks.fx_secondary.url + "/latest?from=EUR&to=USD,KRW") as response:
        assert set((await response.json())["rates"]) == {"USD", "KRW"}


async def test_frankfurter_mock_answers_404_not_found_for_an_unknown_currency(mocks, client):
    async with client.get(mocks.fx_secondary.url + "/latest?from=XXX") as response:
        assert response.status == 404
        assert await response.json() == {"message": "not found"}


async def test_a_rate_changed_in_the_table_shows_in_both_fx_vendors(mocks, client):
    mocks.rates.set_rate("KRW", 1500.0)
    _, _, primary = await get(client, mocks.fx_primary.url + "/v6/latest/USD")
    _, _, secondary = await get(client, mocks.fx_secondary.url + "/latest?from=USD")
    assert '"KRW": 1500.0' in primary and '"KRW": 1500.0' in secondary


async def test_kac_status_answers_in_the_data_go_kr_envelope_and_follows_the_board(mocks, client):
    mocks.board.set_status("OZ8915", "DELAYED", estimated="0840")
    async with client.get(mocks.flights_kac.url + KAC_STATUS, params={**STATUS, "schFln": "OZ8915"}) as response:
        assert response.status == 200
        document = await response.json()
    assert document["response"]["header"] == {"resultCode": "00", "resultMsg": "NORMAL SERVICE."}
    body = document["response"]["body"]
    assert body["pageNo"] == 1 and body["totalCount"] == 1 and body["numOfRows"] == 10
    item = body["items"]["item"]  # one flight: an object, not a list of one
    assert item["airFln"] == "OZ8915"
    assert (item["rmkEng"], item["rmkKor"], item["etd"], item["io"]) == ("DELAYED", "지연", "0840", "O")


async def test_kac_status_filters_by_line_airport_and_time_and_lists_several_items(mocks, client):
    async with client.get(mocks.flights_kac.url + KAC_STATUS,
                          params={**STATUS, "schAirCode": "GMP", "schStTime": "0800", "schEdTime": "0900"}) as response:
        items = (await response.json())["response"]["body"]["items"]["item"]
    assert [item["airFln"] for item in items] == ["OZ8915", "7C103", "LJ305", "KE1107"]
    async with client.get(mocks.flights_kac.url + KAC_STATUS, params={**STATUS, "schLineType": "I"}) as response:
        items = (await response.json())["response"]["body"]["items"]["item"]
    assert [(item["airFln"], item["line"]) for item in items] == [("KE703", "국제"), ("OZ102", "국제"), ("7C1381", "국제")]


async def test_kac_status_of_an_unknown_flight_is_resultcode_03_nodata(mocks, client):
    async with client.get(mocks.flights_kac.url + KAC_STATUS, params={**STATUS, "schFln": "ZZ999"}) as response:
        assert response.status == 200
        assert await response.json() == {"response": {"header": {"resultCode": "03", "resultMsg": "NODATA_ERROR"}}}


@pytest.mark.parametrize("change, code", [({"schLineType": None}, "11"), ({"schStTime": None}, "11"),
                                          ({"schLineType": "X"}, "10"), ({"schEdTime": "25:00"}, "10"),
                                          ({"schIOType": "both"}, "10")])
async def test_kac_status_answers_10_or_11_for_a_bad_or_missing_parameter(mocks, client, change, code):
    params = {k: v for k, v in {**STATUS, **change}.items() if v is not None}
    async with client.get(mocks.flights_kac.url + KAC_STATUS, params=params) as response:
        assert response.status == 200
        assert (await response.json())["response"]["header"]["resultCode"] == code


async def test_kac_schedules_filter_by_airport_and_an_empty_list_is_items_empty_string(mocks, client):
    async with client.get(mocks.flights_kac.url + KAC_DOMESTIC_SCHEDULES,
                          params={"serviceKey": KEY, "_type": "json", "schDeptCityCode": "GMP"}) as response:
        body = (await response.json())["response"]["body"]
    assert [item["domesticNum"] for item in body["items"]["item"]] == ["KE1203", "OZ8915", "7C103", "LJ305", "KE1107"]
    assert body["totalCount"] == 5 and body["items"]["item"][0]["domesticStartTime"] == "0730"
    async with client.get(mocks.flights_kac.url + KAC_INTERNATIONAL_SCHEDULES,
                          params={"serviceKey": KEY, "_type": "json", "schDeptCityCode": "GMP"}) as response:
        item = (await response.json())["response"]["body"]["items"]["item"]
    assert (item["internationalNum"], item["internationalTime"]) == ("7C1381", "1010")
    async with client.get(mocks.flights_kac.url + KAC_DOMESTIC_SCHEDULES,
                          params={"serviceKey": KEY, "_type": "json", "schDeptCityCode": "XXX"}) as response:
        document = await response.json()
    assert document["response"]["header"]["resultCode"] == "00"
    assert document["response"]["body"] == {"items": "", "numOfRows": 10, "pageNo": 1, "totalCount": 0}


async def test_kac_answers_xml_without_type_json(mocks, client):
    async with client.get(mocks.flights_kac.url + KAC_DOMESTIC_SCHEDULES, params={"serviceKey": KEY}) as response:
        status, content_type, text = response.status, response.headers["Content-Type"], await response.text()
    assert status == 200 and content_type.startswith("text/xml")
    assert "<resultCode>00</resultCode>" in text and "<domesticNum>KE1203</domesticNum>" in text


@pytest.mark.parametrize("query", [{"_type": "json"}, {"_type": "json", "serviceKey": "wrong-key"},
                                   {"_type": "json", "serviceKey": KEY.replace("+", "%2B")}])
async def test_kac_answers_a_missing_wrong_or_twice_encoded_key_with_the_gateways_xml_in_a_200(mocks, client, query):
    async with client.get(mocks.flights_kac.url + KAC_STATUS, params=query) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/xml")
        text = await response.text()
    assert text.startswith("<OpenAPI_ServiceResponse>")
    assert "<returnAuthMsg>SERVICE_KEY_IS_NOT_REGISTERED_ERROR</returnAuthMsg>" in text
    assert "<returnReasonCode>30</returnReasonCode>" in text


async def test_a_scripted_code_is_answered_in_its_envelope_for_its_key_and_times(mocks, client):
    kac = mocks.flights_kac
    kac.service_keys.add("second-key")
    kac.answer_code("22", key=KEY)
    kac.answer_code("99", times=1)
    async with client.get(kac.url + KAC_STATUS, params=STATUS) as response:
        assert "<returnReasonCode>22</returnReasonCode>" in await response.text()  # a gateway code: XML
    async with client.get(kac.url + KAC_STATUS, params={**STATUS, "serviceKey": "second-key"}) as response:
        assert (await response.json())["response"]["header"] == {"resultCode": "99", "resultMsg": "UNKNOWN_ERROR"}
    async with client.get(kac.url + KAC_STATUS, params={**STATUS, "serviceKey": "second-key"}) as response:
        assert (await response.json())["response"]["header"]["resultCode"] == "00"
    kac.heal()
    async with client.get(kac.url + KAC_STATUS, params=STATUS) as response:
        assert (await response.json())["response"]["header"]["resultCode"] == "00"


async def test_odcloud_answers_its_dataset_shape_with_korean_keys_filtered_by_korean_parameters(mocks, client):
    async with client.get(mocks.flights_odcloud.url + ODCLOUD_DOMESTIC,
                          params={"serviceKey": KEY, "page": "1", "perPage": "2", "출발공항": "GMP"}) as response:
        assert response.status == 200
        body = await response.json()
    assert {k: body[k] for k in ("page", "perPage", "totalCount", "currentCount", "matchCount")} == \
        {"page": 1, "perPage": 2, "totalCount": 7, "currentCount": 2, "matchCount": 5}
    assert body["data"][0] == {"항공사": "대한항공", "출발공항": "GMP", "도착공항": "CJU", "운항요일": "월화수목금토일",
                               "시작일자": body["data"][0]["시작일자"], "종료일자": body["data"][0]["종료일자"],
                               "항공편명": "KE1203", "출발시각": "0730", "도착시각": "0835"}
    async with client.get(mocks.flights_odcloud.url + ODCLOUD_INTERNATIONAL,
                          params={"serviceKey": KEY, "출발공항": "ICN", "운항편명": "OZ102"}) as response:
        (item,) = (await response.json())["data"]
    assert (item["운항편명"], item["출발시간"], item["국내_국제"]) == ("OZ102", "09:30", "국제")
    async with client.get(mocks.flights_odcloud.url + ODCLOUD_DOMESTIC,
                          params={"serviceKey": KEY, "출발공항": "XXX"}) as response:
        body = await response.json()
    assert body["data"] == [] and body["matchCount"] == 0 and "code" not in body


@pytest.mark.parametrize("params, status, code", [
    ({}, 401, -401), ({"serviceKey": "wrong"}, 400, -4), ({"serviceKey": KEY, "page": "x"}, 400, -2)])
async def test_odcloud_errors_are_its_code_object_with_a_4xx(mocks, client, params, status, code):
    async with client.get(mocks.flights_odcloud.url + ODCLOUD_DOMESTIC, params=params) as response:
        assert response.status == status
        body = await response.json()
    assert body["code"] == code and body["msg"]
    async with client.get(mocks.flights_odcloud.url + "/api/123/v1/uddi:nope", params={"serviceKey": KEY}) as response:
        assert (response.status, (await response.json())["code"]) == (400, -3)


async def test_odcloud_takes_the_key_in_the_authorization_header_too(mocks, client):
    async with client.get(mocks.flights_odcloud.url + ODCLOUD_DOMESTIC,
                          headers={"Authorization": f"Infuser {KEY}"}) as response:
        assert response.status == 200 and (await response.json())["matchCount"] == 7


def test_the_board_refuses_unknown_statuses_and_flights():
    mocks = MockProviders()
    with pytest.raises(ValueError, match="unknown flight status"):
        mocks.board.set_status("KE1203", "LOST")
    with pytest.raises(KeyError):
        mocks.board.set_status("ZZ999", "DELAYED")


# --- faults and counting -----------------------------------------------------------------------

async def test_go_down_refuses_connections_and_come_up_answers_on_the_same_port(client):
    async with ExchangeRateApiMock() as mock:
        port = mock.port
        await mock.go_down()
        assert not mock.up
        with pytest.raises(aiohttp.ClientConnectorError):
            await get(client, mock.url + "/v6/latest/USD")
        await mock.come_up()
        assert mock.port == port
        status, _, _ = await get(client, mock.url + "/v6/latest/USD")
        assert status == 200
        assert mock.calls == 1  # the refused request never reached it


async def test_fail_answers_5xx_for_the_given_number_of_calls_then_heals_itself(client):
    async with FrankfurterMock() as mock:
        mock.fail(502, times=2)
        statuses = [(await get(client, mock.url + "/latest?from=USD"))[0] for _ in range(3)]
        assert statuses == [502, 502, 200]
        assert mock.fault is None


async def test_fail_without_times_lasts_until_heal(client):
    async with FrankfurterMock() as mock:
        mock.fail(503)
        assert [(await get(client, mock.url + "/latest"))[0] for _ in range(3)] == [503, 503, 503]
        mock.heal()
        assert (await get(client, mock.url + "/latest"))[0] == 200


async def test_rate_limit_answers_429_with_retry_after(client):
    async with ExchangeRateApiMock() as mock:
        mock.rate_limit(retry_after=7, times=1)
        status, headers, _ = await get(client, mock.url + "/v6/latest/USD")
        assert (status, headers["Retry-After"]) == (429, "7")
        assert (await get(client, mock.url + "/v6/latest/USD"))[0] == 200


async def test_hang_holds_the_answer_back(client):
    async with ExchangeRateApiMock() as mock:
        mock.hang(MAX_HANG)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(get(client, mock.url + "/v6/latest/USD"), 0.3)
        assert mock.calls == 1  # it arrived; it is just not being answered


async def test_a_short_hang_then_answers_normally(client):
    async with ExchangeRateApiMock() as mock:
        mock.hang(0.01, times=1)
        status, _, body = await get(client, mock.url + "/v6/latest/USD")
        assert status == 200 and '"base_code": "USD"' in body
        assert mock.fault is None


def test_fault_switches_reject_what_they_cannot_do():
    mock = ExchangeRateApiMock()
    with pytest.raises(ValueError, match="rate_limit"):
        mock.fail(429)
    with pytest.raises(ValueError, match="0..60"):
        mock.hang(MAX_HANG + 1)


async def test_calls_are_counted_per_path_with_faulted_ones_included(mocks, client):
    mocks.flights_kac.fail(503, times=1)
    for path in (KAC_STATUS, KAC_STATUS, KAC_DOMESTIC_SCHEDULES):
        async with client.get(mocks.flights_kac.url + path, params={"serviceKey": KEY, "_type": "json"}):
            pass
    assert mocks.flights_kac.calls == 3
    assert mocks.flights_kac.calls_to(KAC_STATUS) == 2
    assert mocks.flights_kac.seen[-1].query == {"serviceKey": KEY, "_type": "json"}
    assert mocks.flights_odcloud.calls == 0
    mocks.flights_kac.reset_calls()
    assert mocks.flights_kac.calls == 0


async def test_come_up_needs_a_port_from_an_earlier_start():
    with pytest.raises(RuntimeError, match="never started"):
        await ExchangeRateApiMock().come_up()


# --- the route table ------------------------------------------------------------------------

def changed_paths(ours: object, theirs: object, where: str = "") -> set[str]:
    """Dotted paths where two parsed YAML documents differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = set()
        for key in ours.keys() | theirs.keys():
            found |= changed_paths(ours.get(key), theirs.get(key), f"{where}.{key}" if where else str(key))
        return found
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return {p for n, (a, b) in enumerate(zip(ours, theirs)) for p in changed_paths(a, b, f"{where}.{n}")}
    return set() if ours == theirs else {where}


URLS = {f"services.{service}.upstreams.{n}.url" for service, count in (("fx", 2), ("flights", 2)) for n in range(count)}
LISTENERS = {"server.listen", "server.metrics_listen"}


async def test_the_committed_route_table_changes_only_the_vendor_urls_and_the_listeners(mocks):
    committed = yaml.safe_load(COMMITTED_ROUTES.read_text())
    ours = yaml.safe_load(mocks.committed_route_table())
    assert changed_paths(ours, committed) == URLS | LISTENERS
    assert ours["server"] == {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}
    for service in ours["services"].values():
        for upstream in service["upstreams"]:
            assert upstream["url"] == mocks[upstream["name"]].base_url
    assert ours["services"]["flights"]["upstreams"][1]["url"].endswith("/api")  # ODCloud's base path is kept
    assert {u["name"]: u["url"] for s in committed["services"].values() for u in s["upstreams"]} == VENDOR_URLS


async def test_the_demo_route_table_also_shortens_only_the_timings(mocks):
    committed = yaml.safe_load(COMMITTED_ROUTES.read_text())
    ours = yaml.safe_load(mocks.route_table())
    timings = {"defaults.timeout", "defaults.deadline", "defaults.breaker", "defaults.retry",
               # the committed services set their own breaker, and the nearest setting wins
               "services.fx.breaker", "services.flights.breaker",
               "services.fx.cache.ttl", "services.fx.routes.0.cache.ttl"}
    assert changed_paths(ours, committed) == URLS | LISTENERS | timings
    config = parse_config(mocks.route_table(), "demo.yaml", mocks.env)
    for upstream in config.upstreams():
        assert (upstream.url.host, upstream.url.port) == ("127.0.0.1", mocks[upstream.name].port)
        assert (upstream.timeout, upstream.breaker.fail_threshold, upstream.retry.retries) == (1.0, 3, 1)
    fx, flights = config.services["fx"], config.services["flights"]
    assert fx.cache.ttl == 2.0 and {r.name: r.cache.ttl for r in fx.routes}["latest"] == 2.0
    assert {r.name: r.cache.ttl for r in flights.routes} == {"schedules": 3600.0, "international schedules": 3600.0,
                                                              "status": 300.0, "international status": 300.0}
    assert config.server.listen == ("127.0.0.1", 0) and config.server.metrics_listen == ("127.0.0.1", 0)


async def test_an_override_replaces_a_demo_timing_and_none_keeps_the_committed_value(mocks):
    config = parse_config(mocks.route_table(ttl={"fx": "7s"}, breaker=None), "demo.yaml", mocks.env)
    assert config.services["fx"].cache.ttl == 7.0
    assert [u.breaker.fail_threshold for u in config.upstreams()] == [8, 8, 5, 5]  # CRITICAL, STANDARD
    with pytest.raises(ValueError, match="'nope'.* has no such service"):
        mocks.route_table(ttl={"nope": "1s"})


async def test_write_routes_writes_a_file_the_proxy_loads(mocks, tmp_path):
    path = mocks.write_routes(tmp_path / "routes.yaml", ttl={"fx": "5s"})
    config = load_config(path, env=mocks.env)
    assert config.services["fx"].cache.ttl == 5.0
    assert path.read_text().startswith(f"# {COMMITTED_ROUTES} as committed")


async def test_the_mocks_env_gives_the_flights_vendors_their_service_key_in_both_forms(mocks):
    def service_keys(env: dict[str, str]) -> dict[str, str]:
        config = parse_config(mocks.committed_route_table(), "routes.yaml", env)
        return {u.name: dict(u.query)["serviceKey"].text for u in config.services["flights"].upstreams}

    assert mocks.env == {"KAC_API_KEY": "ZGVtby1rZXk%2BZm9yL3RoZS9tb2Nrcw%3D%3D", "ODCLOUD_API_KEY": KEY}
    assert service_keys(mocks.env) == {"flights_kac": KEY, "flights_odcloud": KEY}  # the encoded one decoded once
    assert service_keys({}) == {"flights_kac": "", "flights_odcloud": ""}


async def test_a_routes_file_whose_vendors_the_mocks_do_not_imitate_is_refused(mocks, tmp_path):
    text = COMMITTED_ROUTES.read_text()
    moved = tmp_path / "moved.yaml"
    moved.write_text(text.replace("https://api.frankfurter.app", "https://api.exchangerate.host"))
    with pytest.raises(ValueError, match="'fx_secondary' points at https://api.exchangerate.host"):
        mocks.committed_route_table(moved)
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(text.replace("name: flights_odcloud", "name: flights_other"))
    with pytest.raises(ValueError, match="'flights_other' has no mock provider"):
        mocks.committed_route_table(renamed)


async def test_route_table_needs_started_mocks():
    with pytest.raises(RuntimeError, match="start the mock providers"):
        MockProviders().route_table()


async def test_the_proxy_reaches_every_mock_through_the_committed_table(mocks, proxy_factory):
    proxy = await proxy_factory(mocks.route_table(), env=mocks.env)
    async with await proxy.get("/fx/latest/KRW") as response:
        assert (response.status, response.headers["X-Upstream"]) == (200, "fx_primary")
        body = await response.json()
    assert (body["base"], body["source"]) == ("KRW", "fx_primary")  # normalised by the transform
    assert mocks.fx_primary.seen[-1].path == "/v6/latest/KRW"
    await mocks.fx_primary.go_down()
    async with await proxy.get("/fx/latest/JPY") as response:
        assert (response.status, response.headers["X-Upstream"]) == (200, "fx_secondary")
        assert set(await response.json()) == {"base", "rates", "updated", "source"}
    assert mocks.fx_secondary.seen[-1].query == {"from": "JPY"}  # the empty optional key is not sent
    async with await proxy.get("/flights/status/KE1203") as response:
        assert (response.status, response.headers["X-Upstream"]) == (200, "flights_kac")
        assert [f["flight"] for f in (await response.json())["flights"]] == ["KE1203"]
    assert mocks.flights_kac.seen[-1].path == KAC_STATUS
    assert mocks.flights_kac.seen[-1].query == {**STATUS, "schFln": "KE1203", "pageNo": "1", "numOfRows": "10"}
    mocks.flights_kac.fail(503)
    async with await proxy.get("/flights/schedules/PUS") as response:
        assert (response.status, response.headers["X-Upstream"]) == (200, "flights_odcloud")
        body = await response.json()
    assert [f["flight"] for f in body["flights"]] == ["BX8805"] and body["source"] == "flights_odcloud"
    assert mocks.flights_odcloud.seen[-1].path == ODCLOUD_DOMESTIC
    assert mocks.flights_odcloud.seen[-1].query == {"serviceKey": KEY, "출발공항": "PUS", "page": "1", "perPage": "100"}


async def test_without_the_service_keys_the_flights_vendors_refuse_and_rest(mocks, proxy_factory):
    proxy = await proxy_factory(mocks.route_table(retry="NONE"), env={})
    async with await proxy.get("/flights/schedules/GMP") as response:
        assert response.status == 502
        attempts = (await response.json())["attempts"]
    assert [(a["upstream"], a["outcome"], a["detail"]) for a in attempts] == [
        ("flights_kac", "key_refused", "the key was refused: result code 30 (SERVICE_KEY_IS_NOT_REGISTERED_ERROR)"),
        ("flights_odcloud", "key_refused", "the key was refused: result code -401 (유효하지 않은 인증키 입니다.)")]
    assert "serviceKey" not in mocks.flights_kac.seen[-1].query
    async with await proxy.get("/flights/schedules/CJU") as response:
        assert response.status == 503  # both rest: nothing is sent until an operator fixes the key
    assert mocks.flights_kac.calls == 1 and mocks.flights_odcloud.calls == 1
