"""The parts under `Metrics` that hold counts, not series: no prometheus_client here.

`Labelled` caches a labelled metric's children; `Pending` gathers one second of per-request
counts as plain integers (the fast path adds to it without locks), folded into the series by
`add_observations` and `Labelled`; `HitWindow` keeps the hits and lookups behind `cache_hit_rate`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Any, Callable

HIT_RATE_WINDOW = 300  # seconds: `cache_hit_rate` is "the last 5 minutes"


class Labelled:
    """One labelled metric plus a cache of its children, so the hot path skips `.labels()`."""

    __slots__ = ("metric", "children", "buckets")

    def __init__(self, metric: Any, buckets: tuple[float, ...] = ()) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}
        self.buckets = buckets  # a histogram's upper bounds (what `Pending.observe` counts into)

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child

    def drop(self, matches: Callable[[tuple[str, ...]], bool]) -> None:
        for key in [key for key in self.children if matches(key)]:
            del self.children[key]
            self.metric.remove(*key)


class HitWindow:
    """Cache hits and lookups per second of the monotonic clock, for the last `HIT_RATE_WINDOW` s."""

    __slots__ = ("seconds", "hits", "lookups")

    def __init__(self) -> None:
        self.seconds: deque[list[int]] = deque()  # [second, hits, lookups], oldest first
        self.hits = 0
        self.lookups = 0

    def add(self, second: int, hit: bool, count: int = 1) -> None:
        if self.seconds and self.seconds[-1][0] == second:
            slot = self.seconds[-1]
        else:
            slot = [second, 0, 0]
            self.seconds.append(slot)
        hits = count if hit else 0
        slot[1] += hits
        slot[2] += count
        self.hits += hits
        self.lookups += count

    def expire(self, second: int) -> None:
        oldest_kept = second - HIT_RATE_WINDOW + 1
        while self.seconds and self.seconds[0][0] < oldest_kept:
            _, hits, lookups = self.seconds.popleft()
            self.hits -= hits
            self.lookups -= lookups

    def percent(self) -> float | None:
        return 100.0 * self.hits / self.lookups if self.lookups else None


class Pending:
    """Per-request counts not yet added to the Prometheus series: plain integers, no locks.

    One instance covers one second of the monotonic clock (so `cache_hit_rate` windows stay
    exact); it is folded into the real series when the second changes and before anything
    reads them (a scrape, `render()`, `hit_rate()`, any collection of the registry).
    """

    __slots__ = ("second", "counts", "histograms", "lookups")

    def __init__(self, second: int) -> None:
        self.second = second
        self.counts: dict[tuple[Labelled, tuple[str, ...]], int] = {}
        self.histograms: dict[tuple[Labelled, tuple[str, ...]], list[Any]] = {}  # [bucket counts, sum]
        self.lookups: dict[str, list[int]] = {}  # service -> [hits, lookups], bypasses not included

    def count(self, family: Labelled, labels: tuple[str, ...], n: int = 1) -> None:
        key = (family, labels)
        counts = self.counts
        counts[key] = counts.get(key, 0) + n

    def observe(self, family: Labelled, labels: tuple[str, ...], value: float) -> None:
        key = (family, labels)
        slot = self.histograms.get(key)
        buckets = family.buckets
        if slot is None:
            slot = self.histograms[key] = [[0] * (len(buckets) + 1), 0.0]
        slot[0][bisect_left(buckets, value)] += 1
        slot[1] += value

    def lookup(self, service: str, hit: bool) -> None:
        tally = self.lookups.get(service)
        if tally is None:
            tally = self.lookups[service] = [0, 0]
        if hit:
            tally[0] += 1
        tally[1] += 1


def add_observations(histogram: Any, buckets: list[int], total: float, bounds: tuple[float, ...]) -> None:
    """Add counted observations to a histogram child: per-bucket counts and their sum."""
    try:
        slots, total_value = histogram._buckets, histogram._sum
    except AttributeError:  # a prometheus_client without these internals: observe one by one
        for index, count in enumerate(buckets):
            bound = bounds[index] if index < len(bounds) else bounds[-1] * 2
            for _ in range(count):
                histogram.observe(bound)
        return
    for index, count in enumerate(buckets):
        if count:
            slots[index].inc(count)
    total_value.inc(total)
