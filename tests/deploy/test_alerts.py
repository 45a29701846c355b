"""The Prometheus rules and the Grafana dashboard only use metrics that the proxy exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy import signals
from proxy.clock import FakeClock
from proxy.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "resilience-proxy.json"

# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels, variables and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals, e.g. "$service"
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors, e.g. [$__rate_interval]
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group().lower() in _KEYWORDS:
            continue  # a function or aggregation, or an operator
        names.add(match.group())
    return names


def one_of_each_event() -> list:
    service, provider = "fx", "fx_primary"
    return [
        signals.AttemptFinished(service, provider, "http_5xx", 503, 0.2, 1, "GET", "https://p.example/x", "r1"),
        signals.UpstreamSkipped(service, provider, "breaker_open", "r1"),
        signals.BreakerTransition(service, provider, "CLOSED", "OPEN", "threshold"),
        signals.RetryScheduled(service, provider, 2, 0.1, "r1"),
        signals.RetryBudgetExhausted(service, provider, "r1"),
        signals.CacheLookup(service, "hit"),
        signals.StaleServed(service, "/fx/latest/USD", 120.0, provider, "error", "r1"),
        signals.UpstreamRested(service, provider, 1_733_040_060.0),
        signals.HedgeRaced(service, provider, "fx_secondary", "hedge", "r1"),
        signals.Coalesced(service),
        signals.RequestFinished(service, "latest", "GET", "/fx/latest/USD", 200, "STALE", provider, (), 0.3, "r1",
                               fallback=True),
        signals.CacheBackendState("redis", True),
        signals.CacheError("redis", "get", "timeout"),
        signals.ConfigReloaded(True, "sighup"),
        signals.KeySpent(service, provider, "fp-1", 429, 1_733_040_060.0, 1),
        signals.WatchEventEmitted(service, "status", "e1"),
        signals.EventDelivered("ws", "status"),
        signals.EventDelivered("ws", "status", redelivery=True),
        signals.EventAcked("ws", "status"),
        signals.EventDeadLettered("status", "e1", "gone"),
        signals.ClientDropped("slow"),
        signals.TopicSubscribers("status", "flights/status/KE1", 1),
        signals.OutboxState(3, 1.5),
    ]


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name a Metrics instance exports once it has seen one event of each kind."""
    metrics = Metrics(FakeClock())
    for event in one_of_each_event():
        metrics(event)
    body, _ = metrics.render()
    return {s.name for family in text_string_to_metric_families(body.decode()) for s in family.samples}


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_metric_names_are_told_apart_from_functions_labels_and_variables() -> None:
    expr = ('histogram_quantile(0.95, sum by (service, le) (rate(foo_bucket{service=~"$service", le="0.5"}'
            '[$__rate_interval]))) / on(service) bar_total > 0.1 and baz unless sum(qux) without (provider)')
    assert metric_names(expr) == {"foo_bucket", "bar_total", "baz", "qux"}


def test_the_exported_names_include_the_contract_metrics(exported: set[str]) -> None:
    assert exported >= {"external_requests_total", "external_request_errors_total",
                        "external_request_duration_seconds_bucket", "circuit_breaker_open", "cache_requests_total",
                        "cache_hit_rate", "proxy_requests_total", "proxy_request_duration_seconds_bucket",
                        "retries_total", "fallbacks_total", "stale_served_total", "retry_budget_exhausted_total",
                        "cache_backend_up"}


