"""The words of ADR-003: circuit states, the open-circuit error, and a breaker's settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any


class CircuitState(StrEnum):
    """Where a circuit is: passing calls, refusing them, or letting probes through."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(IntEnum):
    """What a guarded call told the breaker about its dependency."""

    SUCCESS = 0
    FAILURE = 1
    # The call ended without an answer from the dependency (e.g. KeyboardInterrupt):
    # free its probe slot, count nothing.
    IGNORED = 2


class CircuitBreakerOpenError(Exception):
    """Raised instead of calling the dependency while its circuit refuses calls."""

    def __init__(self, name: str, state: CircuitState, retry_after: float) -> None:
        super().__init__(name, state, retry_after)
        self.name = name
        self.state = state
        self.retry_after = retry_after

    def __str__(self) -> str:
        # Built on demand: a refused call should cost little, and most are never printed.
        return (
            f"Circuit breaker {self.name} is {self.state.value}; "
            f"retry after {self.retry_after:.3f}s"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.state, self.retry_after))


# A caller turned away in HALF_OPEN waits this long (capped by the timeout) before asking
# again: long enough for a probe to answer, short enough to follow a recovery closely.
HALF_OPEN_RETRY_SECONDS = 1.0


# With no max_timeout_seconds, an opening lasts at most this many base timeouts, however
# often probes fail and whatever wait the dependency asks for.
DEFAULT_MAX_TIMEOUT_FACTOR = 10.0


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The thresholds, timings and policies of one circuit, validated on construction.

    The ADR-003 policy (consecutive failures, a fixed open timeout, consecutive probe
    successes) is what the defaults give. The rest is optional: open-duration backoff, a
    failure-rate window and slow calls, each off until set.
    """

    failure_threshold: int = 3
    timeout_seconds: float = 30.0
    success_threshold: int = 2
    half_open_max_calls: int = 2
    # How long a probe slot stays taken when its holder never reports (a dead process).
    probe_lease_seconds: float | None = None
    # Each consecutive re-open from HALF_OPEN multiplies the open duration by this much.
    open_backoff: float = 1.0
    # The longest an opening lasts (backoff and a dependency's Retry-After included).
    max_timeout_seconds: float | None = None
    # Open when at least minimum_calls outcomes over the last window_seconds were recorded
    # and this share of them failed (None: no failure-rate rule).
    failure_rate_threshold: float | None = None
    window_seconds: float = 30.0
    minimum_calls: int = 10
    # A call longer than this (admission to report) is slow (None: no slow-call rule).
    slow_call_seconds: float | None = None
    # Open when this share of the window's calls were slow; 1.0 when left out.
    slow_call_rate_threshold: float | None = None

    def __post_init__(self) -> None:
        for field in ("failure_threshold", "success_threshold", "half_open_max_calls",
                      "minimum_calls"):
            _check_count(field, getattr(self, field))
        for field in ("timeout_seconds", "window_seconds"):
            _check_duration(field, getattr(self, field))
            object.__setattr__(self, field, float(getattr(self, field)))
        for field in ("probe_lease_seconds", "max_timeout_seconds", "slow_call_seconds"):
            if getattr(self, field) is not None:
                _check_duration(field, getattr(self, field))
                object.__setattr__(self, field, float(getattr(self, field)))
        for field in ("failure_rate_threshold", "slow_call_rate_threshold"):
            if getattr(self, field) is not None:
                _check_share(field, getattr(self, field))
                object.__setattr__(self, field, float(getattr(self, field)))
        _check_backoff(self.open_backoff)
        object.__setattr__(self, "open_backoff", float(self.open_backoff))
        if self.max_timeout_seconds is not None and self.max_timeout_seconds < self.timeout_seconds:
            raise ValueError(
                f"max_timeout_seconds must be >= timeout_seconds ({self.timeout_seconds!r}), "
                f"got {self.max_timeout_seconds!r}"
            )
        if self.slow_call_rate_threshold is not None and self.slow_call_seconds is None:
            raise ValueError(
                "slow_call_rate_threshold needs slow_call_seconds: without it no call is slow"
            )

    @property
    def lease_seconds(self) -> float:
        """Return the probe lease, defaulting to the open timeout."""
        if self.probe_lease_seconds is None:
            return self.timeout_seconds
        return self.probe_lease_seconds

    @property
    def half_open_retry_after(self) -> float:
        """Return how long a caller turned away in HALF_OPEN should wait."""
        return min(HALF_OPEN_RETRY_SECONDS, self.timeout_seconds)

    @property
    def max_open_seconds(self) -> float:
        """Return the longest an opening can last: the cap on backoff and Retry-After."""
        if self.max_timeout_seconds is None:
            return self.timeout_seconds * DEFAULT_MAX_TIMEOUT_FACTOR
        return self.max_timeout_seconds

    @property
    def slow_rate(self) -> float | None:
        """Return the slow-call share that opens the circuit, None without a slow-call rule."""
        if self.slow_call_seconds is None:
            return None
        return 1.0 if self.slow_call_rate_threshold is None else self.slow_call_rate_threshold

    @property
    def windowed(self) -> bool:
        """Return True if a rate rule needs the window of recent outcomes."""
        return self.failure_rate_threshold is not None or self.slow_call_seconds is not None

    def open_seconds(self, reopens: int) -> float:
        """Return how long an opening lasts after reopens consecutive failed probes."""
        if reopens == 0 or self.open_backoff == 1.0:
            return self.timeout_seconds
        try:
            seconds = self.timeout_seconds * self.open_backoff**reopens
        except OverflowError:
            seconds = math.inf
        return min(seconds, self.max_open_seconds)

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-serialisable values, defaults filled in."""
        return {
            "failure_threshold": self.failure_threshold,
            "timeout_seconds": self.timeout_seconds,
            "success_threshold": self.success_threshold,
            "half_open_max_calls": self.half_open_max_calls,
            "probe_lease_seconds": self.lease_seconds,
            "open_backoff": self.open_backoff,
            "max_timeout_seconds": self.max_open_seconds,
            "failure_rate_threshold": self.failure_rate_threshold,
            "window_seconds": self.window_seconds,
            "minimum_calls": self.minimum_calls,
            "slow_call_seconds": self.slow_call_seconds,
            "slow_call_rate_threshold": self.slow_rate,
        }


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


def _check_duration(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


def _check_share(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a share of calls in (0, 1], got {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be a share of calls in (0, 1], got {value!r}")


def _check_backoff(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"open_backoff must be a number >= 1, got {value!r}")
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"open_backoff must be a finite number >= 1, got {value!r}")


def dependency_wait(exc: BaseException | None) -> float:
    """Return the wait an exception says its dependency asked for (a retry_after), or 0."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    if not math.isfinite(value) or value <= 0:
        return 0.0
    return float(value)


def check_name(name: object) -> str:
    """Return a valid breaker name or raise ValueError saying what is wrong."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ValueError(f"name must be a non-empty string of at most 200 chars, got {name!r}")
    if any(ch.isspace() or ch in "{}" for ch in name):
        raise ValueError(f"name must not contain whitespace or braces, got {name!r}")
    return name
