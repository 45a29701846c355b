"""Resilience under faults: our defaults against a tuned nginx, in the same run, column by column.

Every scenario runs open loop (200 req/s for 15 s over 20 paths, latency from the planned send
time) against each proxy in front of a pair of fake providers of its own, switched to the fault:

- `defaults`: our proxy with a route table that names only the two upstreams, `timeout: 1s` and,
  in the cached scenarios, `cache: {ttl: 2s, stale: 1h}`: what most users write;
- `nginx`: the same two servers, the second one `backup`, tuned as an operator would:
  `proxy_next_upstream error timeout http_5xx http_429`, `max_fails=3 fail_timeout=30s`,
  `proxy_cache_use_stale error timeout updating http_5xx`, `proxy_cache_background_update on`.

Per scenario and proxy: 2xx share, p50/p99/max, requests over 0.5 s, calls to the failing primary
(for a refusing one: connection attempts, from nginx's error log and our attempt metrics),
Retry-After violations (calls the primary got inside a window it had asked for), amplification
(calls both providers counted / requests). `compare` sets the two side by side, per column.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import percentile

KEYS = 20            # distinct paths per scenario
TTL, STALE = 2.0, "1h"
SLOW_MS = 500.0      # a request slower than this is "slow" in the report
PROXIES = ("defaults", "nginx")


@dataclass(frozen=True)
class Scenario:
    name: str
    short: str                   # the service name / URL prefix
    primary: str                 # fake mode, or "refuse" (nothing listens)
    secondary: str
    cached: bool = False
    warm: bool = False           # every path fetched once before the fault is switched on
    stale: bool = False          # ... and then left past its ttl: only stale copies at the start
    redis: bool = False          # our proxy on a throwaway Redis that is stopped halfway (ours only)
    can_answer: bool = True      # a provider or a copy can answer every request
    hang: bool = False           # the hang scenarios, where a copy must answer with 0 slow requests
    what: str = ""

    @property
    def reference(self) -> str:
        """The healthy scenario of the same kind, that latency and amplification are measured over."""
        return "healthy_cached" if self.cached else "healthy"

    @property
    def is_reference(self) -> bool:
        return self.name == self.reference


SCENARIOS = (
    Scenario("healthy", "healthy", "ok", "ok", what="both providers answer; nothing cached (the reference)"),
    Scenario("healthy_cached", "healthyc", "ok", "ok", cached=True, warm=True,
             what="both providers answer; cached with ttl 2 s (the reference for the cached scenarios)"),
    Scenario("primary_refuses", "refuse", "refuse", "ok", what="nothing listens on the primary's port"),
    Scenario("primary_hangs", "hang", "hang", "ok", what="the primary accepts and never answers; nothing cached"),
    Scenario("primary_hangs_cached", "hangc", "hang", "ok", cached=True, warm=True, hang=True,
             what="the primary never answers; every path was cached and expires during the run (ttl 2 s)"),
    Scenario("both_hang_stale", "bothhang", "hang", "hang", cached=True, warm=True, stale=True, hang=True,
             what="both providers never answer; every path has a copy already past its ttl"),
    Scenario("primary_fails_30pct", "fail30", "fail30", "ok", what="3 in 10 primary answers are 503; nothing cached"),
    Scenario("primary_fails_30pct_cached", "fail30c", "fail30", "ok", cached=True, warm=True,
             what="3 in 10 primary answers are 503; cached with ttl 2 s"),
    Scenario("primary_429", "quota", "429", "ok",
             what="the primary answers 429 with Retry-After: 5 (and counts calls inside the window); nothing cached"),
    Scenario("primary_429_cached", "quotac", "429", "ok", cached=True, warm=True,
             what="the same 429s; cached with ttl 2 s"),
    Scenario("all_down_warm_cache", "warm", "down", "down", cached=True, warm=True, stale=True,
             what="both providers answer 503; every path has a copy already past its ttl"),
    Scenario("all_down_cold_cache", "cold", "down", "down", cached=True, can_answer=False,
             what="both providers answer 503; nothing cached"),
    Scenario("redis_stopped", "redis", "ok", "ok", cached=True, redis=True,
             what="cache.backend redis on a throwaway redis-server, stopped halfway (ours only)"),
)
SCENARIO_NAMES = tuple(s.name for s in SCENARIOS)


def chosen(names: str | None) -> list[Scenario]:
    """The scenarios named (comma-separated; all when None), each with its healthy reference, in order."""
    if not names:
        return list(SCENARIOS)
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    unknown = wanted - set(SCENARIO_NAMES)
    if unknown:
        raise SystemExit(f"bench: unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIO_NAMES)}")
    wanted |= {s.reference for s in SCENARIOS if s.name in wanted}
    return [s for s in SCENARIOS if s.name in wanted]


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one scenario and proxy as one row: the median of every figure, statuses summed.

    The p99 of one 15 s run moves by a millisecond or two from run to run on a shared 2-core machine;
    the median of interleaved rounds is what the side-by-side verdicts read.
    """
    measured = [run for run in runs if "skipped" not in run]
    if not measured:
        return runs[0] if runs else {"skipped": "not run"}
    out: dict[str, Any] = {}
    for key, value in measured[0].items():
        values = [run[key] for run in measured if run.get(key) is not None]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not values:
            out[key] = value
        else:
            middle = statistics.median(values)
            out[key] = type(value)(middle) if isinstance(value, int) and middle == int(middle) else middle
    statuses: dict[str, int] = {}
    for run in measured:
        for code, count in run["statuses"].items():
            statuses[code] = statuses.get(code, 0) + count
    out["statuses"] = statuses
    out["rounds"] = len(measured)
    return out


