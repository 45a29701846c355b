"""Exchange-rate vendors shaped like the ones in the committed routes.yaml.

- `ExchangeRateApiMock`: ExchangeRate-API's open endpoint, `GET /v6/latest/{base}`.
- `FrankfurterMock`: Frankfurter (ECB reference rates), `GET /latest?from={base}`.

Both read one `RateTable`, so a test or the demo changes a rate in one place.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

from aiohttp import web

from proxy.demo.mocks.base import MockServer

# Units of each currency per 1 USD: fixed numbers, so answers are the same on every run.
DEFAULT_PER_USD: dict[str, float] = {
    "USD": 1.0, "EUR": 0.9467, "KRW": 1396.5, "JPY": 150.12, "GBP": 0.7871, "CNY": 7.2435,
    "THB": 34.31, "SGD": 1.3412, "AUD": 1.5337, "HKD": 7.7812, "TWD": 32.51, "PHP": 58.73,
}


def _midnight_utc() -> datetime:
    return datetime.now(timezone.utc).replace(hour=0, minute=2, second=31, microsecond=0)


class RateTable:
    """Deterministic rates, kept as units per USD; cross rates are derived from them."""

    def __init__(self, per_usd: dict[str, float] | None = None, *, updated: datetime | None = None) -> None:
        self.per_usd = dict(DEFAULT_PER_USD if per_usd is None else per_usd)
        self.updated = updated or _midnight_utc()

    def knows(self, code: str) -> bool:
        return code.upper() in self.per_usd

    def set_rate(self, code: str, per_usd: float) -> None:
        """Set (or add) how many units of `code` one USD buys."""
        if per_usd <= 0:
            raise ValueError(f"a rate must be positive, got {per_usd}")
        self.per_usd[code.upper()] = per_usd

    def remove(self, code: str) -> None:
        self.per_usd.pop(code.upper(), None)

    def rates(self, base: str) -> dict[str, float]:
        """Units of every known currency per 1 `base` (the base itself included, at 1)."""
        base_per_usd = self.per_usd[base.upper()]
        return {code: round(value / base_per_usd, 6) for code, value in sorted(self.per_usd.items())}


class ExchangeRateApiMock(MockServer):
    """Answers like https://open.er-api.com/v6/latest/{base}."""

    kind = "ExchangeRate-API-like FX vendor"

    def __init__(self, rates: RateTable | None = None, name: str = "fx_primary", **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        self.rates = rates or RateTable()

    async def answer(self, request: web.BaseRequest) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        if len(parts) != 3 or parts[:2] != ["v6", "latest"]:
            return web.json_response({"result": "error", "error-type": "unknown-path"}, status=404)
        base = parts[2].upper()
        if not self.rates.knows(base):
            return web.json_response({"result": "error", "error-type": "unsupported-code"}, status=404)
        updated = self.rates.updated
        following = updated + timedelta(days=1)
        return web.json_response({
            "result": "success",
            "provider": "https://www.exchangerate-api.com",
            "documentation": "https://www.exchangerate-api.com/docs/free",
            "terms_of_use": "https://www.exchangerate-api.com/terms",
            "time_last_update_unix": int(updated.timestamp()),
            "time_last_update_utc": format_datetime(updated),
            "time_next_update_unix": int(following.timestamp()),
            "time_next_update_utc": format_datetime(following),
            "time_eol_unix": 0,
            "base_code": base,
            "rates": self.rates.rates(base),
        })


class FrankfurterMock(MockServer):
    """Answers like https://api.frankfurter.app/latest?from={base} (`base=` and `to=`/`symbols=` too)."""

    kind = "Frankfurter-like FX vendor"

    def __init__(self, rates: RateTable | None = None, name: str = "fx_secondary", **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        self.rates = rates or RateTable()

    async def answer(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path.rstrip("/") != "/latest":
            return web.json_response({"message": "not found"}, status=404)
        base = (request.query.get("from") or request.query.get("base") or "EUR").upper()
        if not self.rates.knows(base):
            return web.json_response({"message": "not found"}, status=404)
        rates = {code: value for code, value in self.rates.rates(base).items() if code != base}
        wanted = request.query.get("to") or request.query.get("symbols")
        if wanted:
            codes = {code.strip().upper() for code in wanted.split(",") if code.strip()}
            if any(not self.rates.knows(code) for code in codes):
                return web.json_response({"message": "not found"}, status=404)
            rates = {code: value for code, value in rates.items() if code in codes}
        return web.json_response({"amount": 1.0, "base": base, "date": self.rates.updated.strftime("%Y-%m-%d"),
                                  "rates": rates})
