"""CircuitBreaker: guard calls to a dependency with a circuit kept in a store."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

from breaker.memory import MemoryStore
from breaker.state import BreakerConfig, CircuitBreakerOpenError, CircuitState, Outcome, check_name
from breaker.store import Circuit, Store, Ticket

log = logging.getLogger("breaker")

SUCCESS, FAILURE, IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED

P = ParamSpec("P")
R = TypeVar("R")

_MESSAGES = {
    "failures": "Circuit breaker {name} opened after {count} failures",
    "probe_failed": "Circuit breaker {name} opened again after a failed probe",
    "timeout": "Circuit breaker {name} entering half-open state",
    "recovered": "Circuit breaker {name} closed after successful recovery",
    "reset": "Circuit breaker {name} closed by an operator reset",
    "forced": "Circuit breaker {name} forced open by an operator",
}


class CircuitBreakerListener:
    """Hooks called outside any lock; override the ones you need."""

    def state_change(
        self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState, cause: str
    ) -> None:
        """Call after a transition made by this process."""

    def success(self, breaker: CircuitBreaker) -> None:
        """Call after a guarded call the breaker counted as a success."""

    def failure(self, breaker: CircuitBreaker, exc: BaseException | None) -> None:
        """Call after a guarded call the breaker counted as a failure."""

    def rejected(self, breaker: CircuitBreaker, error: CircuitBreakerOpenError) -> None:
        """Call after a call was refused without reaching the dependency."""


class Permit:
    """The right to make one call, and the means to report how it ended (two-step use)."""

    __slots__ = ("_breaker", "_ticket", "state")

    def __init__(self, breaker: CircuitBreaker, ticket: Ticket, state: CircuitState) -> None:
        self._breaker = breaker
        self._ticket: Ticket | None = ticket
        self.state = state

    @property
    def is_probe(self) -> bool:
        """Return True if this call is a HALF_OPEN probe."""
        return self.state is CircuitState.HALF_OPEN

    def success(self) -> None:
        """Report that the dependency answered."""
        self._finish(SUCCESS, None)

    def failure(self, exc: BaseException | None = None) -> None:
        """Report that the dependency failed, whatever is_failure would say."""
        self._finish(FAILURE, exc)

    def done(self, exc: BaseException | None = None) -> None:
        """Report the call's end: no error is a success, an error is judged by is_failure."""
        if exc is None:
            self._finish(SUCCESS, None)
        else:
            self._finish(self._breaker.classify(exc), exc)

    def release(self) -> None:
        """Give the permit back unused: free its probe slot, count nothing."""
        self._finish(IGNORED, None)

    def _finish(self, outcome: Outcome, exc: BaseException | None) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            raise RuntimeError(f"permit for circuit breaker {self._breaker.name} already used")
        self._breaker.report(ticket, outcome, exc)


class CircuitBreaker:
    """A circuit breaker (ADR-003) whose state lives in a store shared by name."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 3,
        timeout_seconds: float = 30.0,
        success_threshold: int = 2,
        half_open_max_calls: int = 2,
        store: Store | None = None,
        is_failure: Callable[[BaseException], bool] | None = None,
        clock: Callable[[], float] | None = None,
        *,
        probe_lease_seconds: float | None = None,
        listeners: Iterable[CircuitBreakerListener] = (),
    ) -> None:
        self.name = check_name(name)
        self.config = BreakerConfig(
            failure_threshold=failure_threshold,
            timeout_seconds=timeout_seconds,
            success_threshold=success_threshold,
            half_open_max_calls=half_open_max_calls,
            probe_lease_seconds=probe_lease_seconds,
        )
        if store is None:
            store = MemoryStore()
        elif not callable(getattr(store, "bind", None)):
            raise ValueError(f"store must be a MemoryStore or RedisStore, got {store!r}")
        if is_failure is not None and not callable(is_failure):
            raise ValueError(f"is_failure must be a callable(exc) -> bool, got {is_failure!r}")
        if clock is not None and not callable(clock):
            raise ValueError(f"clock must be a callable returning seconds, got {clock!r}")
        self.store = store
        self.is_failure = is_failure
        self.listeners: list[CircuitBreakerListener] = list(listeners)
        self._circuit: Circuit = store.bind(self.name, self.config, self._transitioned, clock)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name} on {self.store.kind}>"

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call fn through the breaker, or raise CircuitBreakerOpenError without calling it."""
        try:
            ticket = self._circuit.admit()
        except CircuitBreakerOpenError as error:
            self._rejected(error)
            raise
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.report(ticket, self.classify(exc), exc)
            raise
        self._circuit.record(ticket, SUCCESS)
        if self.listeners:
            for listener in self.listeners:
                listener.success(self)
        return result

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate fn so that every call goes through the breaker."""

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            return self.call(fn, *args, **kwargs)

        return guarded

    def allow(self) -> Permit:
        """Admit one call to be reported later, or raise CircuitBreakerOpenError."""
        ticket = self._admit()
        state = CircuitState.HALF_OPEN if ticket[1] else CircuitState.CLOSED
        return Permit(self, ticket, state)

    @property
    def state(self) -> CircuitState:
        """Return the current state; HALF_OPEN as soon as the timeout has run out."""
        return self._circuit.view().state

    @property
    def retry_after(self) -> float:
        """Return the seconds until a call may be tried again; 0.0 when one may be now."""
        return self._circuit.view().retry_after

    @property
    def failure_count(self) -> int:
        """Return the consecutive failures counted in CLOSED."""
        return self._circuit.view().failure_count

    @property
    def success_count(self) -> int:
        """Return the consecutive successes counted in HALF_OPEN."""
        return self._circuit.view().success_count

    def reset(self) -> None:
        """Force CLOSED, consecutive counts cleared, running totals kept."""
        self._circuit.reset()

    def force_open(self) -> None:
        """Force OPEN now, isolating the dependency for one timeout."""
        self._circuit.force_open()

    def snapshot(self) -> dict[str, Any]:
        """Return state, counts and running totals as a JSON-serialisable dict."""
        return self._circuit.snapshot()

    def classify(self, exc: BaseException) -> Outcome:
        """Return how an exception from the guarded call counts."""
        if isinstance(exc, CircuitBreakerOpenError) or not isinstance(exc, Exception):
            # A nested breaker refused, or the call was interrupted: the dependency
            # never answered either way.
            return IGNORED
        if self.is_failure is None or self.is_failure(exc):
            return FAILURE
        return SUCCESS

    def report(self, ticket: Ticket, outcome: Outcome, exc: BaseException | None) -> None:
        """Record an outcome and tell the listeners."""
        self._circuit.record(ticket, outcome)
        if not self.listeners:
            return
        for listener in self.listeners:
            if outcome is SUCCESS:
                listener.success(self)
            elif outcome is FAILURE:
                listener.failure(self, exc)

    def _admit(self) -> Ticket:
        try:
            return self._circuit.admit()
        except CircuitBreakerOpenError as error:
            self._rejected(error)
            raise

    def _rejected(self, error: CircuitBreakerOpenError) -> None:
        for listener in self.listeners:
            listener.rejected(self, error)

    def _transitioned(
        self, old: CircuitState, new: CircuitState, cause: str, count: int
    ) -> None:
        log.info(_MESSAGES.get(cause, "Circuit breaker {name} {cause}").format(
            name=self.name, count=count, cause=cause
        ))
        for listener in self.listeners:
            listener.state_change(self, old, new, cause)
