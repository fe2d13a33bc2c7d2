"""CircuitBreaker: guard calls to a dependency with a circuit kept in a store."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

from breaker.memory import MemoryStore
from breaker.state import (
    BreakerConfig,
    CircuitBreakerOpenError,
    CircuitState,
    Outcome,
    check_name,
    dependency_wait,
)
from breaker.store import Circuit, Store, Ticket

log = logging.getLogger("breaker")

SUCCESS, FAILURE, IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN

P = ParamSpec("P")
R = TypeVar("R")

_MESSAGES = {
    "failures": "Circuit breaker {name} opened after {count} failures",
    "failure_rate": "Circuit breaker {name} opened: failures reached {failure_rate:.0%} of "
                    "{count} calls in {window:g} s",
    "slow_calls": "Circuit breaker {name} opened: slow calls reached {slow_rate:.0%} of "
                  "{count} calls in {window:g} s",
    "probe_failed": "Circuit breaker {name} opened again after a failed probe",
    "retry_after": "Circuit breaker {name} opened as long as the dependency asked (Retry-After)",
    "timeout": "Circuit breaker {name} entering half-open state",
    "recovered": "Circuit breaker {name} closed after successful recovery",
    "reset": "Circuit breaker {name} closed by an operator reset",
    "forced": "Circuit breaker {name} forced open by an operator",
}
_SLOW_PROBE = "Circuit breaker {name} opened again after a slow probe"


def transition_message(
    name: str, config: BreakerConfig, old: CircuitState, cause: str, count: int,
    open_seconds: float,
) -> str:
    """Return the INFO line for one transition (CONTRACT.md section 2's texts)."""
    template = _MESSAGES.get(cause, "Circuit breaker {name} {cause}")
    if cause == "slow_calls" and old is HALF_OPEN:
        template = _SLOW_PROBE
    message = template.format(
        name=name, count=count, cause=cause, window=config.window_seconds,
        failure_rate=config.failure_rate_threshold or 0.0, slow_rate=config.slow_rate or 0.0,
    )
    if open_seconds and open_seconds != config.timeout_seconds:
        message += f", for {open_seconds:g} s"
    return message


def check_wait(retry_after: object) -> float:
    """Return a failure's explicit retry_after in seconds, or raise ValueError."""
    if isinstance(retry_after, bool) or not isinstance(retry_after, int | float):
        raise ValueError(f"retry_after must be a number of seconds >= 0, got {retry_after!r}")
    if not math.isfinite(retry_after) or retry_after < 0:
        raise ValueError(
            f"retry_after must be a finite number of seconds >= 0, got {retry_after!r}"
        )
    return float(retry_after)


class CircuitBreakerListener:
    """Hooks called outside any lock; override the ones you need."""

    def state_change(
        self, breaker: Any, old: CircuitState, new: CircuitState, cause: str
    ) -> None:
        """Call after a transition made by this process."""

    def success(self, breaker: Any) -> None:
        """Call after a guarded call the breaker counted as a success."""

    def failure(self, breaker: Any, exc: BaseException | None) -> None:
        """Call after a guarded call the breaker counted as a failure."""

    def rejected(self, breaker: Any, error: CircuitBreakerOpenError) -> None:
        """Call after a call was refused without reaching the dependency."""


class BreakerBase:
    """What CircuitBreaker and AsyncCircuitBreaker share: settings, judging, listeners, logs."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 3,
        timeout_seconds: float = 30.0,
        success_threshold: int = 2,
        half_open_max_calls: int = 2,
        store: Any = None,
        is_failure: Callable[[BaseException], bool] | None = None,
        clock: Callable[[], float] | None = None,
        *,
        probe_lease_seconds: float | None = None,
        open_backoff: float = 1.0,
        max_timeout_seconds: float | None = None,
        failure_rate_threshold: float | None = None,
        window_seconds: float = 30.0,
        minimum_calls: int = 10,
        slow_call_seconds: float | None = None,
        slow_call_rate_threshold: float | None = None,
        listeners: Iterable[CircuitBreakerListener] = (),
    ) -> None:
        self.name = check_name(name)
        self.config = BreakerConfig(
            failure_threshold=failure_threshold,
            timeout_seconds=timeout_seconds,
            success_threshold=success_threshold,
            half_open_max_calls=half_open_max_calls,
            probe_lease_seconds=probe_lease_seconds,
            open_backoff=open_backoff,
            max_timeout_seconds=max_timeout_seconds,
            failure_rate_threshold=failure_rate_threshold,
            window_seconds=window_seconds,
            minimum_calls=minimum_calls,
            slow_call_seconds=slow_call_seconds,
            slow_call_rate_threshold=slow_call_rate_threshold,
        )
        if is_failure is not None and not callable(is_failure):
            raise ValueError(f"is_failure must be a callable(exc) -> bool, got {is_failure!r}")
        if clock is not None and not callable(clock):
            raise ValueError(f"clock must be a callable returning seconds, got {clock!r}")
        self.store = store if store is not None else MemoryStore()
        self.is_failure = is_failure
        self.listeners: list[CircuitBreakerListener] = list(listeners)
        # Calls are timed only with a slow-call rule, on the circuit's clock.
        self._slow_after = self.config.slow_call_seconds

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.store.kind}>"

    def classify(self, exc: BaseException) -> Outcome:
        """Return how an exception from the guarded call counts."""
        if isinstance(exc, CircuitBreakerOpenError) or not isinstance(exc, Exception):
            # A nested breaker refused, or the call was interrupted: the dependency
            # never answered either way.
            return IGNORED
        if self.is_failure is None or self.is_failure(exc):
            return FAILURE
        return SUCCESS

    def _judge(
        self, outcome: Outcome, exc: BaseException | None, started: float | None,
        retry_after: float | None, now: Callable[[], float],
    ) -> tuple[bool, float]:
        """Return (slow, the wait a failure asked for) of a call that ended."""
        slow_after = self._slow_after
        slow = started is not None and slow_after is not None and now() - started > slow_after
        wait = 0.0
        if outcome is FAILURE:
            wait = dependency_wait(exc) if retry_after is None else retry_after
        return slow, wait

    def _heard(self, outcome: Outcome, exc: BaseException | None) -> None:
        for listener in self.listeners:
            if outcome is SUCCESS:
                listener.success(self)
            elif outcome is FAILURE:
                listener.failure(self, exc)

    def _rejected(self, error: CircuitBreakerOpenError) -> None:
        for listener in self.listeners:
            listener.rejected(self, error)

    def _transitioned(
        self, old: CircuitState, new: CircuitState, cause: str, count: int, open_seconds: float
    ) -> None:
        log.info(transition_message(self.name, self.config, old, cause, count, open_seconds))
        for listener in self.listeners:
            listener.state_change(self, old, new, cause)


class Permit:
    """The right to make one call, and the means to report how it ended (two-step use).

    Also a context manager: ``with breaker.permit():`` reports the block's end by itself,
    an exception judged by is_failure, unless the block reported already.
    """

    __slots__ = ("_breaker", "_started", "_ticket", "state")

    def __init__(
        self, breaker: CircuitBreaker, ticket: Ticket, state: CircuitState,
        started: float | None,
    ) -> None:
        self._breaker = breaker
        self._ticket: Ticket | None = ticket
        self._started = started
        self.state = state

    @property
    def is_probe(self) -> bool:
        """Return True if this call is a HALF_OPEN probe."""
        return self.state is CircuitState.HALF_OPEN

    @property
    def used(self) -> bool:
        """Return True once the permit has reported."""
        return self._ticket is None

    def success(self) -> None:
        """Report that the dependency answered."""
        self._finish(SUCCESS, None, None)

    def failure(
        self, exc: BaseException | None = None, *, retry_after: float | None = None
    ) -> None:
        """Report that the dependency failed, whatever is_failure would say.

        retry_after: the seconds the dependency asked to be left alone (Retry-After); if
        this failure opens the circuit, it stays open at least that long (capped by
        max_timeout_seconds). Left out, an exception's own retry_after attribute counts.
        """
        wait = None if retry_after is None else check_wait(retry_after)
        self._finish(FAILURE, exc, wait)

    def done(self, exc: BaseException | None = None) -> None:
        """Report the call's end: no error is a success, an error is judged by is_failure."""
        if exc is None:
            self._finish(SUCCESS, None, None)
        else:
            self._finish(self._breaker.classify(exc), exc, None)

    def release(self) -> None:
        """Give the permit back unused: free its probe slot, count nothing."""
        self._finish(IGNORED, None, None)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self._ticket is not None:
            self.done(exc)

    def _finish(self, outcome: Outcome, exc: BaseException | None, wait: float | None) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            raise RuntimeError(f"permit for circuit breaker {self._breaker.name} already used")
        self._breaker._report(ticket, outcome, exc, self._started, wait)


class CircuitBreaker(BreakerBase):
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
        open_backoff: float = 1.0,
        max_timeout_seconds: float | None = None,
        failure_rate_threshold: float | None = None,
        window_seconds: float = 30.0,
        minimum_calls: int = 10,
        slow_call_seconds: float | None = None,
        slow_call_rate_threshold: float | None = None,
        listeners: Iterable[CircuitBreakerListener] = (),
    ) -> None:
        super().__init__(
            name, failure_threshold, timeout_seconds, success_threshold, half_open_max_calls,
            store, is_failure, clock, probe_lease_seconds=probe_lease_seconds,
            open_backoff=open_backoff, max_timeout_seconds=max_timeout_seconds,
            failure_rate_threshold=failure_rate_threshold, window_seconds=window_seconds,
            minimum_calls=minimum_calls, slow_call_seconds=slow_call_seconds,
            slow_call_rate_threshold=slow_call_rate_threshold, listeners=listeners,
        )
        if getattr(self.store, "asynchronous", False):
            raise ValueError(
                f"store: {type(self.store).__name__} is for AsyncCircuitBreaker; "
                "use RedisStore or MemoryStore with CircuitBreaker"
            )
        if not callable(getattr(self.store, "bind", None)):
            raise ValueError(f"store must be a MemoryStore or RedisStore, got {self.store!r}")
        self._circuit: Circuit = self.store.bind(self.name, self.config, self._transitioned, clock)
        self._clock = self._circuit.clock

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call fn through the breaker, or raise CircuitBreakerOpenError without calling it."""
        try:
            ticket = self._circuit.admit()
        except CircuitBreakerOpenError as error:
            self._rejected(error)
            raise
        if self._slow_after is None:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self._report(ticket, self.classify(exc), exc, None, None)
                raise
            self._circuit.record(ticket, SUCCESS)
        else:
            started = self._clock()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self._report(ticket, self.classify(exc), exc, started, None)
                raise
            self._circuit.record(ticket, SUCCESS, self._clock() - started > self._slow_after)
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
        try:
            ticket = self._circuit.admit()
        except CircuitBreakerOpenError as error:
            self._rejected(error)
            raise
        state = CircuitState.HALF_OPEN if ticket[1] else CircuitState.CLOSED
        started = None if self._slow_after is None else self._clock()
        return Permit(self, ticket, state, started)

    def permit(self) -> Permit:
        """Admit one call for a with-block, or raise CircuitBreakerOpenError (as allow())."""
        return self.allow()

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

    def _report(
        self, ticket: Ticket, outcome: Outcome, exc: BaseException | None,
        started: float | None, retry_after: float | None,
    ) -> None:
        slow, wait = self._judge(outcome, exc, started, retry_after, self._clock)
        self._circuit.record(ticket, outcome, slow, wait)
        if self.listeners:
            self._heard(outcome, exc)
