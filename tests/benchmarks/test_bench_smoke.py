"""The benchmark harness: its smoke run covers every case and scenario and writes well-formed results.

No timing thresholds: only that each figure is there and is a number, and that the harness measured
what it claims (the fake providers counted the calls, the faults were switched on).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.faults import COLUMNS, PROXIES, SCENARIO_NAMES, verdict
from bench.harness import LATENCY_CASES, THROUGHPUT_CASES, markdown
from bench.loadgen import parse_wrk, percentile

ROOT = Path(__file__).resolve().parents[2]

WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:8080/hit/latest/USD
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.31ms  612.00us  19.84ms   92.11%
    Req/Sec     9.45k   310.12     9.90k    80.00%
  Latency Distribution
     50%    5.21ms
     75%    5.40ms
     90%  850.00us
     99%    1.02s
  47012 requests in 5.00s, 14.12MB read
  Non-2xx or 3xx responses: 12
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec:   9401.55
Transfer/sec:      2.82MB
"""


def test_wrk_report_is_parsed_with_its_units():
    report = parse_wrk(WRK_OUTPUT)
    assert report["rps"] == 9401.55
    assert report["requests"] == 47012
    assert report["p50_ms"] == 5.21
    assert report["p90_ms"] == 0.85
    assert report["p99_ms"] == 1020.0
    assert report["non_2xx"] == 12
    assert report["socket_errors"] == 4


def test_wrk_output_without_a_rate_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="Requests/sec"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--latency-rounds", "0"], ["--duration", "-1"],
                                  ["--scenario-seconds", "0"], ["--rate", "0"]])
def test_a_count_or_length_of_zero_or_less_is_refused_not_read_as_the_default(argv, capsys):
    from bench.harness import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert f"argument {argv[0]}: must be above 0, not {argv[1]}" in capsys.readouterr().err


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--no-install", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"smoke run failed:\n{done.stdout}\n{done.stderr}"
    return out, done.stdout


def test_smoke_writes_every_case_as_a_number_or_a_stated_skip(smoke):
    out, stdout = smoke
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["mode"] == "smoke"
    # How idle cores sleep is part of what a latency figure means: stated, or stated unknown.
    idle = results["meta"]["machine"]["idle"]
    assert idle is None or idle.startswith("cpuidle ")
    assert f"idle cores: {idle or 'unknown'};" in (out / "results.md").read_text()
    for group, cases in (("throughput", THROUGHPUT_CASES), ("latency", LATENCY_CASES)):
        for case in cases:
            item = results[group][case]
            if "skipped" in item:
                assert isinstance(item["skipped"], str) and item["skipped"]
            else:
                assert _number(item["median"]) and item["median"] > 0, (group, case, item)
                assert item["min"] <= item["median"] <= item["max"]
    # The cases that need nothing but Python are always measured.
    for case in ("ceiling", "ours_memory_hit", "minimal_pass", "ours_pass"):
        assert "median" in results["throughput"][case]
    assert _number(results["rss"]["ours_idle_mib"]) and _number(results["rss"]["ours_1000_mib"])
    assert results["rss"]["ours_1000_mib"] > 0
    for row in results["targets"]:
        assert row["met"] in (True, False, None) and (row["value"] is None or _number(row["value"]))
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        assert "nginx parts skipped" in stdout
        assert "skipped" in results["throughput"]["nginx_hit"]


def test_smoke_runs_every_fault_scenario_against_counting_fakes(smoke):
    out, _ = smoke
    faults = json.loads((out / "results.json").read_text())["faults"]
    for name in SCENARIO_NAMES:
        for who in PROXIES:
            item = faults[who][name]
            if "skipped" in item:
                assert who == "nginx" or name == "redis_stopped", (who, name, item)
                continue
            assert item["sent"] > 0
            for key in ("share_2xx", "p50_ms", "p99_ms", "max_ms", "amplification"):
                assert _number(item[key]), (who, name, key, item)
            for key in ("slow", "primary_calls", "violations"):
                assert isinstance(item[key], int) and item[key] >= 0, (who, name, key, item)
            assert 0.0 <= item["share_2xx"] <= 1.0
    healthy = faults["defaults"]["healthy"]
    # Healthy providers, no cache: one upstream call per client request, every answer a 2xx.
    assert healthy["share_2xx"] == 1.0 and healthy["upstream_calls"] == healthy["sent"]
    assert healthy["primary_calls"] == healthy["sent"] and healthy["violations"] == 0
    # Both providers down and nothing cached: nothing can answer, so the faults really were on.
    cold = faults["defaults"]["all_down_cold_cache"]
    assert cold["share_2xx"] == 0.0 and "200" not in cold["statuses"]
    probe = faults["probe_all_down_cold"]["defaults"]
    assert probe["status"] == 503 and probe["json"] and probe["retry_after"].isdigit()
    # A refusing primary is counted from our attempt metrics: at least one connection was tried.
    assert faults["defaults"]["primary_refuses"]["primary_calls"] >= 1
    assert faults["defaults"]["primary_429"]["primary_calls"] >= 1  # the rate-limiting fake was asked


