"""Mock providers for the offline demo and the tests: real HTTP servers on 127.0.0.1.

Each answers in the shape of a vendor of the committed routes.yaml (the flights vendors also
with their error envelopes and result codes) and can be told to go down (connection refused)
and come back on the same port, answer 5xx, hang, or answer 429 with Retry-After; each counts
the calls it receives. `MockProviders` runs all of them and writes a route table for the proxy
that points at them.
"""

from proxy.demo.mocks.base import MAX_HANG, Fault, MockServer, SeenRequest
from proxy.demo.mocks.flights import (
                      KAC_DOMESTIC_SCHEDULES,
                      KAC_INTERNATIONAL_SCHEDULES,
                      KAC_STATUS,
                      ODCLOUD_DOMESTIC,
                      ODCLOUD_INTERNATIONAL,
                      Flight,
                      FlightBoard,
                      KacMock,
                      OdcloudMock,
)
from proxy.demo.mocks.fx import ExchangeRateApiMock, FrankfurterMock, RateTable
from proxy.demo.mocks.providers import DEMO_SERVICE_KEY, MockProviders

__all__ = [
    "DEMO_SERVICE_KEY", "KAC_DOMESTIC_SCHEDULES", "KAC_INTERNATIONAL_SCHEDULES", "KAC_STATUS", "MAX_HANG",
    "ODCLOUD_DOMESTIC", "ODCLOUD_INTERNATIONAL", "ExchangeRateApiMock", "Fault", "Flight", "FlightBoard",
    "FrankfurterMock", "KacMock", "MockProviders", "MockServer", "OdcloudMock", "RateTable", "SeenRequest",
]
