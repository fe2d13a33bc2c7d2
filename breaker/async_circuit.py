"""AsyncCircuitBreaker: the same breaker for asyncio code, on MemoryStore or AsyncRedisStore.

Same arguments, same rules, same Redis state as CircuitBreaker; what touches the store is
awaited, so the event loop never blocks on Redis.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar

from breaker.circuit import (
    FAILURE,
    IGNORED,
    SUCCESS,
    BreakerBase,
    CircuitBreakerListener,
    check_wait,
)
from breaker.memory import MemoryCircuit, MemoryStore
from breaker.state import BreakerConfig, CircuitBreakerOpenError, CircuitState, Outcome
from breaker.store import StateView, Ticket, TransitionHook

P = ParamSpec("P")
R = TypeVar("R")


class AsyncCircuit(Protocol):
    """One named circuit for asyncio code (AsyncRedisCircuit, or a MemoryCircuit wrapped)."""

    clock: Callable[[], float]

    async def admit(self) -> Ticket:
        """Admit a call or raise CircuitBreakerOpenError."""

    async def record(
        self, ticket: Ticket, outcome: Outcome, slow: bool = False, retry_after: float = 0.0
    ) -> None:
        """Report how an admitted call ended."""

    async def view(self) -> StateView:
        """Return the current state without changing it."""

    async def reset(self) -> None:
        """Force CLOSED with cleared consecutive counts."""

    async def force_open(self) -> None:
        """Force OPEN now."""

    async def snapshot(self) -> dict[str, Any]:
        """Return the state and running totals as a JSON-serialisable dict."""


class AsyncStore(Protocol):
    """Where circuits live for asyncio code: AsyncRedisStore."""

    kind: str
    asynchronous: bool

    def bind(
        self,
        name: str,
        config: BreakerConfig,
        on_transition: TransitionHook,
        clock: Callable[[], float] | None = None,
    ) -> AsyncCircuit:
        """Return the circuit called name, created closed if new."""


class _MemoryCircuitForAsync:
    """A MemoryCircuit behind awaitable methods: it never waits on I/O, so it never blocks."""

    def __init__(self, circuit: MemoryCircuit) -> None:
        self._circuit = circuit
        self.clock = circuit.clock

    async def admit(self) -> Ticket:
        return self._circuit.admit()

    async def record(
        self, ticket: Ticket, outcome: Outcome, slow: bool = False, retry_after: float = 0.0
    ) -> None:
        self._circuit.record(ticket, outcome, slow, retry_after)

    async def view(self) -> StateView:
        return self._circuit.view()

    async def reset(self) -> None:
        self._circuit.reset()

    async def force_open(self) -> None:
        self._circuit.force_open()

    async def snapshot(self) -> dict[str, Any]:
        return self._circuit.snapshot()


class AsyncPermit:
    """The right to make one call, reported with awaited methods (two-step use)."""

    __slots__ = ("_breaker", "_started", "_ticket", "state")

    def __init__(
        self, breaker: AsyncCircuitBreaker, ticket: Ticket, state: CircuitState,
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

    async def success(self) -> None:
        """Report that the dependency answered."""
        await self._finish(SUCCESS, None, None)

    async def failure(
        self, exc: BaseException | None = None, *, retry_after: float | None = None
    ) -> None:
        """Report that the dependency failed; retry_after as in Permit.failure."""
        wait = None if retry_after is None else check_wait(retry_after)
        await self._finish(FAILURE, exc, wait)

    async def done(self, exc: BaseException | None = None) -> None:
        """Report the call's end: no error is a success, an error is judged by is_failure."""
        if exc is None:
            await self._finish(SUCCESS, None, None)
        else:
            await self._finish(self._breaker.classify(exc), exc, None)

    async def release(self) -> None:
        """Give the permit back unused: free its probe slot, count nothing."""
        await self._finish(IGNORED, None, None)

    async def _finish(
        self, outcome: Outcome, exc: BaseException | None, wait: float | None
    ) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            raise RuntimeError(f"permit for circuit breaker {self._breaker.name} already used")
        await self._breaker._report(ticket, outcome, exc, self._started, wait)


