"""Random call sequences checked step by step against a reference model of ADR-003.

The model is the contract's semantics (CONTRACT.md section 2) written as plainly as
possible; the breaker must agree with it after every step, on MemoryStore with a fake
clock, and (time-free sequences) on RedisStore.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from breaker import (
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    MemoryStore,
    Permit,
    RedisStore,
)
from tests.dependencies import Declined, Interrupted, ProviderDown, not_declined

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN






@dataclass
class ModelTicket:
    generation: int
    probe: int | None


@dataclass
class Model:
    """ADR-003 as the contract states it, for one caller that may hold permits."""

    failure_threshold: int
    timeout: float
    success_threshold: int
    half_open_max_calls: int
    lease: float
    now: float = 0.0
    state: CircuitState = CLOSED
    failure_count: int = 0
    success_count: int = 0
    generation: int = 0
    opened_at: float = 0.0
    # probe id -> when its slot frees itself if never reported
    probes: dict[int, float] = field(default_factory=dict)
    next_probe: int = 1
    calls: int = 0
    failures: int = 0
    rejected: int = 0
    transitions: Counter[str] = field(default_factory=Counter)

    def go(self, to: CircuitState) -> None:
        self.transitions[f"{self.state.value}->{to.value}"] += 1
        if to is OPEN:
            self.opened_at = self.now
        self.state = to
        self.generation += 1
        self.failure_count = self.success_count = 0
        self.probes.clear()

    def timed_out(self) -> bool:
        return self.state is OPEN and self.now >= self.opened_at + self.timeout

    def notice_timeout(self) -> None:
        if self.timed_out():
            self.go(HALF_OPEN)

    def probes_in_flight(self) -> int:
        self.probes = {p: until for p, until in self.probes.items() if until > self.now}
        return len(self.probes)

    def admit(self) -> ModelTicket | None:
        self.notice_timeout()
        if self.state is CLOSED:
            return ModelTicket(self.generation, None)
        if self.state is HALF_OPEN and self.probes_in_flight() < self.half_open_max_calls:
            probe = self.next_probe
            self.next_probe += 1
            self.probes[probe] = self.now + self.lease
            return ModelTicket(self.generation, probe)
        self.rejected += 1
        return None

    def record(self, ticket: ModelTicket, outcome: str) -> None:
        if ticket.probe is not None:
            self.probes.pop(ticket.probe, None)
        if outcome == "ignored":
            return
        failed = outcome == "failure"
        self.calls += 1
        self.failures += failed
        self.notice_timeout()
        if ticket.generation != self.generation:
            return
        if self.state is CLOSED:
            self.failure_count = self.failure_count + 1 if failed else 0
            if self.failure_count >= self.failure_threshold:
                self.go(OPEN)
        elif self.state is HALF_OPEN:
            if failed:
                self.go(OPEN)
                return
            self.success_count += 1
            if self.success_count >= self.success_threshold:
                self.go(CLOSED)

    def reset(self) -> None:
        self.notice_timeout()
        if self.state is CLOSED:
            self.generation += 1
            self.failure_count = self.success_count = 0
        else:
            self.go(CLOSED)

    def force_open(self) -> None:
        self.notice_timeout()
        if self.state is OPEN:
            self.generation += 1
            self.opened_at = self.now
        else:
            self.go(OPEN)

    def observed(self) -> tuple[CircuitState, int, int, float]:
        """Return (state, failure_count, success_count, retry_after) without changing anything."""
        if self.timed_out():
            return HALF_OPEN, 0, 0, 0.0
        if self.state is OPEN:
            return OPEN, 0, 0, self.opened_at + self.timeout - self.now
        if self.state is HALF_OPEN:
            held = sum(1 for until in self.probes.values() if until > self.now)
            retry = min(1.0, self.timeout) if held >= self.half_open_max_calls else 0.0
            return HALF_OPEN, 0, self.success_count, retry
        return CLOSED, self.failure_count, 0, 0.0

    def rejection_retry_after(self) -> float:
        if self.state is OPEN:
            return self.opened_at + self.timeout - self.now
        return min(1.0, self.timeout)

    def published_transitions(self) -> dict[str, int]:
        published = dict(self.transitions)
        if self.timed_out():
            published["open->half_open"] = published.get("open->half_open", 0) + 1
        return published


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Failures twice as likely as other outcomes, so that circuits open often.
OUTCOMES = st.sampled_from(["success", "failure", "failure", "excluded", "ignored"])

CALL = st.tuples(st.just("call"), OUTCOMES)
ALLOW = st.just(("allow",))
FINISH = st.tuples(st.just("finish"), st.integers(0, 3), OUTCOMES)
OPERATOR = st.sampled_from([("reset",), ("force_open",)])
# A fraction of the timeout or of the probe lease, so that steps land on the boundaries;
# every value is a multiple of 1/8 s, exact in binary floating point, so sums stay exact.
STEP = st.tuples(
    st.just("advance"),
    st.sampled_from(["timeout_seconds", "probe_lease_seconds"]),
    st.sampled_from([0.25, 0.5, 1.0, 1.5]),
)

CONFIG = st.fixed_dictionaries({
    "failure_threshold": st.integers(1, 4),
    "success_threshold": st.integers(1, 3),
    "half_open_max_calls": st.integers(1, 3),
    "timeout_seconds": st.sampled_from([1.0, 2.5, 5.0]),
    "probe_lease_seconds": st.sampled_from([0.5, 3.0, 10.0]),
})


def guarded_function(outcome: str) -> Any:
    def fn() -> str:
        if outcome == "failure":
            raise ProviderDown
        if outcome == "excluded":
            raise Declined
        if outcome == "ignored":
            raise Interrupted
        return "ok"
    return fn


def finish(permit: Permit, outcome: str) -> None:
    if outcome == "success":
        permit.success()
    elif outcome == "failure":
        permit.failure(ProviderDown())
    elif outcome == "excluded":
        permit.done(Declined())
    else:
        permit.release()


def model_outcome(outcome: str) -> str:
    return "success" if outcome == "excluded" else outcome


class Run:
    """Apply the same operations to a breaker and to the model, and compare them."""

    def __init__(self, cb: CircuitBreaker, model: Model, compare_time: bool) -> None:
        self.cb = cb
        self.model = model
        self.compare_time = compare_time
        self.held: list[tuple[Permit, ModelTicket]] = []

    def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "call":
            self.call(op[1])
        elif kind == "allow":
            self.allow()
        elif kind == "finish" and self.held:
            permit, ticket = self.held.pop(op[1] % len(self.held))
            finish(permit, op[2])
            self.model.record(ticket, model_outcome(op[2]))
        elif kind == "reset":
            self.cb.reset()
            self.model.reset()
        elif kind == "force_open":
            self.cb.force_open()
            self.model.force_open()

    def call(self, outcome: str) -> None:
        ticket = self.model.admit()
        expected: type[BaseException] | None = {
            "failure": ProviderDown, "excluded": Declined, "ignored": Interrupted,
        }.get(outcome)
        if ticket is None:
            expected = CircuitBreakerOpenError
        raised: BaseException | None = None
        try:
            self.cb.call(guarded_function(outcome))
        except BaseException as exc:
            raised = exc
        if expected is None:
            assert raised is None
        else:
            assert isinstance(raised, expected), raised
        if isinstance(raised, CircuitBreakerOpenError):
            self.check_rejection(raised)
        if ticket is not None:
            self.model.record(ticket, model_outcome(outcome))

    def allow(self) -> None:
        ticket = self.model.admit()
        try:
            permit = self.cb.allow()
        except CircuitBreakerOpenError as exc:
            assert ticket is None
            self.check_rejection(exc)
            return
        assert ticket is not None
        assert permit.is_probe == (ticket.probe is not None)
        self.held.append((permit, ticket))

    def check_rejection(self, error: CircuitBreakerOpenError) -> None:
        assert error.state is self.model.state
        if self.compare_time:
            assert error.retry_after == pytest.approx(self.model.rejection_retry_after())
        assert error.retry_after > 0

    def check(self) -> None:
        state, failure_count, success_count, retry_after = self.model.observed()
        assert self.cb.state is state
        assert self.cb.failure_count == failure_count
        assert self.cb.success_count == success_count
        snap = self.cb.snapshot()
        assert (snap["calls"], snap["failures"], snap["rejected"]) == (
            self.model.calls, self.model.failures, self.model.rejected,
        )
        assert snap["transitions"] == self.model.published_transitions()
        if self.compare_time:
            assert self.cb.retry_after == pytest.approx(retry_after)


@settings(max_examples=1000, deadline=None)
@given(
    config=CONFIG,
    ops=st.lists(st.one_of(CALL, CALL, ALLOW, FINISH, FINISH, OPERATOR, STEP), max_size=60),
)
def test_memory_breaker_agrees_with_the_model_after_every_step(
    config: dict[str, Any], ops: list[tuple[Any, ...]]
) -> None:
    clock = FakeClock()
    cb = CircuitBreaker(
        "payments.card", store=MemoryStore(clock=clock), is_failure=not_declined, **config
    )
    model = Model(
        failure_threshold=config["failure_threshold"],
        timeout=config["timeout_seconds"],
        success_threshold=config["success_threshold"],
        half_open_max_calls=config["half_open_max_calls"],
        lease=config["probe_lease_seconds"],
    )
    run = Run(cb, model, compare_time=True)
    run.check()
    for op in ops:
        if op[0] == "advance":
            step = config[op[1]] * op[2]
            clock.now += step
            model.now += step
        else:
            run.apply(op)
        run.check()


REDIS_TIMEOUT = 60.0


def pass_the_timeout(client: redis.Redis, name: str, model: Model) -> None:
    """Move an OPEN circuit's opening one timeout into the past, on the server and the model."""
    if model.state is not OPEN or model.timed_out():
        return
    timeout_ms = int(REDIS_TIMEOUT * 1000)
    client.hincrby(f"breaker:{{{name}}}", "opened_at", -timeout_ms)
    model.opened_at -= REDIS_TIMEOUT


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    config=CONFIG,
    ops=st.lists(
        st.one_of(CALL, CALL, ALLOW, FINISH, FINISH, OPERATOR, st.just(("advance",))),
        max_size=30,
    ),
)
def test_redis_breaker_agrees_with_the_model_on_time_free_sequences(
    redis_client: redis.Redis,
    redis_url: str,
    config: dict[str, Any],
    ops: list[tuple[Any, ...]],
) -> None:
    name = f"payments.{uuid.uuid4().hex[:12]}"
    store = RedisStore.from_url(redis_url, staleness_seconds=0)
    # Leases long enough never to run out on their own while the sequence runs.
    config = {**config, "timeout_seconds": REDIS_TIMEOUT, "probe_lease_seconds": 3600.0}
    cb = CircuitBreaker(name, store=store, is_failure=not_declined, **config)
    model = Model(
        failure_threshold=config["failure_threshold"],
        timeout=REDIS_TIMEOUT,
        success_threshold=config["success_threshold"],
        half_open_max_calls=config["half_open_max_calls"],
        lease=3600.0,
    )
    run = Run(cb, model, compare_time=False)
    try:
        run.check()
        for op in ops:
            if op[0] == "advance":
                pass_the_timeout(redis_client, name, model)
            else:
                run.apply(op)
            run.check()
    finally:
        store.client.close()
