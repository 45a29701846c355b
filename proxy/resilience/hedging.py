"""When a late attempt is hedged, and how late is late: the pure half of hedging (no I/O).

A request that has no copy to fall back on waits for its upstream's answer. When the upstream is
later than usual, the same (safe) request also goes to the next upstream and the first good answer
wins: one slow or hanging vendor then costs a caller `hedge_after`, not a whole attempt timeout.
"Later than usual" is, by default, the upstream's recent p95 latency with a floor, so only the
slowest few percent of a healthy upstream's answers are hedged, and every request to a hanging
one is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HEDGE_FLOOR = 0.1  # seconds: never hedge sooner, whatever the recent latency says


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    """`after`: a fixed wait in seconds, or None for the upstream's recent p95 (at least `floor`)."""

    after: float | None = None
    floor: float = HEDGE_FLOOR

    def __post_init__(self) -> None:
        for name in ("after", "floor"):
            value = getattr(self, name)
            if value is None and name == "after":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"hedge {name} must be a positive number of seconds, got {value!r}")

    def delay(self, recent_p95: float | None) -> float:
        """How long an attempt may take before it is hedged."""
        if self.after is not None:
            return self.after
        return max(self.floor, recent_p95 or 0.0)


HEDGE_AUTO = HedgePolicy()


class LatencyWindow:
    """The durations of an upstream's last `size` answers, and their p95.

    Only answers count: a timeout says nothing about how long an answer takes, and counting it
    would raise the p95 until a hanging upstream was never hedged. The p95 is recomputed every
    `every` answers, so reading it costs nothing on the request path.
    """

    __slots__ = ("_samples", "_next", "_count", "_size", "_every", "_p95")

    def __init__(self, size: int = 200, every: int = 20) -> None:
        if size < 1 or every < 1:
            raise ValueError("size and every must be at least 1")
        self._samples: list[float] = []
        self._next = 0
        self._count = 0
        self._size = size
        self._every = every
        self._p95: float | None = None

    def add(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        if len(self._samples) < self._size:
            self._samples.append(seconds)
        else:
            self._samples[self._next] = seconds
            self._next = (self._next + 1) % self._size
        self._count += 1
        if self._p95 is None or self._count % self._every == 0:
            self._p95 = _percentile(self._samples, 0.95)

    @property
    def p95(self) -> float | None:
        """The p95 of the answers kept, or None before the first one."""
        return self._p95


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]