def test_rules_file_is_groups_of_named_rules(rules: list[dict]) -> None:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    for group in document["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))


def test_every_rule_has_an_expression_severity_and_annotations_pointing_at_health(rules: list[dict]) -> None:
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", rule["alert"])
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert rule["labels"]["severity"] in {"warning", "critical"}
        annotations = rule["annotations"]
        assert annotations["summary"].strip()
        assert "/health/integrations" in annotations["description"], rule["alert"]
        assert "runbook" in annotations["runbook"].lower()
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["alert"]


def test_the_seed_alerts_and_the_new_ones_have_their_thresholds(rules: list[dict]) -> None:
    by_name = {rule["alert"]: rule for rule in rules}

    def flat(name: str) -> str:
        return " ".join(by_name[name]["expr"].split())

    assert {"HighExternalApiErrorRate", "CircuitBreakerOpen", "CacheHitRateLow", "StaleServing",
            "RetryBudgetExhausted"} <= set(by_name)
    assert (by_name["HighExternalApiErrorRate"]["for"], by_name["HighExternalApiErrorRate"]["labels"]["severity"]) \
        == ("5m", "warning")
    assert (by_name["CircuitBreakerOpen"]["for"], by_name["CircuitBreakerOpen"]["labels"]["severity"]) \
        == ("1m", "critical")
    assert (by_name["CacheHitRateLow"]["for"], by_name["CacheHitRateLow"]["labels"]["severity"]) == ("15m", "warning")
    assert by_name["StaleServing"]["for"] == "10m"
    assert flat("CircuitBreakerOpen") == "circuit_breaker_open > 0"
    # From the counters summed over replicas, and only with at least 100 lookups in the window.
    assert flat("CacheHitRateLow") == (
        'sum by (service) (rate(cache_requests_total{result="hit"}[10m])) '
        '/ sum by (service) (rate(cache_requests_total{result!="bypass"}[10m])) < 0.5 '
        'and sum by (service) (increase(cache_requests_total{result!="bypass"}[10m])) >= 100')
    # Only stale copies standing in for failures page anyone: background refreshes are routine.
    assert flat("StaleServing") == \
        'sum by (service) (rate(stale_served_total{reason=~"error|timeout|breaker_open"}[5m])) > 0'
    assert flat("UpstreamRateLimited") == "max by (service, provider) (upstream_rest_until_seconds) > time()"
    assert (by_name["UpstreamRateLimited"]["for"], by_name["UpstreamRateLimited"]["labels"]["severity"]) == \
        ("10m", "warning")
    assert "increase(retry_budget_exhausted_total[10m])" in flat("RetryBudgetExhausted")


def test_the_error_rate_alert_is_a_ratio_per_provider(rules: list[dict]) -> None:
    expr = " ".join(next(r for r in rules if r["alert"] == "HighExternalApiErrorRate")["expr"].split())
    assert expr == ("sum by (service, provider) (rate(external_request_errors_total[5m])) "
                    "/ sum by (service, provider) (rate(external_requests_total[5m])) > 0.1")


def test_alert_expressions_use_only_exported_metrics(rules: list[dict], exported: set[str]) -> None:
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, (rule["alert"], names - exported)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not on PATH (.ci/run installs Debian's prometheus package, which has it); "
                    "the rules and their unit tests are still checked structurally here")
    return found


def test_promtool_accepts_the_rules_file() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_every_alert_pass() -> None:
    result = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def rule_tests() -> dict:
    return yaml.safe_load(RULE_TESTS.read_text())


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_quiet(rules: list[dict],
                                                                                 rule_tests: dict) -> None:
    assert rule_tests["rule_files"] == [RULES.name]
    fires, quiet = set(), set()
    for case in rule_tests["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules}
    assert fires == names, names - fires
    assert quiet == names, names - quiet


def test_the_unit_tests_feed_only_exported_metrics(rule_tests: dict, exported: set[str]) -> None:
    """A test on a series the proxy never exports would prove nothing about production."""
    for case in rule_tests["tests"]:
        for series in case["input_series"]:
            name = series["series"].partition("{")[0]
            assert name in exported, (case["name"], name)


def panel_expressions(dashboard: dict) -> dict[str, list[str]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return {panel["title"]: [t["expr"] for t in panel.get("targets", [])] for panel in panels
            if panel.get("type") != "row"}


def test_dashboard_picks_its_prometheus_from_a_variable_with_no_import_placeholders(dashboard: dict) -> None:
    """Provisioned from files or a ConfigMap, Grafana resolves no `${DS_...}` input: a variable does it."""
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "DS_" not in DASHBOARD.read_text() and "__inputs" not in dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    selected = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard["panels"]:
        assert panel["datasource"] == selected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == selected, panel["title"]
    for name in ("namespace", "pod", "service"):
        assert variables[name]["datasource"] == selected, name
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_has_namespace_pod_and_service_variables_every_query_honours(dashboard: dict) -> None:
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "namespace", "pod", "service"]
    for title, exprs in panel_expressions(dashboard).items():
        for expr in exprs:
            for metric in metric_names(expr):
                selectors = re.findall(rf"(?<![\w:]){metric}(\{{[^}}]*\}})?", expr)
                for selector in selectors:
                    assert 'namespace=~"$namespace"' in selector and 'pod=~"$pod"' in selector, (title, metric)


def test_dashboard_ratios_are_computed_from_counters(dashboard: dict) -> None:
    """Averaging a percent gauge across pods weighs a quiet pod like a busy one: sum the counters, then divide."""
    exprs = panel_expressions(dashboard)
    everything = " ".join(e for group in exprs.values() for e in group)
    assert "cache_hit_rate" not in everything and not re.search(r"\bavg\b", everything)
    (hit_rate,) = exprs["Cache hit rate (fresh hits / lookups)"]
    assert re.fullmatch(counter_ratio("service", ("cache_requests_total", 'result="hit"'),
                                      ("cache_requests_total", 'result!="bypass"')), hit_rate), hit_rate
    (errors,) = exprs["Upstream error ratio"]
    assert re.fullmatch(counter_ratio("service, provider", ("external_request_errors_total", ""),
                                      ("external_requests_total", "")), errors), errors


def counter_ratio(by: str, numerator: tuple[str, str], denominator: tuple[str, str]) -> str:
    """A regex of `sum by (by) (rate(name{..., matcher}[$__rate_interval]))`, one divided by the other."""
    def part(name: str, matcher: str) -> str:
        return rf"sum by \({re.escape(by)}\) \(rate\({name}\{{[^}}]*{re.escape(matcher)}\}}\[\$__rate_interval\]\)\)"
    return part(*numerator) + " / " + part(*denominator)


def test_dashboard_has_the_panels_operators_need(dashboard: dict) -> None:
    exprs = " ".join(e for group in panel_expressions(dashboard).values() for e in group)
    for needed in ("proxy_requests_total", "external_request_errors_total", "circuit_breaker_open",
                   "cache_requests_total", "stale_served_total", "retries_total", "retry_budget_exhausted_total",
                   "fallbacks_total", "cache_backend_up", "api_key_rotations_total", "upstream_rests_total",
                   "upstream_rest_until_seconds", "events_emitted_total", "event_deliveries_total",
                   "event_redeliveries_total", "event_acks_total", "event_dead_letters_total",
                   "event_clients_dropped_total", "event_subscribers", "outbox_length",
                   "outbox_oldest_unacked_age_seconds"):
        assert re.search(rf"(?<![\w:]){needed}\{{", exprs), needed
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (service, provider, le) " \
               f"(rate(external_request_duration_seconds_bucket" in exprs


def test_dashboard_panels_use_only_exported_metrics(dashboard: dict, exported: set[str]) -> None:
    for title, exprs in panel_expressions(dashboard).items():
        assert exprs, title
        for expr in exprs:
            names = metric_names(expr)
            assert names, (title, expr)
            assert names <= exported, (title, names - exported)
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        if variable["type"] == "datasource":
            continue
        match = re.fullmatch(r"label_values\((\w+)(?:\{[^}]*\})?,\s*\w+\)", query)
        assert match and match.group(1) in exported, variable["name"]
