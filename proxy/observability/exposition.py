"""What a scrape of the metrics port shows besides the proxy's own series.

The sidecar's own facts (`build_info`, the process's memory and CPU, the Python runtime) sit
in the same registry as the proxy's series. `Exposition` is what a scrape reads: the registry
without `_created` samples (a timestamp per series that doubles what is stored and that no rule
of ours reads), with every name prefixed when `metrics.prefix` is set (a Prometheus server
shared by many teams). Both are done at exposition, on this registry only: nothing changes
prometheus_client's process-wide settings.
"""

from __future__ import annotations

import platform
from typing import Any, Iterator

import aiohttp
from prometheus_client import CollectorRegistry, GCCollector, Gauge, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import Metric

import proxy
from proxy.config.telemetry import PREFIX_PATTERN

_WITH_CREATED = frozenset({"counter", "histogram", "summary"})


def add_runtime_collectors(registry: CollectorRegistry) -> None:
    """`build_info`, `process_*` (RSS, CPU, open fds, start time), `python_info` and `python_gc_*`."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    build = Gauge("build_info", "The running build: proxy version, Python and aiohttp versions (always 1).",
                  ("version", "python", "aiohttp"), registry=registry)
    build.labels(proxy.__version__, platform.python_version(), aiohttp.__version__).set(1)


class Exposition:
    """The registry as a scrape sees it (pass it to `generate_latest` in place of the registry)."""

    def __init__(self, registry: CollectorRegistry, prefix: str = "") -> None:
        self._registry = registry
        self.prefix = prefix

    @property
    def prefix(self) -> str:
        return self._prefix

    @prefix.setter
    def prefix(self, value: str) -> None:
        if value and not PREFIX_PATTERN.match(value):
            raise ValueError(f"metric prefix {value!r}: letters, digits and _, starting with a letter")
        self._prefix = f"{value}_" if value else ""

    def collect(self) -> Iterator[Any]:
        prefix = self._prefix
        for metric in self._registry.collect():
            samples = metric.samples
            if metric.type in _WITH_CREATED:
                created = metric.name + "_created"
                samples = [s for s in samples if s.name != created]
            if not prefix:
                metric.samples = samples
                yield metric
                continue
            renamed = Metric(prefix + metric.name, metric.documentation, metric.type, metric.unit)
            renamed.samples = [s._replace(name=prefix + s.name) for s in samples]
            yield renamed
