"""MemoryStore: circuits that live in one process, the state machine's rules in Python."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from breaker.state import BreakerConfig, CircuitBreakerOpenError, CircuitState, Outcome
from breaker.store import PolicyView, StateView, Ticket, TransitionHook, build_snapshot
from breaker.window import Window, bucket_ms

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
# Module constants: looking a member up on an Enum class costs ~70 ns a time on 3.11.
SUCCESS, FAILURE, IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED

Event = tuple[CircuitState, CircuitState, str, int, float]


class _Shared:
    """The state of one circuit, shared by every breaker of that name in the process."""

    __slots__ = (
        "cause", "created_wall", "failures", "fc", "gen", "half_open_failures",
        "half_open_successes", "lock", "open_for", "opened_at", "openings", "probes", "rejected",
        "reopens", "sc", "secs", "since", "slow_calls", "state", "successes", "transitions",
        "window",
    )

    def __init__(self, now: float) -> None:
        self.lock = threading.Lock()
        self.state = CLOSED
        self.gen = 1
        self.fc = 0
        self.sc = 0
        self.opened_at: float | None = None
        # How long the current (or last) opening lasts; None: the base timeout, as after a close.
        self.open_for: float | None = None
        # Consecutive re-openings from HALF_OPEN since the circuit last closed.
        self.reopens = 0
        self.cause: str | None = None
        self.openings: dict[str, int] = {}
        self.slow_calls = 0
        self.window = Window()
        self.since = now
        self.probes: dict[int, float] = {}
        self.successes = 0
        self.failures = 0
        self.rejected = 0
        self.half_open_successes = 0
        self.half_open_failures = 0
        self.transitions: dict[str, int] = {}
        self.secs = {CLOSED: 0.0, OPEN: 0.0, HALF_OPEN: 0.0}
        self.created_wall = time.time()


class MemoryStore:
    """Keep circuits in this process; pass clock= for tests that step time by hand."""

    kind = "memory"

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        if clock is not None and not callable(clock):
            raise ValueError(f"clock must be a callable returning seconds, got {clock!r}")
        self._clock = clock or time.monotonic
        self._circuits: dict[str, _Shared] = {}
        self._lock = threading.Lock()
        self._leases = itertools.count(1)

    def bind(
        self,
        name: str,
        config: BreakerConfig,
        on_transition: TransitionHook,
        clock: Callable[[], float] | None = None,
    ) -> MemoryCircuit:
        """Return the circuit called name, created closed if new."""
        clock = clock or self._clock
        with self._lock:
            shared = self._circuits.get(name)
            if shared is None:
                shared = self._circuits[name] = _Shared(clock())
        return MemoryCircuit(name, config, shared, on_transition, clock, self._leases)

    def names(self) -> list[str]:
        """Return the names of every circuit in this process."""
        with self._lock:
            return sorted(self._circuits)


class MemoryCircuit:
    """One circuit of a MemoryStore as seen with one breaker's settings."""

    __slots__ = ("_bucket_ms", "_config", "_leases", "_name", "_notify", "_plain", "_s", "clock")

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        shared: _Shared,
        on_transition: TransitionHook,
        clock: Callable[[], float],
        leases: itertools.count[int],
    ) -> None:
        self._name = name
        self._config = config
        self._s = shared
        self._notify = on_transition
        self.clock = clock
        self._leases = leases
        # No rate rule: a success in CLOSED only counts and clears fc (the hot path).
        self._plain = not config.windowed
        self._bucket_ms = bucket_ms(config.window_seconds)

    def admit(self) -> Ticket:
        """Admit a call or raise CircuitBreakerOpenError."""
        s = self._s
        # acquire/release rather than `with`: this is the hot path, and the block cannot raise.
        s.lock.acquire()
        if s.state is CLOSED:
            gen = s.gen
            s.lock.release()
            return (gen, 0)
        s.lock.release()
        with s.lock:
            if s.state is CLOSED:
                return (s.gen, 0)
            events: list[Event] = []
            now = self.clock()
            self._expire_open(now, events)
            ticket = self._admit_probe(now)
            if ticket is None:
                s.rejected += 1
                error = CircuitBreakerOpenError(self._name, s.state, self._retry_after(now))
        self._emit(events)
        if ticket is None:
            raise error
        return ticket

    def record(
        self, ticket: Ticket, outcome: Outcome, slow: bool = False, retry_after: float = 0.0
    ) -> None:
        """Report how an admitted call ended: slow or not, and the wait a failure asked for."""
        gen, lease = ticket
        s = self._s
        if not (lease or slow) and outcome is SUCCESS:
            # The hot path, as in admit(): a success in CLOSED only counts, clears fc and,
            # with a rate rule, goes into the window (it cannot raise either rate).
            s.lock.acquire()
            if s.state is CLOSED and gen == s.gen:
                s.successes += 1
                s.fc = 0
                if not self._plain:
                    s.window.add(self.clock(), self._bucket_ms, False, False)
                s.lock.release()
                return
            s.lock.release()
        with s.lock:
            if lease:
                s.probes.pop(lease, None)
            if outcome is IGNORED:
                return
            events: list[Event] = []
            self._record(gen, outcome is FAILURE, slow, retry_after, self.clock(), events)
        self._emit(events)

    def record_orphan(self, outcome: Outcome, slow: bool, retry_after: float) -> None:
        """Record a call admitted elsewhere (on Redis, which then failed) as if admitted now.

        It moves the state machine only in CLOSED; otherwise it counts in the totals.
        """
        s = self._s
        with s.lock:
            gen = s.gen if s.state is CLOSED else 0
        self.record((gen, 0), outcome, slow, retry_after)

    def view(self) -> StateView:
        """Return the current state, HALF_OPEN as soon as the timeout has run out."""
        s = self._s
        with s.lock:
            now = self.clock()
            state, fc, sc = s.state, s.fc, s.sc
            if state is OPEN and self._timed_out(now):
                state, fc, sc = HALF_OPEN, 0, 0
            if state is OPEN:
                retry = self._retry_after(now)
            elif state is HALF_OPEN and s.state is HALF_OPEN:
                retry = self._retry_after(now) if self._probes_held(now) else 0.0
            else:
                retry = 0.0
        return StateView(state, retry, fc, sc)

    def reset(self) -> None:
        """Force CLOSED with cleared consecutive counts, in a new generation."""
        s = self._s
        events: list[Event] = []
        with s.lock:
            now = self.clock()
            self._expire_open(now, events)
            if s.state is not CLOSED:
                self._move(CLOSED, now, "reset", 0, events)
            else:
                s.gen += 1
                s.fc = s.sc = 0
                s.window.clear()
        self._emit(events)

    def force_open(self) -> None:
        """Force OPEN now; an open circuit restarts its timeout."""
        s = self._s
        events: list[Event] = []
        with s.lock:
            now = self.clock()
            self._expire_open(now, events)
            if s.state is not OPEN:
                self._open("forced", 0, 0.0, now, events)
            else:
                s.gen += 1
                s.opened_at = now
        self._emit(events)

    def snapshot(self) -> dict[str, Any]:
        """Return the state and running totals as a JSON-serialisable dict."""
        view = self.view()
        s = self._s
        with s.lock:
            now = self.clock()
            secs = {state.value: value for state, value in s.secs.items()}
            transitions = dict(s.transitions)
            since, current = s.since, s.state
            if current is OPEN and self._timed_out(now):
                assert s.opened_at is not None
                ran_out = s.opened_at + self._open_for()
                secs[OPEN.value] += max(0.0, ran_out - since)
                current, since = HALF_OPEN, ran_out
                key = "open->half_open"
                transitions[key] = transitions.get(key, 0) + 1
            secs[current.value] += max(0.0, now - since)
            totals = {
                "successes": s.successes,
                "failures": s.failures,
                "rejected": s.rejected,
                "half_open_successes": s.half_open_successes,
                "half_open_failures": s.half_open_failures,
            }
            opened_at = None
            if s.opened_at is not None:
                opened_at = round(time.time() - (now - s.opened_at), 3)
            config = self._config
            policy = PolicyView(
                open_duration=self._open_for(),
                reopens=s.reopens,
                open_cause=s.cause,
                openings=dict(s.openings),
                slow_calls=s.slow_calls,
                window=s.window.counts(now, self._bucket_ms) if config.windowed else None,
            )
        return build_snapshot(
            self._name, config, view, totals, transitions, secs, opened_at, "memory", policy
        )

    # The rules below run with the circuit's lock held.

    def _record(
        self, gen: int, failed: bool, slow: bool, retry_after: float, now: float,
        events: list[Event],
    ) -> None:
        s, config = self._s, self._config
        if failed:
            s.failures += 1
        else:
            s.successes += 1
        if slow:
            s.slow_calls += 1
        self._expire_open(now, events)
        if gen != s.gen:
            return
        wait = retry_after if failed else 0.0
        if s.state is CLOSED:
            if failed:
                s.fc += 1
                if s.fc >= config.failure_threshold:
                    self._open("failures", s.fc, wait, now, events)
                    return
            else:
                s.fc = 0
            if config.windowed:
                s.window.add(now, self._bucket_ms, failed, slow)
                if failed or slow:
                    self._check_rates(now, wait, events)
        elif s.state is HALF_OPEN:
            if failed:
                s.half_open_failures += 1
                self._open("probe_failed", 1, wait, now, events)
                return
            s.half_open_successes += 1
            if slow:
                # A probe that answers slowly shows no recovery from slowness.
                self._open("slow_calls", 1, 0.0, now, events)
                return
            s.sc += 1
            if s.sc >= config.success_threshold:
                self._move(CLOSED, now, "recovered", s.sc, events)

    def _check_rates(self, now: float, wait: float, events: list[Event]) -> None:
        config = self._config
        counts = self._s.window.counts(now, self._bucket_ms)
        if counts.calls < config.minimum_calls:
            return
        failure_rate, slow_rate = config.failure_rate_threshold, config.slow_rate
        if failure_rate is not None and counts.failure_rate() >= failure_rate:
            self._open("failure_rate", counts.calls, wait, now, events)
        elif slow_rate is not None and counts.slow_call_rate() >= slow_rate:
            self._open("slow_calls", counts.calls, wait, now, events)

    def _open(
        self, cause: str, count: int, wait: float, now: float, events: list[Event]
    ) -> None:
        """Open for the policy's duration, or the dependency's wait if longer, capped."""
        s, config = self._s, self._config
        if s.state is HALF_OPEN and cause != "forced":
            s.reopens += 1
        seconds = config.open_seconds(s.reopens)
        if wait > 0:
            seconds = min(max(seconds, wait), config.max_open_seconds)
            cause = "retry_after"
        s.open_for = seconds
        s.cause = cause
        s.openings[cause] = s.openings.get(cause, 0) + 1
        self._move(OPEN, now, cause, count, events)

    def _admit_probe(self, now: float) -> Ticket | None:
        s = self._s
        if s.state is not HALF_OPEN or self._probes_held(now):
            return None
        lease = next(self._leases)
        s.probes[lease] = now + self._config.lease_seconds
        return (s.gen, lease)

    def _probes_held(self, now: float) -> bool:
        probes = self._s.probes
        for lease in [lease for lease, expiry in probes.items() if expiry <= now]:
            del probes[lease]
        return len(probes) >= self._config.half_open_max_calls

    def _open_for(self) -> float:
        open_for = self._s.open_for
        return self._config.timeout_seconds if open_for is None else open_for

    def _timed_out(self, now: float) -> bool:
        opened_at = self._s.opened_at
        return opened_at is not None and now >= opened_at + self._open_for()

    def _expire_open(self, now: float, events: list[Event]) -> None:
        s = self._s
        if s.state is OPEN and self._timed_out(now):
            assert s.opened_at is not None
            self._move(HALF_OPEN, s.opened_at + self._open_for(), "timeout", 0, events)

    def _retry_after(self, now: float) -> float:
        s = self._s
        if s.state is OPEN and s.opened_at is not None:
            return max(0.0, s.opened_at + self._open_for() - now)
        if s.state is HALF_OPEN:
            return self._config.half_open_retry_after
        return 0.0

    def _move(
        self, to: CircuitState, at: float, cause: str, count: int, events: list[Event]
    ) -> None:
        s = self._s
        came_from = s.state
        s.secs[came_from] += max(0.0, at - s.since)
        key = f"{came_from.value}->{to.value}"
        s.transitions[key] = s.transitions.get(key, 0) + 1
        s.state = to
        s.gen += 1
        s.fc = s.sc = 0
        s.since = at
        s.probes.clear()
        # Every state starts with an empty window, as in resilience4j.
        s.window.clear()
        open_seconds = 0.0
        if to is OPEN:
            s.opened_at = at
            open_seconds = self._open_for()
        elif to is CLOSED:
            s.open_for = None
            s.reopens = 0
        events.append((came_from, to, cause, count, open_seconds))

    def _emit(self, events: list[Event]) -> None:
        for came_from, to, cause, count, open_seconds in events:
            self._notify(came_from, to, cause, count, open_seconds)
