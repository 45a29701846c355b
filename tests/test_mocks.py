"""The bundled mock providers: vendor shapes, fault switches, call counts, and the route table they write."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from proxy.config import load_config, parse_config
from proxy.mocks import (KAC_SCHEDULES, KAC_STATUS, MAX_HANG, ODCLOUD_ARRIVALS, ExchangeRateApiMock, FlightsMock,
                         FrankfurterMock, MockProviders)

REPO = Path(__file__).resolve().parent.parent
KEY = "demo-service-key"


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
    async with client.get(mocks.flights_kac.url + KAC_STATUS,
                          params={"serviceKey": KEY, "_type": "json", "schFlightNum": "OZ8915"}) as response:
        assert response.status == 200
        document = await response.json()
    assert document["response"]["header"] == {"resultCode": "00", "resultMsg": "NORMAL SERVICE."}
    body = document["response"]["body"]
    assert body["pageNo"] == 1 and body["totalCount"] == 1 and body["numOfRows"] == 10
    (item,) = body["items"]["item"]
    assert item["airFln"] == "OZ8915"
    assert (item["rmkEng"], item["rmkKor"], item["etd"]) == ("DELAYED", "지연", "0840")


async def test_kac_schedules_filter_by_airport(mocks, client):
    async with client.get(mocks.flights_kac.url + KAC_SCHEDULES,
                          params={"serviceKey": KEY, "_type": "json", "schDeptCityCode": "PUS"}) as response:
        body = (await response.json())["response"]["body"]
    numbers = [item["domesticNum"] for item in body["items"]["item"]]
    assert numbers == ["KE1107", "BX8805"]  # GMP->PUS and PUS->CJU
    assert body["totalCount"] == 2


async def test_odcloud_paths_list_items_directly(mocks, client):
    async with client.get(mocks.flights_odcloud.url + ODCLOUD_ARRIVALS,
                          params={"serviceKey": KEY, "type": "json", "flight_id": "KE1203"}) as response:
        body = (await response.json())["response"]["body"]
    assert [item["flightId"] for item in body["items"]] == ["KE1203"]


async def test_flights_mock_answers_xml_without_type_json(mocks, client):
    status, headers, text = await get(client, f"{mocks.flights_kac.url}{KAC_STATUS}?serviceKey={KEY}")
    assert status == 200 and headers["Content-Type"].startswith("text/xml")
    assert "<resultCode>00</resultCode>" in text and "<airFln>KE1203</airFln>" in text


@pytest.mark.parametrize("query", ["_type=json", "_type=json&serviceKey=wrong-key"])
async def test_flights_mock_answers_a_missing_or_wrong_key_with_the_data_go_kr_error(mocks, client, query):
    status, _, text = await get(client, f"{mocks.flights_kac.url}{KAC_STATUS}?{query}")
    assert status == FlightsMock.KEY_ERROR_STATUS
    assert "<OpenAPI_ServiceResponse>" in text
    assert "<returnAuthMsg>SERVICE_KEY_IS_NOT_REGISTERED_ERROR</returnAuthMsg>" in text
    assert "<returnReasonCode>30</returnReasonCode>" in text


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
    await get(client, f"{mocks.flights_kac.url}{KAC_STATUS}?serviceKey={KEY}&_type=json")
    await get(client, f"{mocks.flights_kac.url}{KAC_STATUS}?serviceKey={KEY}&_type=json")
    await get(client, f"{mocks.flights_kac.url}{KAC_SCHEDULES}?serviceKey={KEY}&_type=json")
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

async def test_route_table_has_the_committed_services_and_upstreams_pointed_at_the_mocks(mocks):
    committed = load_config(REPO / "routes.yaml", env={})
    config = parse_config(mocks.route_table(), "demo.yaml", {})
    assert list(config.services) == list(committed.services)
    for name, service in config.services.items():
        theirs = committed.services[name]
        assert service.prefix == theirs.prefix
        assert [u.name for u in service.upstreams] == [u.name for u in theirs.upstreams]
        their_routes = {r.pattern.text: r for r in theirs.routes}
        for route in service.routes:  # every demo route is a committed one, sent to the same vendor paths
            assert route.pattern.text in their_routes
            assert {u: t.text for u, t in route.paths.items()} == \
                {u: t.text for u, t in their_routes[route.pattern.text].paths.items()}
        for upstream, their_upstream in zip(service.upstreams, theirs.upstreams):
            assert upstream.path == their_upstream.path
            # the committed query parameters, minus optional keys that are empty without the environment
            assert {n for n, _ in upstream.query} >= {n for n, t in their_upstream.query if t.text}
    for upstream in config.upstreams():
        assert (upstream.url.host, upstream.url.port) == ("127.0.0.1", mocks[upstream.name].port)
        assert upstream.breaker.fail_threshold == 3  # FAST
    assert config.server.listen == ("127.0.0.1", 0)


async def test_route_table_needs_started_mocks():
    with pytest.raises(RuntimeError, match="start the mock providers"):
        MockProviders().route_table()


async def test_the_proxy_reaches_every_mock_through_the_route_table(mocks, proxy_factory):
    proxy = await proxy_factory(mocks.route_table())
    async with await proxy.get("/fx/latest/KRW") as response:
        assert (response.status, response.headers["X-Upstream"]) == (200, "fx_primary")
        assert (await response.json())["base_code"] == "KRW"
    await mocks.fx_primary.go_down()
    async with await proxy.get("/fx/latest/JPY") as response:
        assert (response.status, response.headers["X-Upstream"]) == (200, "fx_secondary")
    assert mocks.fx_secondary.seen[-1].query == {"from": "JPY"}
    async with await proxy.get("/flights/status/KE1203") as response:
        assert (response.status, response.headers["X-Upstream"]) == (200, "flights_kac")
        assert (await response.json())["response"]["body"]["totalCount"] == 1
    assert mocks.flights_kac.seen[-1].path == KAC_STATUS
    assert mocks.flights_kac.seen[-1].query == {"serviceKey": KEY, "_type": "json", "schFlightNum": "KE1203"}
    mocks.flights_kac.fail(503)
    async with await proxy.get("/flights/schedules/PUS") as response:
        assert (response.status, response.headers["X-Upstream"]) == (200, "flights_odcloud")
        assert [i["flightId"] for i in (await response.json())["response"]["body"]["items"]] == ["KE1107", "BX8805"]
    assert mocks.flights_odcloud.seen[-1].query == {"serviceKey": KEY, "type": "json", "airport_code": "PUS"}
