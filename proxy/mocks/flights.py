"""A flights provider shaped like the Korean public-data APIs in the committed routes.yaml.

One `FlightsMock` serves both path families, so the same class stands in for
`flights_kac` (Korea Airports Corporation, `openapi.airport.co.kr`) and for
`flights_odcloud` (data.go.kr, Incheon Airport):

    /service/rest/FlightScheduleList/getDflightScheduleList        KAC domestic schedules
    /service/rest/FlightStatusList/getFlightStatusList             KAC live status
    /B551177/StatusOfPassengerFlightsDeOdp/getPassengerDeparturesDeOdp   data.go.kr departures
    /B551177/StatusOfPassengerFlightsOdp/getPassengerArrivalsOdp         data.go.kr arrivals

Answers use the data.go.kr envelope
`{"response": {"header": {"resultCode": "00", "resultMsg": "NORMAL SERVICE."}, "body": {...}}}`,
JSON when `_type=json` (KAC) or `type=json` (data.go.kr), XML otherwise. A missing or wrong
`serviceKey` gets the data.go.kr gateway's `OpenAPI_ServiceResponse` error, which that gateway
sends with HTTP 200 (see `KEY_ERROR_STATUS`).

Filters this mock understands (any of the names, on any path): airport `schDeptCityCode`,
`schAirCode`, `airport_code`, `airport`; flight `schFlightNum`, `airFln`, `flight_id`.
The flights come from a `FlightBoard` that the demo or a test changes
(`board.set_status("KE1203", "DELAYED", estimated="0815")`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any
from xml.sax.saxutils import escape

from aiohttp import web

from .base import MockServer

KST = timezone(timedelta(hours=9))

KAC_SCHEDULES = "/service/rest/FlightScheduleList/getDflightScheduleList"
KAC_STATUS = "/service/rest/FlightStatusList/getFlightStatusList"
ODCLOUD_DEPARTURES = "/B551177/StatusOfPassengerFlightsDeOdp/getPassengerDeparturesDeOdp"
ODCLOUD_ARRIVALS = "/B551177/StatusOfPassengerFlightsOdp/getPassengerArrivalsOdp"

# Status -> (Korean remark, English remark) as the airport boards show them.
REMARKS: dict[str, tuple[str, str]] = {
    "SCHEDULED": ("", ""),
    "BOARDING": ("탑승중", "BOARDING"),
    "DEPARTED": ("출발", "DEPARTED"),
    "DELAYED": ("지연", "DELAYED"),
    "CANCELLED": ("결항", "CANCELLED"),
    "ARRIVED": ("도착", "ARRIVED"),
}

AIRPORTS: dict[str, tuple[str, str]] = {
    "GMP": ("김포", "GIMPO"), "CJU": ("제주", "JEJU"), "PUS": ("김해", "GIMHAE"), "ICN": ("인천", "INCHEON"),
    "TAE": ("대구", "DAEGU"), "CJJ": ("청주", "CHEONGJU"),
}

AIRLINES: dict[str, tuple[str, str]] = {
    "KE": ("대한항공", "KOREAN AIR"), "OZ": ("아시아나항공", "ASIANA AIRLINES"), "7C": ("제주항공", "JEJU AIR"),
    "LJ": ("진에어", "JIN AIR"), "TW": ("티웨이항공", "TWAY AIR"), "BX": ("에어부산", "AIR BUSAN"),
}


@dataclass(frozen=True, slots=True)
class Flight:
    """One domestic departure. Times are HHMM in Korean time."""

    number: str
    origin: str
    destination: str
    scheduled: str
    status: str = "SCHEDULED"
    estimated: str | None = None
    gate: str = ""

    @property
    def airline(self) -> str:
        return self.number[:2]


DEFAULT_FLIGHTS: tuple[Flight, ...] = (
    Flight("KE1203", "GMP", "CJU", "0730", "DEPARTED", "0734", "3"),
    Flight("OZ8915", "GMP", "CJU", "0800", "BOARDING", "0800", "11"),
    Flight("7C103", "GMP", "CJU", "0825", gate="7"),
    Flight("LJ305", "GMP", "CJU", "0850", gate="5"),
    Flight("KE1107", "GMP", "PUS", "0900", gate="2"),
    Flight("BX8805", "PUS", "CJU", "0740", "DEPARTED", "0745", "4"),
    Flight("TW721", "CJU", "GMP", "0815", gate="12"),
)


class FlightBoard:
    """The flights every mock instance reports; change it and both vendors see the change."""

    def __init__(self, flights: tuple[Flight, ...] = DEFAULT_FLIGHTS, *, day: str | None = None) -> None:
        self._flights = {flight.number: flight for flight in flights}
        self.day = day or datetime.now(KST).strftime("%Y%m%d")

    def __iter__(self) -> Any:
        return iter(self._flights.values())

    def get(self, number: str) -> Flight | None:
        return self._flights.get(number.upper())

    def add(self, flight: Flight) -> None:
        self._flights[flight.number] = flight

    def set_status(self, number: str, status: str, *, estimated: str | None = None) -> Flight:
        """Change a flight's status (SCHEDULED, BOARDING, DEPARTED, DELAYED, CANCELLED, ARRIVED)."""
        status = status.upper()
        if status not in REMARKS:
            raise ValueError(f"unknown flight status {status!r} (use {', '.join(REMARKS)})")
        flight = self._flights.get(number.upper())
        if flight is None:
            raise KeyError(f"no flight {number!r} on the board")
        changed = replace(flight, status=status, estimated=estimated or flight.estimated)
        self._flights[flight.number] = changed
        return changed

    def select(self, airport: str | None, flight: str | None) -> list[Flight]:
        found = list(self)
        if airport:
            found = [f for f in found if airport.upper() in (f.origin, f.destination)]
        if flight:
            found = [f for f in found if f.number == flight.upper()]
        return found