class _PermitBlock:
    """``async with breaker.permit() as permit:``: admit on entry, report the block's end."""

    __slots__ = ("_breaker", "_permit")

    def __init__(self, breaker: AsyncCircuitBreaker) -> None:
        self._breaker = breaker
        self._permit: AsyncPermit | None = None

    async def __aenter__(self) -> AsyncPermit:
        self._permit = await self._breaker.allow()
        return self._permit

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit = self._permit
        if permit is not None and not permit.used:
            # Cancellation is a BaseException: it frees a probe slot and counts nothing.
            await permit.done(exc)


class AsyncCircuitBreaker(BreakerBase):
    """A circuit breaker for asyncio: CircuitBreaker's arguments and rules, awaited."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 3,
        timeout_seconds: float = 30.0,
        success_threshold: int = 2,
        half_open_max_calls: int = 2,
        store: AsyncStore | MemoryStore | None = None,
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
        self._circuit: AsyncCircuit
        if isinstance(self.store, MemoryStore):
            self._circuit = _MemoryCircuitForAsync(
                self.store.bind(self.name, self.config, self._transitioned, clock)
            )
        elif getattr(self.store, "asynchronous", False):
            self._circuit = self.store.bind(self.name, self.config, self._transitioned, clock)
        else:
            raise ValueError(
                f"store must be a MemoryStore or AsyncRedisStore, got {self.store!r}"
                " (a RedisStore would block the event loop)"
            )
        self._clock = self._circuit.clock

    async def call(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await fn through the breaker, or raise CircuitBreakerOpenError without calling it."""
        permit = await self.allow()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await permit.done(exc)
            raise
        await permit.success()
        return result

    def __call__(
        self, fn: Callable[P, Awaitable[R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        """Decorate an async def function so that every call goes through the breaker."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"AsyncCircuitBreaker decorates async def functions, got {fn!r}; "
                "use CircuitBreaker for plain ones"
            )

        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            return await self.call(fn, *args, **kwargs)

        return guarded

    async def allow(self) -> AsyncPermit:
        """Admit one call to be reported later, or raise CircuitBreakerOpenError."""
        try:
            ticket = await self._circuit.admit()
        except CircuitBreakerOpenError as error:
            self._rejected(error)
            raise
        state = CircuitState.HALF_OPEN if ticket[1] else CircuitState.CLOSED
        started = None if self._slow_after is None else self._clock()
        return AsyncPermit(self, ticket, state, started)

    def permit(self) -> _PermitBlock:
        """Return an async context manager: admitted on entry, the block's end reported."""
        return _PermitBlock(self)

    async def state(self) -> CircuitState:
        """Return the current state; HALF_OPEN as soon as the timeout has run out."""
        return (await self._circuit.view()).state

    async def retry_after(self) -> float:
        """Return the seconds until a call may be tried again; 0.0 when one may be now."""
        return (await self._circuit.view()).retry_after

    async def failure_count(self) -> int:
        """Return the consecutive failures counted in CLOSED."""
        return (await self._circuit.view()).failure_count

    async def success_count(self) -> int:
        """Return the consecutive successes counted in HALF_OPEN."""
        return (await self._circuit.view()).success_count

    async def reset(self) -> None:
        """Force CLOSED, consecutive counts cleared, running totals kept."""
        await self._circuit.reset()

    async def force_open(self) -> None:
        """Force OPEN now, isolating the dependency."""
        await self._circuit.force_open()

    async def snapshot(self) -> dict[str, Any]:
        """Return state, counts and running totals as a JSON-serialisable dict."""
        return await self._circuit.snapshot()

    async def _report(
        self, ticket: Ticket, outcome: Outcome, exc: BaseException | None,
        started: float | None, retry_after: float | None,
    ) -> None:
        slow, wait = self._judge(outcome, exc, started, retry_after, self._clock)
        await self._circuit.record(ticket, outcome, slow, wait)
        if self.listeners:
            self._heard(outcome, exc)