def test_smoke_report_names_every_case_and_scenario(smoke):
    out, _ = smoke
    text = (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert text == markdown(results)  # the report is rendered from the JSON alone
    for name in THROUGHPUT_CASES + SCENARIO_NAMES:
        assert f"| {name} |" in text, name
    assert "### Side by side (defaults against nginx, per column)" in text
    assert "## Targets" in text and "## Commands" in text and "python -m proxy run" in text


@pytest.mark.parametrize(("column", "ours", "nginx", "expected"), [
    ("share_2xx", 1.0, 0.99, "ahead"), ("share_2xx", 0.99, 1.0, "behind"),
    ("p99_ms", 3.4, 3.0, "level"), ("p99_ms", 12.0, 3.0, "behind"), ("p99_ms", 2.0, 9.0, "ahead"),
    ("slow", 0, 20, "ahead"), ("slow", 1, 0, "behind"), ("primary_calls", 3, 3, "level"),
    ("violations", 2, 0, "behind"), ("amplification", 1.005, 1.0, "level"), ("p50_ms", None, 1.0, "n/a"),
])
def test_columns_are_compared_with_their_direction_and_tolerance(column, ours, nginx, expected):
    assert column in COLUMNS
    assert verdict(column, ours, nginx) == expected


def test_latency_is_compared_as_what_the_fault_adds_over_each_proxys_own_healthy_run():
    from bench.faults import compare

    def run(p50: float, p99: float, primary_calls: int = 0) -> dict:
        return {"share_2xx": 1.0, "p50_ms": p50, "p99_ms": p99, "max_ms": p99, "slow": 0,
                "primary_calls": primary_calls, "violations": 0, "amplification": 1.0}

    faults = {"defaults": {"healthy": run(2.0, 9.0), "primary_refuses": run(2.1, 9.5, 1)},
              "nginx": {"healthy": run(1.0, 5.0), "primary_refuses": run(1.2, 8.5, 4)}}
    rows = {row["scenario"]: row for row in compare(faults)}
    refuses = rows["primary_refuses"]
    # Raw p99 9.5 against 8.5 would be behind; what the refusals add is +0.5 against +3.5: ahead.
    assert refuses["columns"]["p99_ms"] == "ahead" and refuses["added"]["p99_ms"] == (0.5, 3.5)
    assert refuses["columns"]["primary_calls"] == "ahead" and refuses["met"] is True
    assert rows["healthy"]["met"] is None  # a reference, not a target
    assert rows["healthy"]["columns"]["p99_ms"] == "behind"  # compared as they are


def test_a_latency_at_least_as_good_as_nginx_s_as_measured_is_never_behind():
    from bench.faults import compare

    def run(p99: float, max_ms: float) -> dict:
        return {"share_2xx": 1.0, "p50_ms": 1.0, "p99_ms": p99, "max_ms": max_ms, "slow": 0,
                "primary_calls": 3, "violations": 0, "amplification": 1.0}

    # nginx's healthy round was noisy (p99 6.7): what the outage adds to it comes out negative.
    faults = {"defaults": {"healthy_cached": run(4.3, 9.0), "all_down_warm_cache": run(4.7, 14.8),
                           "all_down_cold_cache": run(5.9, 25.0)},
              "nginx": {"healthy_cached": run(6.7, 14.6), "all_down_warm_cache": run(5.9, 11.9),
                        "all_down_cold_cache": run(3.2, 6.8)}}
    rows = {row["scenario"]: row for row in compare(faults)}
    warm = rows["all_down_warm_cache"]["columns"]
    assert rows["all_down_warm_cache"]["added"]["p99_ms"] == pytest.approx((0.4, -0.8))  # added alone: behind
    assert warm["p99_ms"] == "ahead" and warm["max_ms"] == "level"  # 4.7 < 5.9; 14.8 within 5 ms of 11.9
    cold = rows["all_down_cold_cache"]
    assert cold["columns"]["p99_ms"] == "behind" and cold["columns"]["max_ms"] == "behind"  # worse both ways
    assert cold["met"] is False


def test_cache_rss_bench_fills_the_cache_past_its_budget_and_reports_rss_beside_it():
    from bench.cache_rss import run

    result = run(max_bytes=256 * 1024, requests=2000, connections=4, every=500)
    last = result["samples"][-1]
    assert last["requests"] == 2000
    assert 0 < last["entries"] < 2000  # the budget was reached: older copies were evicted
    assert 0 < last["cache_mib"] <= 0.25
    assert result["idle_rss_mib"] > 0 and result["final_rss_mib"] > 0


def test_rounds_are_combined_as_medians_with_statuses_summed():
    from bench.faults import combine

    rounds = [{"share_2xx": 1.0, "p99_ms": p99, "slow": slow, "primary_calls": calls, "statuses": {"200": 10}}
              for p99, slow, calls in ((4.0, 0, 7), (9.0, 2, 8), (5.0, 0, 7))]
    combined = combine(rounds + [{"skipped": "not installed"}])
    assert (combined["p99_ms"], combined["slow"], combined["primary_calls"]) == (5.0, 0, 7)
    assert combined["statuses"] == {"200": 30} and combined["rounds"] == 3
    assert combine([{"skipped": "nginx is not installed"}]) == {"skipped": "nginx is not installed"}


def test_a_chosen_scenario_brings_its_healthy_reference_and_a_wrong_name_is_refused():
    from bench.faults import chosen

    assert [s.name for s in chosen("primary_429_cached")] == ["healthy_cached", "primary_429_cached"]
    assert [s.name for s in chosen(None)] == list(SCENARIO_NAMES)
    with pytest.raises(SystemExit, match="unknown scenario"):
        chosen("primary_hangz")
