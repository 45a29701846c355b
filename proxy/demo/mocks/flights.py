"""Flights providers shaped like the two Korean public-data APIs of the committed routes.yaml.

`KacMock` stands in for Korea Airports Corporation's open API (`flights_kac`,
http://openapi.airport.co.kr):

    /service/rest/FlightScheduleList/getDflightScheduleList   domestic schedules
    /service/rest/FlightScheduleList/getIflightScheduleList   international schedules
    /service/rest/FlightStatusList/getFlightStatusList        today's live status

It answers `{"response": {"header": {"resultCode", "resultMsg"}, "body": {"items": {"item": ...},
"numOfRows", "pageNo", "totalCount"}}}`, JSON with `_type=json` and XML otherwise. `item` is one
object when one flight matches and a list when more do; a schedule list that matches nothing has
`"items": ""`, a status lookup that matches nothing answers resultCode `03` NODATA_ERROR. A status
lookup without `schStTime`, `schEdTime`, `schLineType` or `schIOType` answers `11`, a malformed one
`10`. Key errors come from the portal's gateway, before the API: an XML `OpenAPI_ServiceResponse`
with HTTP 200, whatever `_type` asked.

`OdcloudMock` stands in for ODCloud (`flights_odcloud`, https://api.odcloud.kr/api): KAC's domestic
(15043890) and international (15003087) timetables as datasets, filtered by Korean parameter names
(`출발공항`, `도착공항`, `항공편명` or `운항편명`), answering `{"page", "perPage", "totalCount",
"currentCount", "matchCount", "data": [...]}` with Korean item keys. Its errors are
`{"code": -4, "msg": "..."}` with a 4xx.

Both read one `FlightBoard` and take the key as `serviceKey`, compared after the one percent-decoding
every HTTP server does: a key that was encoded twice on the way is not registered, as at the real
portal. Either can be told to answer a result code (`kac.answer_code("22", key=...)`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any
from xml.sax.saxutils import escape

from aiohttp import web

from proxy.demo.mocks.base import MockServer

KST = timezone(timedelta(hours=9))

KAC_DOMESTIC_SCHEDULES = "/service/rest/FlightScheduleList/getDflightScheduleList"
KAC_INTERNATIONAL_SCHEDULES = "/service/rest/FlightScheduleList/getIflightScheduleList"
KAC_STATUS = "/service/rest/FlightStatusList/getFlightStatusList"
ODCLOUD_DOMESTIC = "/api/15043890/v1/uddi:57dcf102-1447-49e9-bd2b-cfb32e869d5c"
ODCLOUD_INTERNATIONAL = "/api/15003087/v1/uddi:5cb8f7fa-d1e0-4d0f-a9f9-5b7aab9569d5"

#: data.go.kr result codes and the messages its APIs send with them.
PORTAL_CODES: dict[str, str] = {
    "00": "NORMAL SERVICE.", "01": "APPLICATION_ERROR", "02": "DB_ERROR", "03": "NODATA_ERROR",
    "04": "HTTP_ERROR", "05": "SERVICETIMEOUT_ERROR", "10": "INVALID_REQUEST_PARAMETER_ERROR",
    "11": "NO_MANDATORY_REQUEST_PARAMETERS_ERROR", "12": "NO_OPENAPI_SERVICE_ERROR",
    "20": "SERVICE_ACCESS_DENIED_ERROR", "21": "TEMPORARILY_DISABLE_THE_SERVICEKEY_ERROR",
    "22": "LIMITED_NUMBER_OF_SERVICE_REQUESTS_EXCEEDS_ERROR", "30": "SERVICE_KEY_IS_NOT_REGISTERED_ERROR",
    "31": "DEADLINE_HAS_EXPIRED_ERROR", "32": "UNREGISTERED_IP_ERROR", "33": "UNSIGNED_CALL_ERROR",
    "99": "UNKNOWN_ERROR",
}
#: The codes the portal's gateway answers itself (about the key), in its XML envelope.
GATEWAY_CODES = frozenset({"20", "21", "22", "30", "31", "32", "33"})

#: ODCloud's error codes: message and HTTP status.
ODCLOUD_CODES: dict[int, tuple[str, int]] = {
    -1: ("시스템 내부 오류가 발생하였습니다.", 400), -2: ("요청하신 파라미터가 적합하지 않습니다.", 400),
    -3: ("등록되지 않은 서비스 입니다.", 400), -4: ("등록되지 않은 인증키 입니다.", 400),
    -9: ("종료된 서비스 입니다.", 400), -10: ("트래픽 허용 횟수를 초과하였습니다.", 400),
    -401: ("유효하지 않은 인증키 입니다.", 401),
}

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
    "TAE": ("대구", "DAEGU"), "CJJ": ("청주", "CHEONGJU"), "NRT": ("나리타", "NARITA"), "KIX": ("간사이", "KANSAI"),
    "HND": ("하네다", "HANEDA"),
}

AIRLINES: dict[str, tuple[str, str]] = {
    "KE": ("대한항공", "KOREAN AIR"), "OZ": ("아시아나항공", "ASIANA AIRLINES"), "7C": ("제주항공", "JEJU AIR"),
    "LJ": ("진에어", "JIN AIR"), "TW": ("티웨이항공", "TWAY AIR"), "BX": ("에어부산", "AIR BUSAN"),
}

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass(frozen=True, slots=True)
class Flight:
    """One departure. Times are HHMM in Korean time; `line` is D (domestic) or I (international)."""

    number: str
    origin: str
    destination: str
    scheduled: str
    status: str = "SCHEDULED"
    estimated: str | None = None
    gate: str = ""
    line: str = "D"

    @property
    def airline(self) -> str:
        return self.number[:2]

    @property
    def arrives(self) -> str:
        return _plus_minutes(self.scheduled, 65 if self.line == "D" else 150)


DEFAULT_FLIGHTS: tuple[Flight, ...] = (
    Flight("KE1203", "GMP", "CJU", "0730", "DEPARTED", "0734", "3"),
    Flight("OZ8915", "GMP", "CJU", "0800", "BOARDING", "0800", "11"),
    Flight("7C103", "GMP", "CJU", "0825", gate="7"),
    Flight("LJ305", "GMP", "CJU", "0850", gate="5"),
    Flight("KE1107", "GMP", "PUS", "0900", gate="2"),
    Flight("BX8805", "PUS", "CJU", "0740", "DEPARTED", "0745", "4"),
    Flight("TW721", "CJU", "GMP", "0815", gate="12"),
    Flight("KE703", "ICN", "NRT", "0900", gate="251", line="I"),
    Flight("OZ102", "ICN", "NRT", "0930", gate="22", line="I"),
    Flight("7C1381", "GMP", "KIX", "1010", gate="36", line="I"),
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

    def select(self, line: str, *, origin: str | None = None, destination: str | None = None,
               number: str | None = None) -> list[Flight]:
        return [f for f in self if f.line == line and (not origin or f.origin == origin.upper())
                and (not destination or f.destination == destination.upper())
                and (not number or f.number == number.upper())]


@dataclass(slots=True)
class ScriptedCode:
    """A result code to answer instead of data: to `times` more calls (None: until heal()), with `key` or any."""

    code: str
    times: int | None = None
    key: str | None = None


class PortalMock(MockServer):
    """What both portal mocks share: the flight board, registered keys and scripted result codes."""

    def __init__(self, name: str, board: FlightBoard | None = None, *, service_keys: tuple[str, ...] = (),
                 kind: str | None = None, **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        if kind is not None:
            self.kind = kind
        self.board = board or FlightBoard()
        self.service_keys = set(service_keys)
        self._codes: list[ScriptedCode] = []

    def answer_code(self, code: str | int, *, times: int | None = None, key: str | None = None) -> None:
        """Answer result code `code` (as the vendor sends it) instead of data, to the next `times`
        calls or until `heal()`; with `key`, only to calls made with that key."""
        self._codes.append(ScriptedCode(str(code), times, key))

    def heal(self) -> None:
        super().heal()
        self._codes.clear()

    def _take_code(self, key: str) -> str | None:
        for scripted in self._codes:
            if scripted.key is None or scripted.key == key:
                if scripted.times is not None:
                    scripted.times -= 1
                    if scripted.times <= 0:
                        self._codes.remove(scripted)
                return scripted.code
        return None


class KacMock(PortalMock):
    """Answers like openapi.airport.co.kr's flight schedule and status APIs."""

    kind = "Korea Airports Corporation-like flights provider"

    def __init__(self, name: str = "flights_kac", board: FlightBoard | None = None, **kwargs: Any) -> None:
        super().__init__(name, board, **kwargs)

    async def answer(self, request: web.BaseRequest) -> web.StreamResponse:
        query = request.query
        select = {KAC_DOMESTIC_SCHEDULES: self._domestic, KAC_INTERNATIONAL_SCHEDULES: self._international,
                  KAC_STATUS: self._status}.get(request.path.rstrip("/"))
        if select is None:
            return _gateway_error("12", status=404)
        key = query.get("serviceKey") or query.get("ServiceKey") or ""
        if key not in self.service_keys:  # missing or wrong: the gateway answers both the same way
            return _gateway_error("30")
        json_asked = query.get("_type") == "json"
        code = self._take_code(key)
        if code is None and request.path.rstrip("/") == KAC_STATUS:
            code = _status_problem(query)
        if code is not None:
            return _gateway_error(code) if code in GATEWAY_CODES else _portal_answer(code, None, json_asked)
        items = select(query)
        if not items and request.path.rstrip("/") == KAC_STATUS:
            return _portal_answer("03", None, json_asked)
        rows, page = _whole(query.get("numOfRows"), 10), _whole(query.get("pageNo"), 1)
        shown = items[(page - 1) * rows: page * rows]
        body = {"items": {"item": shown[0] if len(shown) == 1 else shown} if shown else "",
                "numOfRows": rows, "pageNo": page, "totalCount": len(items)}
        return _portal_answer("00", body, json_asked)

    def _domestic(self, query: Any) -> list[dict[str, Any]]:
        flights = self.board.select("D", origin=query.get("schDeptCityCode"), destination=query.get("schArrvCityCode"),
                                    number=query.get("schFlightNum"))
        return [self._domestic_item(flight) for flight in flights]

    def _international(self, query: Any) -> list[dict[str, Any]]:
        flights = self.board.select("I", origin=query.get("schDeptCityCode"), destination=query.get("schArrvCityCode"),
                                    number=query.get("schFlightNum"))
        return [self._international_item(flight) for flight in flights]

    def _status(self, query: Any) -> list[dict[str, Any]]:
        departures = query["schIOType"] == "O"
        airport = query.get("schAirCode")
        flights = self.board.select(query["schLineType"], origin=airport if departures else None,
                                    destination=None if departures else airport, number=query.get("schFln"))
        start, end = query["schStTime"], query["schEdTime"]
        return [self._status_item(f, departures) for f in flights if start <= f.scheduled <= end]

    def _season(self) -> tuple[str, str]:
        day = self.board.day
        return f"{day[:4]}-{day[4:6]}-{day[6:]}", f"{day[:4]}-12-31"

    def _domestic_item(self, flight: Flight) -> dict[str, Any]:
        airline_ko, airline_en = AIRLINES.get(flight.airline, (flight.airline, flight.airline))
        first, last = self._season()
        return {
            "airlineKorean": airline_ko, "airlineEnglish": airline_en,
            "startcity": AIRPORTS.get(flight.origin, (flight.origin,))[0],
            "arrivalcity": AIRPORTS.get(flight.destination, (flight.destination,))[0],
            "domesticNum": flight.number, "domesticStartTime": flight.scheduled,
            "domesticArrivalTime": flight.arrives, "domesticStdate": first, "domesticEddate": last,
            **{f"domestic{day}": "Y" for day in _WEEKDAYS},
        }

    def _international_item(self, flight: Flight) -> dict[str, Any]:
        airline_ko, _ = AIRLINES.get(flight.airline, (flight.airline, flight.airline))
        first, last = self._season()
        return {
            "airlineKorean": airline_ko, "airport": AIRPORTS.get(flight.origin, (flight.origin,))[0],
            "city": AIRPORTS.get(flight.destination, (flight.destination,))[0], "internationalIoType": "OUT",
            "internationalNum": flight.number, "internationalTime": flight.scheduled,
            "internationalStdate": first, "internationalEddate": last,
            **{f"international{day}": "Y" for day in _WEEKDAYS},
        }

    def _status_item(self, flight: Flight, departures: bool) -> dict[str, Any]:
        remark_ko, remark_en = REMARKS[flight.status]
        airline_ko, airline_en = AIRLINES.get(flight.airline, (flight.airline, flight.airline))
        origin = AIRPORTS.get(flight.origin, (flight.origin, flight.origin))
        destination = AIRPORTS.get(flight.destination, (flight.destination, flight.destination))
        return {
            "airFln": flight.number, "airlineKorean": airline_ko, "airlineEnglish": airline_en,
            "airport": flight.origin if departures else flight.destination,
            "city": flight.destination if departures else flight.origin,
            "boardingKor": origin[0], "boardingEng": origin[1], "arrivedKor": destination[0], "arrivedEng": destination[1],
            "std": flight.scheduled, "etd": flight.estimated or flight.scheduled, "gate": flight.gate,
            "io": "O" if departures else "I", "line": "국내" if flight.line == "D" else "국제",
            "rmkKor": remark_ko, "rmkEng": remark_en,
        }


