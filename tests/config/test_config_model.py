"""The typed model is the one place a config key lives: the sections read its fields, and `check` prints
the effective config from it, so a key added to the model cannot be forgotten in `check`'s output."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
import yaml

from proxy.config.effective import NOT_SHOWN, render
from proxy.config.model import (
    CacheRule,
    CacheSettings,
    Config,
    Defaults,
    EventsSettings,
    MetricsSettings,
    RetryBudgetSettings,
    Route,
    SentinelSettings,
    ServerSettings,
    Service,
    TlsSettings,
    TracingSettings,
    Upstream,
)
from proxy.config.parse import CACHE_FIELDS, ConfigError, EVENTS_FIELDS, RETRY_BUDGET_FIELDS, SERVER_FIELDS, keys_of, load_config, parse_config
from proxy.config.telemetry import METRICS_KEYS, TRACING_KEYS
from proxy.masking import Masker
from proxy.resilience.breaker_policy import BreakerPolicy
from proxy.resilience.retry_policy import RetryPolicy

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
# Every kind of value `check` prints: secrets in a URL, a path, a query, a header, a Redis password and a
# route's path; numbers and escapes as written; result codes; routes switched off; derived and watched routes.
ENV = {"REDIS_PASSWORD": "hunter2hunter2", "FX_HOST": "api.vendor.example", "FX_KEY": "k%2Fey9",
       "FX_TOKEN": "tok-123456", "FX_KEY_1": "key-one-1", "FX_KEY_2": ""}
MINIMAL = "version: 1\nservices:\n  fx:\n    upstreams: [{name: fx_primary, url: 'https://p.example'}]\n"
# Fields `check` prints under the key routes.yaml spells them with.
SPELLED = {"fallback_first": "fallback_before_retry", "hedge": "hedge_after", "pattern": "match"}
# Fields printed only once set (the golden file leaves them at their defaults); see test_redis_shapes_print_once_set.
ONLY_ONCE_SET = {(CacheSettings, "cluster"), (CacheSettings, "sentinel"), (CacheSettings, "tls"),
                 (BreakerPolicy, "shared")}


def printed_keys(struct: type, *, unset: bool = True) -> list[str]:
    """The keys `check` prints for `struct`, in order; `unset`: with the ONLY_ONCE_SET fields at their defaults."""
    return [SPELLED.get(item.name, item.name) for item in fields(struct)
            if (struct, item.name) not in NOT_SHOWN and not (unset and (struct, item.name) in ONLY_ONCE_SET)]


def dump(effective: object) -> str:
    return yaml.safe_dump(dict(effective), sort_keys=False, default_flow_style=False)  # as `check` prints it


def test_check_prints_what_it_printed_before_the_model_drove_it():
    # The expected text was printed by the code before the split (commit 13ade3e), byte for byte; the `metrics`
    # and `tracing` sections at its end came later (issue 20), written by hand from the values in the file.
    config = load_config(GOLDEN / "effective_config.yaml", ENV)
    printed = dump(config.effective)
    assert printed == (GOLDEN / "effective_config.check.txt").read_text()
    for secret in ("hunter2hunter2", "api.vendor.example", "k%2Fey9", "k/ey9", "tok-123456", "key-one-1"):
        assert secret not in printed


def test_every_field_of_the_model_is_printed_in_its_order_or_said_why_not():
    effective = load_config(GOLDEN / "effective_config.yaml", ENV).effective
    assert list(effective) == ["version", "server", "upstream_client", "cache", "defaults", "services", "metrics",
                               "tracing"]
    assert list(effective["server"]) == printed_keys(ServerSettings)
    assert list(effective["cache"]) == printed_keys(CacheSettings)
    assert list(effective["defaults"]) == printed_keys(Defaults) + ["retry_budget"]
    assert list(effective["defaults"]["retry_budget"]) == printed_keys(RetryBudgetSettings)
    fx = effective["services"]["fx"]
    assert list(fx) == printed_keys(Service)
    assert list(fx["cache"]) == printed_keys(CacheRule)
    for route in fx["routes"]:
        assert list(route) == printed_keys(Route) and list(route["cache"]) == printed_keys(CacheRule)
    with_codes, without_codes = fx["upstreams"][1], fx["upstreams"][0]
    assert list(with_codes) == printed_keys(Upstream)
    assert list(without_codes) == [key for key in printed_keys(Upstream) if key != "result_codes"]
    # fx_primary has both rate-based trips on, so its breaker prints every field; fx_secondary's failure rate is off.
    assert list(without_codes["breaker"]) == printed_keys(BreakerPolicy)
    assert list(with_codes["breaker"]) == [name for name in printed_keys(BreakerPolicy)
                                           if name not in ("failure_rate", "window", "min_calls", "min_failures")]
    assert list(without_codes["retry"]) == [item.name for item in fields(RetryPolicy)]
    assert list(effective["metrics"]) == printed_keys(MetricsSettings)
    assert list(effective["tracing"]) == printed_keys(TracingSettings)
    shown_sections = {item.name for item in fields(Config) if (Config, item.name) not in NOT_SHOWN}
    assert shown_sections == {"server", "upstream_client", "cache", "defaults", "retry_budget", "services", "metrics",
                              "tracing"}


def test_every_field_check_leaves_out_exists_and_says_why():
    for (struct, name), reason in NOT_SHOWN.items():
        assert name in {item.name for item in fields(struct)}, (struct.__name__, name)
        assert len(reason) > 10, (struct.__name__, name)


def test_a_field_added_to_the_model_is_printed_with_no_change_to_the_renderer():
    @dataclass(frozen=True, slots=True, kw_only=True)
    class WithKnob(ServerSettings):
        knob: str = "on"

    config = parse_config(MINIMAL, "routes.yaml", {})
    widened = replace(config, server=WithKnob(**{f.name: getattr(config.server, f.name) for f in fields(ServerSettings)}))
    printed = render(widened, Masker())
    assert list(printed["server"]) == list(config.effective["server"]) + ["knob"]
    assert printed["server"]["knob"] == "on"
    assert printed["server"]["listen"] == "0.0.0.0:8080"  # the fields it extends print as before


def test_check_prints_the_typed_values_not_the_text_of_the_file():
    config = parse_config(MINIMAL, "routes.yaml", {})
    service = config.services["fx"]
    changed = replace(config, server=replace(config.server, max_connections=7),
                      services={"fx": replace(service, deadline=2.5, upstreams=(replace(service.upstreams[0], timeout=0.75),))})
    printed = render(changed, Masker())
    assert printed["server"]["max_connections"] == 7
    assert printed["services"]["fx"]["deadline"] == 2.5
    assert printed["services"]["fx"]["upstreams"][0]["timeout"] == 0.75
    assert config.effective["server"]["max_connections"] is None  # the parsed config's own rendering is untouched


def test_a_value_from_the_environment_is_masked_wherever_the_model_holds_it():
    config = parse_config("version: 1\ncache: {prefix: 'app-${TENANT}:'}\n" + MINIMAL.removeprefix("version: 1\n"),
                          "routes.yaml", {"TENANT": "acme-secret"})
    assert config.cache.prefix == "app-acme-secret:"
    assert config.effective["cache"]["prefix"] == "app-***:"
    assert render(config, Masker({"acme-secret"}))["cache"]["prefix"] == "app-***:"


def test_each_flat_section_reads_every_field_of_its_struct():
    # The keys a section accepts are its struct's fields; each is read by the section's table or by hand.
    assert {key for key, _ in SERVER_FIELDS} | {"metrics_listen"} == keys_of(ServerSettings)
    assert {key for key, _ in CACHE_FIELDS} | {"backend", "url", "sentinel", "tls"} == keys_of(CacheSettings)
    assert {key for key, _ in RETRY_BUDGET_FIELDS} | {"enabled"} == keys_of(RetryBudgetSettings)
    assert {key for key, _ in EVENTS_FIELDS} == keys_of(EventsSettings)
    assert METRICS_KEYS == keys_of(MetricsSettings) and TRACING_KEYS == keys_of(TracingSettings)


def test_a_flat_section_names_its_struct_fields_when_a_key_is_unknown():
    config_text = "version: 1\nevents: {max_topic: 5}\n" + MINIMAL.removeprefix("version: 1\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(config_text, "routes.yaml", {})
    problems = caught.value.problems
    assert problems == [f"routes.yaml:2: events: unknown key 'max_topic' (allowed: {', '.join(sorted(keys_of(EventsSettings)))})"]
    assert "max_topics_per_peer" in problems[0]


def test_redis_shapes_print_once_set_in_their_place_with_the_sentinel_password_masked(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    services = MINIMAL.removeprefix("version: 1\n").replace("url: 'https://p.example'",
                                                             "url: 'https://p.example', breaker: {profile: FAST, shared: true}")
    cluster = parse_config("version: 1\ncache: {backend: redis, url: 'redis://10.0.0.5:7000', cluster: true}\n" + services,
                           "routes.yaml", {})
    assert list(cluster.effective["cache"]) == [key for key in printed_keys(CacheSettings, unset=False)
                                                if key not in ("sentinel", "tls")]
    assert cluster.effective["cache"]["cluster"] is True
    breaker = cluster.effective["services"]["fx"]["upstreams"][0]["breaker"]
    assert list(breaker) == [key for key in printed_keys(BreakerPolicy, unset=False)
                             if key not in ("slow_call_duration", "slow_call_rate")]  # FAST has no slow-call trip
    assert breaker["shared"] is True

    sentinel = parse_config("version: 1\ncache: {backend: redis, sentinel: {hosts: ['10.0.0.1:26379'], "
                            "service: mymaster, db: 2, password: '${REDIS_PASSWORD}', "
                            "sentinel_password: '${SENTINEL_PASSWORD}'}, tls: {ca_file: '" + str(ca) + "'}}\n"
                            + MINIMAL.removeprefix("version: 1\n"), "routes.yaml",
                            {"REDIS_PASSWORD": "hunter2hunter2", "SENTINEL_PASSWORD": "sentinel-hunter3"})
    printed = sentinel.effective["cache"]
    assert list(printed) == [key for key in printed_keys(CacheSettings, unset=False) if key not in ("url", "cluster")]
    assert list(printed["sentinel"]) == printed_keys(SentinelSettings) and list(printed["tls"]) == printed_keys(TlsSettings)
    assert printed["sentinel"] == {"hosts": ["10.0.0.1:26379"], "service": "mymaster", "db": 2, "password": "***",
                                   "sentinel_password": "***"}
    assert sentinel.cache.sentinel.sentinel_password == "sentinel-hunter3"
    assert {"hunter2hunter2", "sentinel-hunter3"} <= sentinel.secrets  # masked in every log line too
    assert printed["tls"] == {"ca_file": str(ca), "cert_file": None, "key_file": None}
    assert "hunter2hunter2" not in dump(sentinel.effective)
    assert "fleet" not in dump(parse_config(MINIMAL, "routes.yaml", {}).effective)
    no_password = replace(sentinel, cache=replace(sentinel.cache, sentinel=SentinelSettings(hosts=(("h", 1),), service="m")))
    assert render(no_password, Masker())["cache"]["sentinel"]["password"] == ""
    assert render(no_password, Masker())["cache"]["sentinel"]["sentinel_password"] == ""
