"""The window of recent outcomes that the rate rules read: time buckets, as resilience4j's.

MemoryStore keeps one Window per circuit; RedisStore keeps the same buckets in a hash
(breaker/lua/common.lua), so both count the same calls in the same buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The window is this many buckets, the current one included: it covers between
# (BUCKETS - 1) / BUCKETS of window_seconds and all of it. common.lua says the same.
BUCKETS = 10


def bucket_ms(window_seconds: float) -> int:
    """Return the width of one bucket in whole milliseconds (at least 1)."""
    return max(1, round(window_seconds * 1000 / BUCKETS))


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """The outcomes in a window: calls, and how many failed and how many were slow."""

    calls: int = 0
    failures: int = 0
    slow_calls: int = 0

    def failure_rate(self) -> float:
        """Return the share of calls that failed, 0.0 with no calls."""
        return self.failures / self.calls if self.calls else 0.0

    def slow_call_rate(self) -> float:
        """Return the share of calls that were slow, 0.0 with no calls."""
        return self.slow_calls / self.calls if self.calls else 0.0

    def as_dict(self, window_seconds: float) -> dict[str, float | int]:
        """Return the counts and rates as published in a snapshot."""
        return {
            "seconds": window_seconds,
            "calls": self.calls,
            "failures": self.failures,
            "slow_calls": self.slow_calls,
            "failure_rate": round(self.failure_rate(), 4),
            "slow_call_rate": round(self.slow_call_rate(), 4),
        }


class Window:
    """Counts of outcomes per time bucket; buckets older than the window are dropped."""

    __slots__ = ("_buckets", "_current", "_epoch")

    def __init__(self) -> None:
        # bucket number (time in ms // bucket width) -> [calls, failures, slow calls]
        self._buckets: dict[int, list[int]] = {}
        # The bucket calls were last added to, and its number: most calls land there.
        self._epoch = -1
        self._current = [0, 0, 0]

    def add(self, now: float, width_ms: int, failed: bool, slow: bool) -> None:
        """Count a call that ended now, in buckets width_ms wide."""
        epoch = math.floor(now * 1000 / width_ms)
        if epoch != self._epoch:
            for old in [e for e in self._buckets if e <= epoch - BUCKETS]:
                del self._buckets[old]
            self._epoch = epoch
            self._current = self._buckets.setdefault(epoch, [0, 0, 0])
        bucket = self._current
        bucket[0] += 1
        bucket[1] += failed
        bucket[2] += slow

    def counts(self, now: float, width_ms: int) -> WindowCounts:
        """Return the outcomes of the buckets the window covers now."""
        epoch = math.floor(now * 1000 / width_ms)
        calls = failures = slow = 0
        for e, (n, f, s) in self._buckets.items():
            if epoch - BUCKETS < e <= epoch:
                calls, failures, slow = calls + n, failures + f, slow + s
        return WindowCounts(calls, failures, slow)

    def clear(self) -> None:
        """Forget every outcome (on a transition, as resilience4j does)."""
        self._buckets.clear()
        self._epoch = -1