class OdcloudMock(PortalMock):
    """Answers like api.odcloud.kr's flight timetable datasets."""

    kind = "ODCloud-like flights provider"
    base_path = "/api"

    def __init__(self, name: str = "flights_odcloud", board: FlightBoard | None = None, **kwargs: Any) -> None:
        super().__init__(name, board, **kwargs)

    async def answer(self, request: web.BaseRequest) -> web.StreamResponse:
        line = {ODCLOUD_DOMESTIC: "D", ODCLOUD_INTERNATIONAL: "I"}.get(request.path.rstrip("/"))
        if line is None:
            return _odcloud_error(-3)
        query = request.query
        key = query.get("serviceKey") or request.headers.get("Authorization", "").removeprefix("Infuser ")
        if not key:
            return _odcloud_error(-401)
        if key not in self.service_keys:
            return _odcloud_error(-4)
        code = self._take_code(key)
        if code is not None:
            return _odcloud_error(int(code))
        page, per_page = query.get("page", "1"), query.get("perPage", "10")
        if not page.isdigit() or not per_page.isdigit() or int(page) < 1 or int(per_page) < 1:
            return _odcloud_error(-2)
        every = self.board.select(line)
        matched = self.board.select(line, origin=query.get("출발공항"), destination=query.get("도착공항"),
                                    number=query.get("항공편명") or query.get("운항편명"))
        start = (int(page) - 1) * int(per_page)
        shown = [self._item(flight) for flight in matched[start:start + int(per_page)]]
        return web.json_response({"page": int(page), "perPage": int(per_page), "totalCount": len(every),
                                  "currentCount": len(shown), "matchCount": len(matched), "data": shown}, dumps=_dumps)

    def _item(self, flight: Flight) -> dict[str, Any]:
        airline = AIRLINES.get(flight.airline, (flight.airline,))[0]
        day = self.board.day
        common = {"항공사": airline, "출발공항": flight.origin, "도착공항": flight.destination, "운항요일": "월화수목금토일",
                  "시작일자": f"{day[:4]}-{day[4:6]}-{day[6:]}", "종료일자": f"{day[:4]}-12-31"}
        if flight.line == "D":  # the two datasets name their columns differently
            return {**common, "항공편명": flight.number, "출발시각": flight.scheduled, "도착시각": flight.arrives}
        return {**common, "운항편명": flight.number, "출발시간": _colon(flight.scheduled),
                "도착시간": _colon(flight.arrives), "국내_국제": "국제"}