# --- configurations ---------------------------------------------------------------------------------

def service_name(scenario: Scenario, round_number: int) -> str:
    """The service (and URL prefix) of one round of a scenario: every round starts from nothing,
    with breakers, rests, caches and nginx's peer state of its own."""
    return f"{scenario.short}{round_number}"


def defaults_service(scenario: Scenario, name: str, primary: int, secondary: int) -> dict[str, Any]:
    """What most users write: the upstreams, a timeout and TTLs. Nothing else."""
    service: dict[str, Any] = {"prefix": f"/{name}", "timeout": "1s", "upstreams": [
        {"name": f"{name}_primary", "url": f"http://127.0.0.1:{primary}"},
        {"name": f"{name}_secondary", "url": f"http://127.0.0.1:{secondary}"}]}
    if scenario.cached:
        service["cache"] = {"ttl": f"{TTL:g}s", "stale": STALE}
    return service


def nginx_parts(servers: dict[str, tuple[Scenario, int, int]]) -> tuple[list[str], list[str]]:
    """The upstream blocks and locations of every scenario round (service name -> (scenario, primary
    port, secondary port))."""
    upstreams, locations = [], []
    for short, (scenario, primary, secondary) in servers.items():
        upstreams.append(f"    upstream {short} {{\n"
                         f"        server 127.0.0.1:{primary} max_fails=3 fail_timeout=30s;\n"
                         f"        server 127.0.0.1:{secondary} backup;\n"
                         f"        keepalive 64;\n    }}")
        cache = ("            proxy_cache bench;\n"
                 f"            proxy_cache_valid 200 {TTL:g}s;\n"
                 "            add_header X-Cache $upstream_cache_status;\n") if scenario.cached else ""
        locations.append(f"        location /{short}/ {{\n            proxy_pass http://{short}/;\n{cache}        }}")
    return upstreams, locations


# --- one run --------------------------------------------------------------------------------------------

def summary(records: list[list[float]], counts: dict[str, int], seconds: float,
            stopped_at: float | None = None) -> dict[str, Any]:
    """The columns of one scenario for one proxy, from the load generator's records and the fakes' counts."""
    sent = len(records)
    latencies = [rec[2] for rec in records]
    statuses: dict[str, int] = {}
    for rec in records:
        statuses[str(int(rec[1]))] = statuses.get(str(int(rec[1])), 0) + 1
    ok = sum(1 for rec in records if 200 <= rec[1] < 300)
    calls = counts["primary_calls"] + counts["secondary_calls"]
    out: dict[str, Any] = {
        "sent": sent, "share_2xx": ok / sent if sent else 0.0, "statuses": statuses,
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies) if latencies else None,
        "slow": sum(1 for value in latencies if value > SLOW_MS),
        "primary_calls": counts["primary_calls"], "secondary_calls": counts["secondary_calls"],
        "violations": counts.get("violations", 0), "upstream_calls": calls,
        "amplification": calls / sent if sent else 0.0,
    }
    if stopped_at is not None:
        after = [rec for rec in records if rec[0] >= stopped_at]
        out["redis_stopped_at_s"] = stopped_at
        out["share_2xx_after_stop"] = (sum(1 for rec in after if 200 <= rec[1] < 300) / len(after)) if after else 0.0
    return out


_REFUSED = re.compile(r"\(111: Connection refused\)")


def nginx_refusals(error_log: Path, port: int) -> int:
    """Connection attempts nginx logged as refused by 127.0.0.1:`port`."""
    try:
        text = error_log.read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if _REFUSED.search(line) and f"127.0.0.1:{port}/" in line)


