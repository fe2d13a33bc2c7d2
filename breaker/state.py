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


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The thresholds and timings of one circuit, validated on construction."""

    failure_threshold: int = 3
    timeout_seconds: float = 30.0
    success_threshold: int = 2
    half_open_max_calls: int = 2
    # How long a probe slot stays taken when its holder never reports (a dead process).
    probe_lease_seconds: float | None = None

    def __post_init__(self) -> None:
        for field in ("failure_threshold", "success_threshold", "half_open_max_calls"):
            _check_count(field, getattr(self, field))
        _check_duration("timeout_seconds", self.timeout_seconds)
        object.__setattr__(self, "timeout_seconds", float(self.timeout_seconds))
        if self.probe_lease_seconds is not None:
            _check_duration("probe_lease_seconds", self.probe_lease_seconds)
            object.__setattr__(self, "probe_lease_seconds", float(self.probe_lease_seconds))

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

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-serialisable values."""
        return {
            "failure_threshold": self.failure_threshold,
            "timeout_seconds": self.timeout_seconds,
            "success_threshold": self.success_threshold,
            "half_open_max_calls": self.half_open_max_calls,
            "probe_lease_seconds": self.lease_seconds,
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


def check_name(name: object) -> str:
    """Return a valid breaker name or raise ValueError saying what is wrong."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ValueError(f"name must be a non-empty string of at most 200 chars, got {name!r}")
    if any(ch.isspace() or ch in "{}" for ch in name):
        raise ValueError(f"name must not contain whitespace or braces, got {name!r}")
    return name