def _status_problem(query: Any) -> str | None:
    """The code KAC's status API answers a request it cannot read: 11 missing, 10 malformed."""
    needed = ("schStTime", "schEdTime", "schLineType", "schIOType")
    if any(not query.get(name) for name in needed):
        return "11"
    times_ok = all(_hhmm(query[name]) for name in ("schStTime", "schEdTime"))
    if not times_ok or query["schLineType"] not in ("D", "I") or query["schIOType"] not in ("O", "I"):
        return "10"
    return None


def _hhmm(text: str) -> bool:
    return len(text) == 4 and text.isdigit() and int(text[:2]) <= 24 and int(text[2:]) < 60


def _portal_answer(code: str, body: dict[str, Any] | None, json_asked: bool) -> web.Response:
    document: dict[str, Any] = {"response": {"header": {"resultCode": code, "resultMsg": PORTAL_CODES[code]}}}
    if body is not None:
        document["response"]["body"] = body
    if json_asked:
        return web.json_response(document, dumps=_dumps)
    return web.Response(text=_xml(document), content_type="text/xml", charset="utf-8")


def _gateway_error(code: str, *, status: int = 200) -> web.Response:
    """The portal gateway's own answer: XML whatever was asked, HTTP 200 for key problems."""
    text = ("<OpenAPI_ServiceResponse><cmmMsgHeader>"
            f"<errMsg>SERVICE ERROR</errMsg><returnAuthMsg>{PORTAL_CODES[code]}</returnAuthMsg>"
            f"<returnReasonCode>{code}</returnReasonCode>"
            "</cmmMsgHeader></OpenAPI_ServiceResponse>")
    return web.Response(status=status, text=text, content_type="text/xml", charset="utf-8")


def _odcloud_error(code: int) -> web.Response:
    message, status = ODCLOUD_CODES.get(code, ("알 수 없는 오류", 400))
    return web.json_response({"code": code, "msg": message}, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # the vendors send Korean text as UTF-8, not \u escapes


def _whole(text: str | None, default: int) -> int:
    return int(text) if text and text.isdigit() and int(text) > 0 else default


def _plus_minutes(hhmm: str, minutes: int) -> str:
    total = (int(hhmm[:2]) * 60 + int(hhmm[2:]) + minutes) % (24 * 60)
    return f"{total // 60:02d}{total % 60:02d}"


def _colon(hhmm: str) -> str:
    return f"{hhmm[:2]}:{hhmm[2:]}"


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