def probe_503(headers: dict[str, str], status: int, body: bytes) -> dict[str, Any]:
    """What a caller learns from the answer when nothing can answer."""
    content_type = headers.get("Content-Type", "")
    return {"status": status, "content_type": content_type.split(";")[0],
            "retry_after": headers.get("Retry-After"), "json": content_type.startswith("application/json"),
            "bytes": len(body)}


# --- side by side -----------------------------------------------------------------------------------------

# Column -> (higher is better, absolute tolerance, relative tolerance, over the healthy reference).
# Counts are compared exactly. Latency columns get a tolerance (one run's p99 moves by a millisecond
# or two on a shared 2-core machine) and, like amplification, are compared as what the fault *adds*
# over the proxy's own healthy run of the same kind: a Python proxy's p50 is not nginx's whatever
# goes wrong, and nginx counts a cache entry's ttl in whole seconds (longer), so it refreshes less
# often in every cached run; what a fault adds to each is what tells how each handles the fault.
# Such a column is never "behind" when ours is at least as good as nginx's as measured, though: that
# is the literal bar, and a reference round that one proxy ran on a noisy moment (nginx's healthy
# cached p99 was 6.7 ms in one run, 2.2 in the others) would otherwise turn it into a loss.
COLUMNS: dict[str, tuple[bool, float, float, bool]] = {
    "share_2xx": (True, 0.0, 0.0, False),
    "p50_ms": (False, 1.0, 0.10, True),
    "p99_ms": (False, 1.0, 0.10, True),
    "max_ms": (False, 5.0, 0.10, True),
    "slow": (False, 0.0, 0.0, False),
    "primary_calls": (False, 0.0, 0.0, False),
    "violations": (False, 0.0, 0.0, False),
    "amplification": (False, 0.01, 0.0, True),
}


def verdict(column: str, ours: float | None, theirs: float | None, scale: float | None = None) -> str:
    """ahead | level | behind | n/a, for one column (`scale`: what the relative tolerance is of,
    by default `theirs`)."""
    if ours is None or theirs is None:
        return "n/a"
    higher, absolute, relative, _ = COLUMNS[column]
    slack = max(absolute, relative * abs(theirs if scale is None else scale))
    if ours == theirs:
        return "level"
    better = ours > theirs if higher else ours < theirs
    if abs(ours - theirs) <= slack:
        return "level"
    return "ahead" if better else "behind"


_RANK = {"behind": 0, "level": 1, "ahead": 2}