def _first(query: Any, *names: str) -> str | None:
    for name in names:
        value = query.get(name)
        if value:
            return value
    return None


class FlightsMock(MockServer):
    """Answers like openapi.airport.co.kr and apis.data.go.kr's flight APIs."""

    kind = "Korea Airports Corporation-like flights provider"
    #: data.go.kr answers a bad key with HTTP 200 and an XML error body.
    KEY_ERROR_STATUS = 200

    def __init__(self, name: str = "flights_kac", board: FlightBoard | None = None, *,
                 service_key: str = "demo-service-key", kind: str | None = None, **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        if kind is not None:
            self.kind = kind
        self.board = board or FlightBoard()
        self.service_key = service_key

    async def answer(self, request: web.BaseRequest) -> web.StreamResponse:
        renderers = {KAC_SCHEDULES: self._kac_schedule, KAC_STATUS: self._kac_status,
                     ODCLOUD_DEPARTURES: self._odcloud_item, ODCLOUD_ARRIVALS: self._odcloud_item}
        render = renderers.get(request.path.rstrip("/"))
        if render is None:
            return _key_error(404, "NO_OPENAPI_SERVICE_ERROR", "12")
        key = request.query.get("serviceKey") or request.query.get("ServiceKey")
        if key != self.service_key:  # missing or wrong: the gateway answers both the same way
            return _key_error(self.KEY_ERROR_STATUS, "SERVICE_KEY_IS_NOT_REGISTERED_ERROR", "30")
        query = request.query
        flights = self.board.select(_first(query, "schDeptCityCode", "schAirCode", "airport_code", "airport"),
                                    _first(query, "schFlightNum", "airFln", "flight_id"))
        rows = _whole(query.get("numOfRows"), 10)
        page = _whole(query.get("pageNo"), 1)
        shown = flights[(page - 1) * rows: page * rows]
        items = [render(flight) for flight in shown]
        odcloud = request.path.startswith("/B551177/")
        body: dict[str, Any] = {
            # data.go.kr's B551177 APIs put the list straight under `items`; KAC wraps it in `item`.
            "items": items if odcloud else ({"item": items} if items else ""),
            "numOfRows": rows, "pageNo": page, "totalCount": len(flights),
        }
        document = {"response": {"header": {"resultCode": "00", "resultMsg": "NORMAL SERVICE."}, "body": body}}
        wants_json = (query.get("type") if odcloud else query.get("_type")) == "json"
        if wants_json:
            return web.json_response(document, dumps=_dumps)
        return web.Response(text=_xml(document), content_type="text/xml", charset="utf-8")

    def _kac_schedule(self, flight: Flight) -> dict[str, Any]:
        day = self.board.day
        airline_ko, airline_en = AIRLINES.get(flight.airline, (flight.airline, flight.airline))
        return {
            "airlineKorean": airline_ko, "airlineEnglish": airline_en,
            "startcity": AIRPORTS.get(flight.origin, (flight.origin,))[0], "startcityCode": flight.origin,
            "arrivalcity": AIRPORTS.get(flight.destination, (flight.destination,))[0],
            "arrivalcityCode": flight.destination,
            "domesticNum": flight.number, "domesticStartTime": flight.scheduled,
            "domesticArrivalTime": _plus_minutes(flight.scheduled, 65),
            "domesticStdate": f"{day[:4]}-{day[4:6]}-{day[6:]}", "domesticEddate": f"{day[:4]}-12-31",
            "domesticMon": "Y", "domesticTue": "Y", "domesticWed": "Y", "domesticThu": "Y",
            "domesticFri": "Y", "domesticSat": "Y", "domesticSun": "Y",
        }

    def _kac_status(self, flight: Flight) -> dict[str, Any]:
        remark_ko, remark_en = REMARKS[flight.status]
        airline_ko, airline_en = AIRLINES.get(flight.airline, (flight.airline, flight.airline))
        origin = AIRPORTS.get(flight.origin, (flight.origin, flight.origin))
        destination = AIRPORTS.get(flight.destination, (flight.destination, flight.destination))
        return {
            "airFln": flight.number, "airlineKorean": airline_ko, "airlineEnglish": airline_en,
            "airport": flight.origin, "city": flight.destination,
            "boardingKor": origin[0], "boardingEng": origin[1], "arrivedKor": destination[0], "arrivedEng": destination[1],
            "std": flight.scheduled, "etd": flight.estimated or flight.scheduled, "gate": flight.gate,
            "io": "O", "line": "국내", "rmkKor": remark_ko, "rmkEng": remark_en,
        }

    def _odcloud_item(self, flight: Flight) -> dict[str, Any]:
        remark_ko, _ = REMARKS[flight.status]
        airline_ko, _ = AIRLINES.get(flight.airline, (flight.airline, flight.airline))
        day = self.board.day
        return {
            "airline": airline_ko, "flightId": flight.number,
            "scheduleDateTime": day + flight.scheduled, "estimatedDateTime": day + (flight.estimated or flight.scheduled),
            "airport": AIRPORTS.get(flight.destination, (flight.destination,))[0], "airportCode": flight.destination,
            "gatenumber": flight.gate, "remark": remark_ko, "codeshare": "Master",
        }


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # the vendors send Korean text as UTF-8, not \u escapes


def _whole(text: str | None, default: int) -> int:
    return int(text) if text and text.isdigit() and int(text) > 0 else default


def _plus_minutes(hhmm: str, minutes: int) -> str:
    total = (int(hhmm[:2]) * 60 + int(hhmm[2:]) + minutes) % (24 * 60)
    return f"{total // 60:02d}{total % 60:02d}"


def _key_error(status: int, auth_message: str, reason: str) -> web.Response:
    text = ("<OpenAPI_ServiceResponse><cmmMsgHeader>"
            f"<errMsg>SERVICE ERROR</errMsg><returnAuthMsg>{auth_message}</returnAuthMsg>"
            f"<returnReasonCode>{reason}</returnReasonCode>"
            "</cmmMsgHeader></OpenAPI_ServiceResponse>")
    return web.Response(status=status, text=text, content_type="text/xml", charset="utf-8")


def _xml(value: Any, tag: str | None = None) -> str:
    if tag is None:
        return '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>' + "".join(
            _xml(v, k) for k, v in value.items())
    if isinstance(value, dict):
        inner = "".join(_xml(v, k) for k, v in value.items())
    elif isinstance(value, list) and tag == "item":
        return "".join(_xml(v, tag) for v in value)
    elif isinstance(value, list):
        inner = "".join(_xml(v, "item") for v in value)
    else:
        inner = escape(str(value))
    return f"<{tag}>{inner}</{tag}>"
