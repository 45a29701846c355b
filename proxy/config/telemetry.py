"""The route table's `metrics:` and `tracing:` sections (what the proxy tells about itself).

    metrics:
      prefix: team_a          # every metric name gets `team_a_` in front (default: none)
    tracing:
      otlp_endpoint: http://otel-collector:4318   # spans over OTLP/HTTP; absent: no spans, no OpenTelemetry import
      service_name: fx-sidecar                    # resource `service.name` (default: resilience-proxy)
"""

from __future__ import annotations

import re
from typing import Any

from yarl import URL

from proxy.config.checker import Checker
from proxy.config.model import MetricsSettings, TracingSettings
from proxy.config.yaml_source import LineDict, line_of

PREFIX_PATTERN = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]*$")  # a metric name part: `{prefix}_proxy_requests_total`

METRICS_KEYS = {"prefix"}  # the fields of MetricsSettings (tests/config/test_config_model.py holds them equal)
TRACING_KEYS = {"otlp_endpoint", "service_name"}


def _prefix(value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not PREFIX_PATTERN.match(value):
        raise ValueError(f"expected letters, digits and _ starting with a letter (a Prometheus name part), got {value!r}")
    return value


def _endpoint(value: Any) -> str | None:
    if value in (None, False, "off"):
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected an http(s) URL, got {type(value).__name__}")
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host or url.user or url.password:
        raise ValueError("expected an http:// or https:// URL with a host and no credentials "
                         "(e.g. http://otel-collector:4318)")
    if url.path in ("", "/"):
        url = url.with_path("/v1/traces")
    return str(url)


def _service_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200 or not value.isprintable():
        raise ValueError("expected a non-empty name of at most 200 printable characters")
    return value


def parse_metrics(check: Checker, root: LineDict) -> MetricsSettings:
    """The `metrics:` section, problems reported to `check`."""
    data = check.mapping(root.get("metrics"), "metrics", line_of(root, "metrics"))  # absent: an empty one
    if data is None:
        return MetricsSettings()
    check.known_keys(data, METRICS_KEYS, "metrics")
    return MetricsSettings(prefix=check.get(data, "prefix", "metrics", _prefix, ""))


def parse_tracing(check: Checker, root: LineDict) -> TracingSettings:
    """The `tracing:` section, problems reported to `check`."""
    data = check.mapping(root.get("tracing"), "tracing", line_of(root, "tracing"))  # absent: an empty one
    if data is None:
        return TracingSettings()
    check.known_keys(data, TRACING_KEYS, "tracing")
    defaults = TracingSettings()
    return TracingSettings(
        otlp_endpoint=check.get(data, "otlp_endpoint", "tracing", _endpoint, None),
        service_name=check.get(data, "service_name", "tracing", _service_name, defaults.service_name))
