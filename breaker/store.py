"""The interface between a CircuitBreaker and the place its circuit's state lives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from breaker.state import BreakerConfig, CircuitState, Outcome
from breaker.window import WindowCounts

# (generation, probe lease): what an admitted call hands back when it reports its outcome.
Ticket = tuple[int, Any]

# Called once per transition, by the process whose operation made it, outside any lock:
# (from_state, to_state, cause, count, open_seconds). Causes of an opening: "failures"
# (count: consecutive failures), "failure_rate" and "slow_calls" (count: calls in the
# window; "slow_calls" from HALF_OPEN is a slow probe), "probe_failed", "retry_after" (the
# failure that opened it carried the dependency's own wait), "forced"; of other moves:
# "timeout", "recovered" (count: consecutive successes), "reset". open_seconds: how long
# an opening lasts, 0.0 for other moves.
TransitionHook = Callable[[CircuitState, CircuitState, str, int, float], None]

OPEN_CAUSES = ("failures", "failure_rate", "slow_calls", "probe_failed", "retry_after", "forced")

STATES = (CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN)


@dataclass(frozen=True, slots=True)
class StateView:
    """A circuit's state as last seen by its store."""

    state: CircuitState
    retry_after: float
    failure_count: int
    success_count: int


@dataclass(frozen=True, slots=True)
class PolicyView:
    """What the policies beyond ADR-003 add to a snapshot."""

    open_duration: float
    reopens: int
    open_cause: str | None
    openings: dict[str, int]
    slow_calls: int
    window: WindowCounts | None


class Circuit(Protocol):
    """One named circuit in a store, bound to the settings of the breaker that uses it."""

    # The clock that times calls for the slow-call rule (seconds, monotonic).
    clock: Callable[[], float]

    def admit(self) -> Ticket:
        """Admit a call or raise CircuitBreakerOpenError."""

    def record(
        self, ticket: Ticket, outcome: Outcome, slow: bool = False, retry_after: float = 0.0
    ) -> None:
        """Report how an admitted call ended: slow or not, and the wait a failure asked for."""

    def view(self) -> StateView:
        """Return the current state without changing it."""

    def reset(self) -> None:
        """Force CLOSED with cleared consecutive counts."""

    def force_open(self) -> None:
        """Force OPEN now."""

    def snapshot(self) -> dict[str, Any]:
        """Return the state and running totals as a JSON-serialisable dict."""


class Store(Protocol):
    """Where circuits live: one process (MemoryStore) or every process on a Redis."""

    kind: str

    def bind(
        self,
        name: str,
        config: BreakerConfig,
        on_transition: TransitionHook,
        clock: Callable[[], float] | None = None,
    ) -> Circuit:
        """Return the circuit called name, created closed if new."""

    def names(self) -> list[str]:
        """Return the names of every circuit this store knows."""


def build_snapshot(
    name: str,
    config: BreakerConfig,
    view: StateView,
    totals: dict[str, int],
    transitions: dict[str, int],
    seconds_in_state: dict[str, float],
    opened_at: float | None,
    store: str,
    policy: PolicyView,
) -> dict[str, Any]:
    """Return the published form of one circuit (CONTRACT.md section 5, docs/design.md)."""
    window = None
    if policy.window is not None:
        window = policy.window.as_dict(config.window_seconds)
    return {
        "name": name,
        "state": view.state.value,
        "failure_count": view.failure_count,
        "success_count": view.success_count,
        "retry_after": round(view.retry_after, 3),
        "opened_at": opened_at,
        "calls": totals["successes"] + totals["failures"],
        "successes": totals["successes"],
        "failures": totals["failures"],
        "rejected": totals["rejected"],
        "half_open_successes": totals["half_open_successes"],
        "half_open_failures": totals["half_open_failures"],
        "transitions": dict(sorted(transitions.items())),
        "seconds_in_state": {s.value: round(seconds_in_state.get(s.value, 0.0), 3) for s in STATES},
        "config": config.as_dict(),
        "store": store,
        "open_duration": round(policy.open_duration, 3),
        "reopens": policy.reopens,
        "open_cause": policy.open_cause,
        "openings": {cause: n for cause, n in sorted(policy.openings.items()) if n},
        "slow_calls": policy.slow_calls,
        "window": window,
    }