def compare(faults: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario: each column's verdict for `defaults` against nginx, and the issue's targets."""
    rows = []
    for scenario in SCENARIOS:
        ours, theirs = faults["defaults"].get(scenario.name, {}), faults["nginx"].get(scenario.name, {})
        if "skipped" in ours or "skipped" in theirs or not ours or not theirs:
            rows.append({"scenario": scenario.name, "skipped": ours.get("skipped") or theirs.get("skipped") or "not run"})
            continue
        ours_ref, theirs_ref = faults["defaults"].get(scenario.reference, {}), faults["nginx"].get(scenario.reference, {})
        columns, added = {}, {}
        for column, (_, _, _, over_reference) in COLUMNS.items():
            mine, other = ours.get(column), theirs.get(column)
            if over_reference and not scenario.is_reference:
                if not _measured(ours_ref, column) or not _measured(theirs_ref, column) or mine is None or other is None:
                    columns[column] = "n/a"
                    continue
                added[column] = (mine - ours_ref[column], other - theirs_ref[column])
                columns[column] = max(verdict(column, *added[column], scale=other), verdict(column, mine, other),
                                      key=_RANK.__getitem__)
            else:
                columns[column] = verdict(column, mine, other)
        behind = [c for c, v in columns.items() if v == "behind"]
        row: dict[str, Any] = {"scenario": scenario.name, "columns": columns, "added": added, "behind": behind,
                               "met": None if scenario.is_reference else not behind}
        if scenario.hang:
            row["hang_target"] = {"ours_slow": ours["slow"], "nginx_slow": theirs["slow"]}
            row["met"] = row["met"] and ours["slow"] == 0
        rows.append(row)
    return rows


def _measured(item: dict[str, Any], column: str) -> bool:
    return "skipped" not in item and item.get(column) is not None


# --- report ---------------------------------------------------------------------------------------------------

def number_text(value: Any, digits: int = 1) -> str:
    """A figure for the report: `–` for nothing, floats with `digits` decimals and thousands separators."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    faults = results
    lines = ["## Resilience under faults: our defaults against a tuned nginx", "",
             f"Open loop at {meta['fault_rate']:g} req/s for {meta['fault_seconds']:g} s per scenario over {KEYS} "
             f"paths, {meta.get('fault_rounds', 1)} interleaved round(s) per scenario and proxy (figures are the "
             "medians of the rounds, statuses their sum); "
             "latency from the planned send time; client timeout 10 s. `defaults`: our proxy with a route "
             "table naming only the two upstreams, `timeout: 1s` and, in cached scenarios, `cache: {ttl: 2s, stale: "
             "1h}`. `nginx`: the same two servers (`backup`), `max_fails=3 fail_timeout=30s`, `proxy_next_upstream "
             "error timeout http_500 http_502 http_503 http_504 http_429`, timeouts 1 s, `proxy_cache_valid 200 2s`, "
             "`proxy_cache_use_stale error timeout updating http_5xx`, `proxy_cache_background_update on`, "
             "`proxy_cache_lock on`. Primary calls: calls the failing primary counted (a refusing one: connection "
             "attempts, from nginx's error log and our attempt metrics). RA violations: calls inside a Retry-After "
             "window the primary had given. Amplification: calls both providers counted per request.", "",
             "| scenario | proxy | 2xx | p50 ms | p99 ms | max ms | > 0.5 s | primary calls | RA violations | "
             "amplification | statuses |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for scenario in SCENARIOS:
        for who in PROXIES:
            item = faults[who].get(scenario.name, {"skipped": "not run"})
            if "skipped" in item:
                lines.append(f"| {scenario.name} | {who} | skipped: {item['skipped']} | | | | | | | | |")
                continue
            share = f"{item['share_2xx'] * 100:.1f}%"
            if "share_2xx_after_stop" in item:
                share += f" ({item['share_2xx_after_stop'] * 100:.1f}% after the stop)"
            lines.append(
                f"| {scenario.name} | {who} | {share} | {number_text(item['p50_ms'])} | {number_text(item['p99_ms'])} | "
                f"{number_text(item['max_ms'])} | {item['slow']} | {item['primary_calls']} | {item['violations']} | "
                f"{number_text(item['amplification'], 2)} | "
                f"{', '.join(f'{k}: {v}' for k, v in sorted(item['statuses'].items()))} |")
    lines += ["", "### Side by side (defaults against nginx, per column)", "",
              "Counts (2xx, requests over 0.5 s, primary calls, RA violations) are compared as measured, exactly. "
              "Latency and amplification are compared as what the fault adds over the same proxy's own healthy run "
              "of the same kind (`healthy`, or `healthy_cached` for the cached scenarios): a Python proxy's p50 is "
              "not nginx's whatever goes wrong, and nginx counts a ttl in whole seconds, so it refreshes less "
              "often in every cached run. Such a column is never `behind` when ours is at least as good as "
              "nginx's as measured (a noisy reference round would otherwise make it one); the brackets give "
              "what the fault added, ours / nginx. Latency is `level` within 1 ms or 10 % of nginx's figure "
              "(5 ms for the max). The reference rows compare the proxies as they are.", "",
              "| scenario | " + " | ".join(COLUMNS) + " | met |", "|---|" + "---|" * (len(COLUMNS) + 1)]
    for row in results.get("comparison", []):
        if "skipped" in row:
            lines.append(f"| {row['scenario']} | skipped: {row['skipped']} |" + " |" * len(COLUMNS))
            continue
        met = "reference" if row["met"] is None else "met" if row["met"] else "**not met**"
        cells = []
        for column in COLUMNS:
            cell = row["columns"][column]
            if column in row.get("added", {}):
                mine, other = row["added"][column]
                cell += f" ({'+' if mine >= 0 else ''}{number_text(mine, 2 if column == 'amplification' else 1)} / "
                cell += f"{'+' if other >= 0 else ''}{number_text(other, 2 if column == 'amplification' else 1)})"
            cells.append(cell)
        lines.append(f"| {row['scenario']} | " + " | ".join(cells) + f" | {met} |")
    probe = results.get("probe_all_down_cold")
    if probe:
        lines += ["", "When nothing can answer (all down, cold cache), one more request after the run:", ""]
        for who in PROXIES:
            if who in probe:
                p = probe[who]
                lines.append(f"- {who}: {p['status']} {p['content_type'] or '(no type)'}, Retry-After: "
                             f"{p['retry_after'] or 'none'}")
    lines += ["", "Scenarios:", ""] + [f"- `{s.name}`: {s.what}" for s in SCENARIOS]
    return lines
