"""Mock providers for the offline demo and the tests: real HTTP servers on 127.0.0.1.

Each answers in the shape of a vendor of the committed routes.yaml and can be told to go
down (connection refused) and come back on the same port, answer 5xx, hang, or answer 429
with Retry-After; each counts the calls it receives. `MockProviders` runs all of them and
writes a route table for the proxy that points at them.
"""

from .base import MAX_HANG, Fault, MockServer, SeenRequest
from .flights import (KAC_SCHEDULES, KAC_STATUS, ODCLOUD_ARRIVALS, ODCLOUD_DEPARTURES, Flight, FlightBoard,
                      FlightsMock)
from .fx import ExchangeRateApiMock, FrankfurterMock, RateTable
from .providers import DEMO_SERVICE_KEY, MockProviders

__all__ = [
    "DEMO_SERVICE_KEY", "KAC_SCHEDULES", "KAC_STATUS", "MAX_HANG", "ODCLOUD_ARRIVALS", "ODCLOUD_DEPARTURES",
    "ExchangeRateApiMock", "Fault", "Flight", "FlightBoard", "FlightsMock", "FrankfurterMock", "MockProviders",
    "MockServer", "RateTable", "SeenRequest",
]
