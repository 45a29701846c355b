"""`python -m proxy.demo.walkthrough` (`make demo`): the proxy in front of mock providers, offline, in seconds.

Starts the mock vendors of the committed routes.yaml on 127.0.0.1 (`proxy.mocks`) and the proxy
in this process, serving that same routes.yaml with only the vendors' base URLs swapped for the
mocks', the listeners on 127.0.0.1:0 and demo-sized TTLs, timeouts and breaker. Then it sends
real requests and prints what comes back: answers normalised by each upstream's `transform`;
MISS then HIT; the derived route `/fx/rate/{base}/{quote}` answered from the cached
`/fx/latest/{base}` copy; a dead primary and the secondary answering; both dead and a STALE
copy; the primary's breaker opening, being skipped and being reset; the flights service, with
the result codes its vendors send inside HTTP 200 answers. Nothing leaves 127.0.0.1. `--fast`
shortens the waits (the tests use it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from proxy.config.model import Config
from proxy.config.parse import load_config
from proxy.demo.mocks import MockProviders
from proxy.demo.mocks.providers import COMMITTED_ROUTES, VENDOR_URLS
from proxy.observability import logs
from proxy.observability.logs import EventLog
from proxy.ops.process import ProxyProcess

_COLOURS = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35",
            "cyan": "36"}
_CACHE_COLOUR = {"HIT": "green", "MISS": "yellow", "STALE": "magenta", "BYPASS": "cyan"}
_STATE_COLOUR = {"CLOSED": "green", "OPEN": "red", "HALF_OPEN": "yellow", "HEALTHY": "green", "DOWN": "red",
                 "DEGRADED": "yellow"}


class Transcript:
    """Prints the walk-through; colours only on a terminal (and never with NO_COLOR set)."""

    def __init__(self, out: TextIO, *, colour: bool) -> None:
        self.out = out
        self.colour = colour

    def paint(self, text: str, colour: str | None) -> str:
        if not self.colour or colour is None:
            return text
        return f"\033[{_COLOURS[colour]}m{text}\033[0m"

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, number: int, title: str) -> None:
        self.line()
        self.line(self.paint(f"== {number}. {title}", "bold"))

    def note(self, text: str) -> None:
        self.line(self.paint(f"   # {text}", "dim"))

    def log(self, text: str) -> None:
        self.line(self.paint(f"     log: {text}", "blue"))

    def request(self, method: str, url: str) -> None:
        self.line(f"   {self.paint(method, 'bold')} {url}")

    def answer(self, status: int, headers: Any, body: bytes) -> None:
        parts = [self.paint(str(status), "green" if status < 400 else "red")]
        cache = headers.get("X-Cache")
        if cache:
            parts.append(f"X-Cache: {self.paint(cache, _CACHE_COLOUR.get(cache))}")
        if headers.get("X-Upstream"):
            parts.append(f"X-Upstream: {headers['X-Upstream']}")
        if headers.get("Age") is not None:
            parts.append(f"Age: {headers['Age']}")
        self.line("     -> " + "  ".join(parts))
        self.line(self.paint(f"        {excerpt(body)}", "dim"))

    def state(self, label: str, state: str, extra: str = "") -> None:
        self.line(f"     {label}: {self.paint(state, _STATE_COLOUR.get(state))}{extra}")


class _Narrator:
    """A logger for `EventLog` that prints the breaker and stale-cache lines operators know."""

    def __init__(self, transcript: Transcript) -> None:
        self._transcript = transcript

    def _print(self, event: str, **fields: Any) -> None:
        if fields.get("kind") in ("breaker", "stale", "rest", "api_key"):
            self._transcript.log(event)

    info = warning = error = _print


def excerpt(body: bytes, limit: int = 160) -> str:
    """A one-line summary of an answer body: its shape and the fields that tell what it is."""
    try:
        data = json.loads(body)
    except ValueError:
        text = " ".join(body.decode("utf-8", "replace").split())
        return text[:limit] + ("..." if len(text) > limit else "")
    if isinstance(data, dict) and isinstance(data.get("rates"), dict):
        rates = data["rates"]
        shown = {k: rates[k] for k in ("EUR", "KRW", "JPY", "USD") if k in rates}
        shown = dict(list(shown.items())[:2])
        fields = {k: (shown if k == "rates" else v) for k, v in data.items()}
        more = len(rates) - len(shown)
        return _short(fields, 1000) + (f" (+{more} rates)" if more else "")
    if isinstance(data, dict) and isinstance(data.get("flights"), list):
        flights = data["flights"]
        first = _short(flights[0], 1000) if flights else ""
        more = f", +{len(flights) - 1} more" if len(flights) > 1 else ""
        rest = {k: v for k, v in data.items() if k != "flights"}
        return f'{{"flights": [{first}{more}], {_short(rest, 1000)[1:]}'
    if isinstance(data, dict) and "attempts" in data:
        attempts = ", ".join(f"{a.get('upstream')}={a.get('outcome')}" for a in data["attempts"])
        return f'error {data.get("error")!r}, attempts: {attempts}'
    return _short(data, limit)


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text[:limit] + ("..." if len(text) > limit else "")


def fx_timings(config: Config) -> dict[str, str]:
    """What the demo shortens, as the fx service of `config` has it."""
    fx = config.services["fx"]
    primary = fx.upstreams[0]
    ttl = next((route.cache.ttl for route in fx.routes if route.cache.enabled), fx.cache.ttl)
    return {"fx ttl": _seconds(ttl), "timeout": _seconds(primary.timeout), "deadline": _seconds(fx.deadline),
            "breaker failures": str(primary.breaker.fail_threshold), "retries": str(primary.retry.retries)}


def _seconds(value: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{value / size:g}{unit}"
    return f"{value:g}s"


class Demo:
    """The walk-through, step by step, against a proxy and mocks it owns."""

    def __init__(self, transcript: Transcript, *, fast: bool) -> None:
        self.t = transcript
        self.fast = fast
        # Long enough that steps 1-2 run on one fresh copy even on a busy machine; step 4 waits it out.
        self.fx_ttl = 2 if fast else 3
        self.pause = 0.0 if fast else 0.7
        self.mocks = MockProviders()
        self.process: ProxyProcess | None = None
        self.session: aiohttp.ClientSession | None = None
        self.base = ""

    async def run(self) -> None:
        with tempfile.TemporaryDirectory(prefix="resilience-proxy-demo-") as folder:
            await self.mocks.start()
            try:
                routes = self.mocks.write_routes(Path(folder) / "routes.yaml", ttl={"fx": f"{self.fx_ttl}s"})
                # Only what the committed table needs: no real API key from this shell reaches anything.
                env = self.mocks.env
                config = load_config(routes, env=env)
                self.process = ProxyProcess(config, env=env, log_events=False)
                self.process.bus.subscribe(EventLog(_Narrator(self.t)))
                await self.process.start()
                host, port = self.process.addresses["main"]
                self.base = f"http://{host}:{port}"
                async with aiohttp.ClientSession() as self.session:
                    self.introduce(load_config(COMMITTED_ROUTES, env=env), config)
                    await self.normal()
                    await self.derived()
                    await self.primary_down()
                    await self.stale()
                    await self.breaker()
                    await self.flights()
            finally:
                if self.process is not None:
                    await self.process.stop()
                await self.mocks.stop()
        self.t.line()
        self.t.line(self.t.paint("Demo finished: the proxy and the mock providers are stopped.", "bold"))

    # --- helpers ---------------------------------------------------------------------------

    async def send(self, method: str, path: str, *, show: bool = True) -> tuple[int, Any, bytes]:
        assert self.session is not None
        url = self.base + path
        if show:
            self.t.request(method, url)
        async with self.session.request(method, url) as response:
            body = await response.read()
            if show:
                self.t.answer(response.status, response.headers, body)
            return response.status, response.headers, body

    async def get_json(self, path: str) -> Any:
        self.t.request("GET", self.base + path)
        _, _, body = await self.send("GET", path, show=False)
        return json.loads(body)

    async def wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def fx_calls(self) -> int:
        return self.mocks.fx_primary.calls + self.mocks.fx_secondary.calls

    async def circuits(self, only: str | None = None) -> dict[str, str]:
        data = await self.get_json("/health/integrations/circuits")
        states = {}
        for circuit in data["circuits"]:
            states[circuit["provider"]] = circuit["state"]
            if only is None or circuit["provider"] == only:
                retry = f", retryAt {circuit['retryAt']}" if circuit.get("retryAt") else ""
                retry += f", resting until {circuit['restingUntil']}" if circuit.get("restingUntil") else ""
                self.t.state(f"circuit {circuit['provider']}", circuit["state"],
                             f"  (failures {circuit['failures']}/{circuit['threshold']}{retry})")
        return states

    # --- the steps -------------------------------------------------------------------------

    def introduce(self, committed: Config, running: Config) -> None:
        t = self.t
        t.line(t.paint("resilience-proxy offline demo", "bold") + " - every request below goes to 127.0.0.1")
        for name, mock in self.mocks.all.items():
            t.line(f"   {name:<16} {mock.base_url:<28} {mock.kind}, instead of {VENDOR_URLS[name]}")
        t.line(f"   {'proxy':<16} {self.base:<28} serving {COMMITTED_ROUTES} as committed, vendor URLs -> mocks;")
        ours, theirs = fx_timings(running), fx_timings(committed)
        t.line(f"   {'':<16} {'':<28} shortened to be quick: "
               + ", ".join(f"{what} {theirs[what]} -> {ours[what]}" for what in ours))

    async def normal(self) -> None:
        self.t.step(1, "A first request is a MISS; the same request again is a HIT")
        self.t.note("fx_primary's transform turns the vendor's answer into {base, rates, updated, source}")
        await self.send("GET", "/fx/latest/USD")
        await self.send("GET", "/fx/latest/USD")
        self.t.note(f"fx_primary was called {self.mocks.fx_primary.calls} time: the HIT came from the cache")
        await self.wait(self.pause)

    async def derived(self) -> None:
        self.t.step(2, "A derived route: /fx/rate/{base}/{quote} is answered from the cached /fx/latest/{base}")
        before = self.fx_calls()
        self.t.note(f"calls that reached the FX vendors so far: {before}")
        await self.send("GET", "/fx/rate/USD/KRW")
        self.t.note(f"calls that reached the FX vendors after it: {self.fx_calls()} "
                    f"(no upstream call for the rate)")
        self.t.note("a currency the rates do not have is a 404 with a JSON body, not a 500:")
        await self.send("GET", "/fx/rate/USD/XYZ")
        await self.wait(self.pause)

    async def primary_down(self) -> None:
        self.t.step(3, "fx_primary goes down: fx_secondary answers, in the same shape")
        await self.mocks.fx_primary.go_down()
        self.t.note("fx_primary stopped listening (connection refused); asking for a rate not cached yet")
        await self.send("GET", "/fx/latest/EUR")
        await self.wait(self.pause)

    async def stale(self) -> None:
        self.t.step(4, "Both FX vendors down: the stale copy is served, with its Age")
        await self.mocks.fx_secondary.go_down()
        wait = self.fx_ttl + 0.3
        self.t.note(f"fx_secondary stopped listening too; waiting {wait:.1f}s so the USD copy "
                    f"(ttl {self.fx_ttl}s) is no longer fresh")
        await self.wait(wait)
        await self.send("GET", "/fx/latest/USD")
        self.t.note("a rate never cached has nothing to fall back on:")
        await self.send("GET", "/fx/latest/JPY")
        await self.wait(self.pause)

    async def breaker(self) -> None:
        self.t.step(5, "fx_primary's circuit breaker is OPEN: it is skipped until an operator resets it")
        states = await self.circuits(only="fx_primary")
        for _ in range(5):
            if states.get("fx_primary") == "OPEN":
                break
            self.t.note("fx_primary still refuses connections; each failure counts")
            await self.send("GET", "/fx/latest/USD")
            states = await self.circuits(only="fx_primary")
        health = await self.get_json("/health")
        fx = health["services"]["fx"]
        self.t.state("health status", health["status"])
        for provider in fx["providers"]:
            self.t.state(f"  fx provider {provider['providerName']}", provider["status"],
                         f"  (circuit {provider['circuitState']})")

        await self.mocks.fx_primary.come_up()
        before = self.mocks.fx_primary.calls
        self.t.note("fx_primary is listening again, but its breaker is OPEN: the proxy does not call it")
        await self.send("GET", "/fx/latest/USD")
        self.t.note(f"calls that reached fx_primary meanwhile: {self.mocks.fx_primary.calls - before}")

        self.t.note("runbook: after recovery, reset the circuit by hand")
        path = "/health/integrations/circuits/fx_primary/reset"
        self.t.request("POST", self.base + path)
        status, _, body = await self.send("POST", path, show=False)
        snapshot = json.loads(body)
        self.t.line(f"     -> {status}")
        self.t.state("circuit fx_primary", snapshot["state"], f"  (failures {snapshot['failures']}/{snapshot['threshold']})")
        await self.send("GET", "/fx/latest/USD")
        self.t.note(f"calls that reached fx_primary since it came back: {self.mocks.fx_primary.calls - before}")
        await self.wait(self.pause)

    async def flights(self) -> None:
        self.t.step(6, "The flights service: KAC and ODCloud answers as {flights: [...], source}")
        self.t.note("each route names the vendor's real endpoint and parameters; serviceKey comes from KAC_API_KEY "
                    "(given encoded) and ODCLOUD_API_KEY (given decoded): both are sent encoded once")
        await self.send("GET", "/flights/schedules/GMP")
        self.mocks.board.set_status("OZ8915", "DELAYED", estimated="0840")
        self.t.note("the airport now reports OZ8915 as DELAYED")
        await self.send("GET", "/flights/status/OZ8915")
        await self.send("GET", "/flights/status/OZ8915")
        self.t.note("a flight KAC does not know: HTTP 200 with resultCode 03 NODATA_ERROR, an empty answer, "
                    "not a failure")
        await self.send("GET", "/flights/status/ZZ999")
        await self.circuits(only="flights_kac")
        self.mocks.flights_kac.answer_code("22")
        self.t.note("KAC's gateway now says the daily quota is spent (resultCode 22, XML, in an HTTP 200): its "
                    "key rests and ODCloud answers, in the same shape")
        await self.send("GET", "/flights/schedules/CJU")
        await self.circuits(only="flights_kac")
        self.mocks.flights_kac.heal()


async def run(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.demo.walkthrough", description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="shorter waits (for tests)")
    args = parser.parse_args(argv)
    stream = out or sys.stdout
    colour = stream.isatty() and not os.environ.get("NO_COLOR")
    # The proxy's own log lines would drown the transcript: only warnings and worse, to stderr.
    logs.configure("warning", "console", stream=sys.stderr)
    demo = Demo(Transcript(stream, colour=colour), fast=args.fast)
    async with asyncio.timeout(120):  # whatever happens, the demo stops by itself
        await demo.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(run(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
