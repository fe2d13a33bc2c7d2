"""Random call sequences checked step by step against a reference model of ADR-003.

The model is the contract's semantics (CONTRACT.md section 2) written as plainly as
possible, and the policies beyond it (open-duration backoff, Retry-After, the failure-rate
window, slow calls; docs/design.md) likewise; the breaker must agree with it after every
step, on MemoryStore with a fake clock, and (time-free sequences) on RedisStore.
"""

from __future__ import annotations

import math
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
    admitted_at: float


@dataclass
class Model:
    """ADR-003 as the contract states it, for one caller that may hold permits."""

    failure_threshold: int
    timeout: float
    success_threshold: int
    half_open_max_calls: int
    lease: float
    open_backoff: float = 1.0
    max_timeout: float | None = None
    failure_rate: float | None = None
    window: float = 30.0
    minimum_calls: int = 10
    slow_after: float | None = None
    slow_rate: float | None = None
    # Time-free runs (RedisStore): every outcome since the window was emptied counts.
    time_free: bool = False
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
    slow_calls: int = 0
    transitions: Counter[str] = field(default_factory=Counter)
    # How long the current (or last) opening lasts, and the failed probes since a close.
    open_for: float = 0.0
    reopens: int = 0
    cause: str | None = None
    openings: Counter[str] = field(default_factory=Counter)
    # (when, failed, slow) of each outcome counted in CLOSED since the window was emptied
    outcomes: list[tuple[float, bool, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.open_for = self.timeout

    @property
    def cap(self) -> float:
        return self.timeout * 10 if self.max_timeout is None else self.max_timeout

    @property
    def windowed(self) -> bool:
        return self.failure_rate is not None or self.slow_after is not None

    def go(self, to: CircuitState) -> None:
        self.transitions[f"{self.state.value}->{to.value}"] += 1
        if to is OPEN:
            self.opened_at = self.now
        if to is CLOSED:
            self.open_for, self.reopens = self.timeout, 0
        self.state = to
        self.generation += 1
        self.failure_count = self.success_count = 0
        self.probes.clear()
        self.outcomes.clear()

    def open(self, cause: str, wait: float = 0.0) -> None:
        """Open for timeout x backoff^(failed probes since a close), or the wait, capped."""
        if self.state is HALF_OPEN and cause != "forced":
            self.reopens += 1
        try:
            seconds = min(self.timeout * self.open_backoff**self.reopens, self.cap)
        except OverflowError:
            seconds = self.cap
        if wait > 0:
            seconds, cause = min(max(seconds, wait), self.cap), "retry_after"
        self.open_for, self.cause = seconds, cause
        self.openings[cause] += 1
        self.go(OPEN)

    def in_window(self) -> list[tuple[float, bool, bool]]:
        """Return the outcomes whose time bucket is one of the window's last ten."""
        if self.time_free:
            return self.outcomes
        width = max(1, round(self.window * 1000 / 10))
        current = math.floor(self.now * 1000 / width)
        return [o for o in self.outcomes if current - 10 < math.floor(o[0] * 1000 / width)]

    def timed_out(self) -> bool:
        return self.state is OPEN and self.now >= self.opened_at + self.open_for

    def notice_timeout(self) -> None:
        if self.timed_out():
            self.go(HALF_OPEN)

    def probes_in_flight(self) -> int:
        self.probes = {p: until for p, until in self.probes.items() if until > self.now}
        return len(self.probes)

    def admit(self) -> ModelTicket | None:
        self.notice_timeout()
        if self.state is CLOSED:
            return ModelTicket(self.generation, None, self.now)
        if self.state is HALF_OPEN and self.probes_in_flight() < self.half_open_max_calls:
            probe = self.next_probe
            self.next_probe += 1
            self.probes[probe] = self.now + self.lease
            return ModelTicket(self.generation, probe, self.now)
        self.rejected += 1
        return None

    def record(self, ticket: ModelTicket, outcome: str, wait: float = 0.0) -> None:
        if ticket.probe is not None:
            self.probes.pop(ticket.probe, None)
        if outcome == "ignored":
            return
        failed = outcome == "failure"
        slow = self.slow_after is not None and self.now - ticket.admitted_at > self.slow_after
        self.calls += 1
        self.failures += failed
        self.slow_calls += slow
        self.notice_timeout()
        if ticket.generation != self.generation:
            return
        wait = wait if failed else 0.0
        if self.state is CLOSED:
            self.failure_count = self.failure_count + 1 if failed else 0
            if self.failure_count >= self.failure_threshold:
                self.open("failures", wait)
                return
            if self.windowed:
                self.outcomes.append((self.now, failed, slow))
                if failed or slow:
                    self.check_rates(wait)
        elif self.state is HALF_OPEN:
            if failed:
                self.open("probe_failed", wait)
                return
            if slow:
                self.open("slow_calls")
                return
            self.success_count += 1
            if self.success_count >= self.success_threshold:
                self.go(CLOSED)

    def check_rates(self, wait: float) -> None:
        window = self.in_window()
        calls = len(window)
        if calls < self.minimum_calls:
            return
        failures = sum(1 for _, failed, _ in window if failed)
        slow = sum(1 for _, _, was_slow in window if was_slow)
        if self.failure_rate is not None and failures / calls >= self.failure_rate:
            self.open("failure_rate", wait)
        elif self.slow_rate is not None and slow / calls >= self.slow_rate:
            self.open("slow_calls", wait)

    def reset(self) -> None:
        self.notice_timeout()
        if self.state is CLOSED:
            self.generation += 1
            self.failure_count = self.success_count = 0
            self.outcomes.clear()
        else:
            self.go(CLOSED)

    def force_open(self) -> None:
        self.notice_timeout()
        if self.state is OPEN:
            self.generation += 1
            self.opened_at = self.now
        else:
            self.open("forced")

    def observed(self) -> tuple[CircuitState, int, int, float]:
        """Return (state, failure_count, success_count, retry_after) without changing anything."""
        if self.timed_out():
            return HALF_OPEN, 0, 0, 0.0
        if self.state is OPEN:
            return OPEN, 0, 0, self.opened_at + self.open_for - self.now
        if self.state is HALF_OPEN:
            held = sum(1 for until in self.probes.values() if until > self.now)
            retry = min(1.0, self.timeout) if held >= self.half_open_max_calls else 0.0
            return HALF_OPEN, 0, self.success_count, retry
        return CLOSED, self.failure_count, 0, 0.0

    def rejection_retry_after(self) -> float:
        if self.state is OPEN:
            return self.opened_at + self.open_for - self.now
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


class RateLimited(Exception):
    """A failure that says how long to leave the dependency alone."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


# Failures twice as likely as other outcomes, so that circuits open often.
OUTCOMES = st.sampled_from(["success", "failure", "failure", "excluded", "ignored"])
# With the policies: failures that carry a wait (as a multiple of the timeout, the last one
# past the cap), and, on a clock the test moves, calls that take longer than slow_call_seconds.
TIME_FREE_OUTCOMES = st.sampled_from([
    "success", "failure", "failure", "excluded", "ignored",
    "rate_limited:0.5", "rate_limited:3", "rate_limited:50",
])
POLICY_OUTCOMES = st.one_of(TIME_FREE_OUTCOMES, st.sampled_from(["slow_success", "slow_failure"]))

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
POLICY_STEP = st.tuples(
    st.just("advance"),
    st.sampled_from(["timeout_seconds", "probe_lease_seconds", "window_seconds"]),
    st.sampled_from([0.25, 0.5, 1.0, 1.5]),
)

CONFIG = st.fixed_dictionaries({
    "failure_threshold": st.integers(1, 4),
    "success_threshold": st.integers(1, 3),
    "half_open_max_calls": st.integers(1, 3),
    "timeout_seconds": st.sampled_from([1.0, 2.5, 5.0]),
    "probe_lease_seconds": st.sampled_from([0.5, 3.0, 10.0]),
})


def with_policies(timeouts: list[float]) -> st.SearchStrategy[dict[str, Any]]:
    """Return configs with ADR-003's settings and every policy, each on or off."""
    config = st.fixed_dictionaries({
        "failure_threshold": st.integers(1, 6),
        "success_threshold": st.integers(1, 3),
        "half_open_max_calls": st.integers(1, 3),
        "timeout_seconds": st.sampled_from(timeouts),
        "probe_lease_seconds": st.sampled_from([0.5, 3.0, 10.0]),
        "open_backoff": st.sampled_from([1.0, 2.0]),
        "max_timeout_factor": st.sampled_from([None, 3.0]),
        "failure_rate_threshold": st.sampled_from([None, 0.5, 1.0]),
        "window_seconds": st.sampled_from([2.0, 5.0]),
        "minimum_calls": st.integers(1, 4),
        "slow_call_seconds": st.sampled_from([None, 0.25, 1.0]),
        "slow_call_rate_threshold": st.sampled_from([None, 0.5]),
    })

    def settle(c: dict[str, Any]) -> dict[str, Any]:
        factor = c.pop("max_timeout_factor")
        c["max_timeout_seconds"] = None if factor is None else factor * c["timeout_seconds"]
        if c["slow_call_seconds"] is None:
            c["slow_call_rate_threshold"] = None
        return c

    return config.map(settle)


def model_for(config: dict[str, Any], **overrides: Any) -> Model:
    slow_rate = config.get("slow_call_rate_threshold")
    if config.get("slow_call_seconds") is not None and slow_rate is None:
        slow_rate = 1.0
    options: dict[str, Any] = {
        "failure_threshold": config["failure_threshold"],
        "timeout": config["timeout_seconds"],
        "success_threshold": config["success_threshold"],
        "half_open_max_calls": config["half_open_max_calls"],
        "lease": config["probe_lease_seconds"],
        "open_backoff": config.get("open_backoff", 1.0),
        "max_timeout": config.get("max_timeout_seconds"),
        "failure_rate": config.get("failure_rate_threshold"),
        "window": config.get("window_seconds", 30.0),
        "minimum_calls": config.get("minimum_calls", 10),
        "slow_after": config.get("slow_call_seconds"),
        "slow_rate": slow_rate,
        **overrides,
    }
    return Model(**options)


def finish(permit: Permit, outcome: str, wait: float) -> None:
    if outcome in ("success", "slow_success"):
        permit.success()
    elif outcome in ("failure", "slow_failure"):
        permit.failure(ProviderDown())
    elif outcome.startswith("rate_limited"):
        permit.failure(ProviderDown(), retry_after=wait)
    elif outcome == "excluded":
        permit.done(Declined())
    else:
        permit.release()


def model_outcome(outcome: str) -> str:
    if outcome in ("excluded", "slow_success"):
        return "success"
    if outcome.startswith(("rate_limited", "slow_failure")):
        return "failure"
    return outcome


class Run:
    """Apply the same operations to a breaker and to the model, and compare them."""

    def __init__(
        self, cb: CircuitBreaker, model: Model, compare_time: bool,
        clock: FakeClock | None = None,
    ) -> None:
        self.cb = cb
        self.model = model
        self.compare_time = compare_time
        self.clock = clock
        self.held: list[tuple[Permit, ModelTicket]] = []

    def wait_of(self, outcome: str) -> float:
        """Return the wait a rate_limited outcome asks for, in seconds."""
        if not outcome.startswith("rate_limited"):
            return 0.0
        return float(outcome.split(":")[1]) * self.model.timeout

    def advance(self, seconds: float) -> None:
        assert self.clock is not None
        self.clock.now += seconds
        self.model.now += seconds

    def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "call":
            self.call(op[1])
        elif kind == "allow":
            self.allow()
        elif kind == "finish" and self.held:
            permit, ticket = self.held.pop(op[1] % len(self.held))
            wait = self.wait_of(op[2])
            if op[2].startswith("slow"):
                self.advance(self.model.slow_after or 0.0)
            finish(permit, op[2], wait)
            self.model.record(ticket, model_outcome(op[2]), wait)
        elif kind == "reset":
            self.cb.reset()
            self.model.reset()
        elif kind == "force_open":
            self.cb.force_open()
            self.model.force_open()

    def guarded_function(self, outcome: str) -> Any:
        def fn() -> str:
            if outcome.startswith("slow"):
                # Longer than slow_call_seconds by a step that keeps the clock exact.
                self.advance((self.model.slow_after or 0.0) + 0.125)
            if outcome in ("failure", "slow_failure"):
                raise ProviderDown
            if outcome.startswith("rate_limited"):
                raise RateLimited(self.wait_of(outcome))
            if outcome == "excluded":
                raise Declined
            if outcome == "ignored":
                raise Interrupted
            return "ok"
        return fn

    def call(self, outcome: str) -> None:
        ticket = self.model.admit()
        expected: type[BaseException] | None = {
            "failure": ProviderDown, "slow_failure": ProviderDown, "excluded": Declined,
            "ignored": Interrupted,
        }.get(outcome)
        if outcome.startswith("rate_limited"):
            expected = RateLimited
        if ticket is None:
            expected = CircuitBreakerOpenError
        raised: BaseException | None = None
        try:
            self.cb.call(self.guarded_function(outcome))
        except BaseException as exc:
            raised = exc
        if expected is None:
            assert raised is None
        else:
            assert isinstance(raised, expected), raised
        if isinstance(raised, CircuitBreakerOpenError):
            self.check_rejection(raised)
        if ticket is not None:
            self.model.record(ticket, model_outcome(outcome), self.wait_of(outcome))

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
        model = self.model
        state, failure_count, success_count, retry_after = model.observed()
        assert self.cb.state is state
        assert self.cb.failure_count == failure_count
        assert self.cb.success_count == success_count
        snap = self.cb.snapshot()
        assert (snap["calls"], snap["failures"], snap["rejected"], snap["slow_calls"]) == (
            model.calls, model.failures, model.rejected, model.slow_calls,
        )
        assert snap["transitions"] == model.published_transitions()
        assert snap["open_duration"] == pytest.approx(model.open_for)
        assert (snap["reopens"], snap["open_cause"]) == (model.reopens, model.cause)
        assert snap["openings"] == {cause: n for cause, n in model.openings.items() if n}
        if model.windowed:
            window = model.in_window()
            assert (snap["window"]["calls"], snap["window"]["failures"],
                    snap["window"]["slow_calls"]) == (
                len(window), sum(f for _, f, _ in window), sum(s for _, _, s in window),
            )
        else:
            assert snap["window"] is None
        if self.compare_time:
            assert self.cb.retry_after == pytest.approx(retry_after)


def run_on_memory(config: dict[str, Any], ops: list[tuple[Any, ...]]) -> None:
    """Check a MemoryStore breaker on a fake clock against the model after every step."""
    clock = FakeClock()
    cb = CircuitBreaker(
        "payments.card", store=MemoryStore(clock=clock), is_failure=not_declined, **config
    )
    model = model_for(config, now=clock.now)
    run = Run(cb, model, compare_time=True, clock=clock)
    run.check()
    for op in ops:
        if op[0] == "advance":
            run.advance(config[op[1]] * op[2])
        else:
            run.apply(op)
        run.check()


@settings(max_examples=1000, deadline=None)
@given(
    config=CONFIG,
    ops=st.lists(st.one_of(CALL, CALL, ALLOW, FINISH, FINISH, OPERATOR, STEP), max_size=60),
)
def test_memory_breaker_agrees_with_the_model_after_every_step(
    config: dict[str, Any], ops: list[tuple[Any, ...]]
) -> None:
    run_on_memory(config, ops)


@settings(max_examples=1000, deadline=None)
@given(
    config=with_policies([1.0, 2.5, 5.0]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("call"), POLICY_OUTCOMES),
            st.tuples(st.just("call"), POLICY_OUTCOMES),
            ALLOW,
            st.tuples(st.just("finish"), st.integers(0, 3), POLICY_OUTCOMES),
            OPERATOR,
            POLICY_STEP,
        ),
        max_size=60,
    ),
)
def test_memory_breaker_with_every_policy_agrees_with_the_model_after_every_step(
    config: dict[str, Any], ops: list[tuple[Any, ...]]
) -> None:
    run_on_memory(config, ops)


REDIS_TIMEOUT = 60.0


def pass_the_timeout(client: redis.Redis, name: str, model: Model) -> None:
    """Move an OPEN circuit's opening one open duration into the past, on both sides."""
    if model.state is not OPEN or model.timed_out():
        return
    client.hincrby(f"breaker:{{{name}}}", "opened_at", -round(model.open_for * 1000))
    model.opened_at -= model.open_for


def run_on_redis(
    client: redis.Redis, url: str, config: dict[str, Any], ops: list[tuple[Any, ...]]
) -> None:
    """Check a RedisStore breaker against the model after every step of a time-free run."""
    name = f"payments.{uuid.uuid4().hex[:12]}"
    store = RedisStore.from_url(url, staleness_seconds=0)
    # Leases long enough never to run out on their own while the sequence runs, and a
    # window long enough that every outcome of the run stays in it.
    config = {**config, "timeout_seconds": REDIS_TIMEOUT, "probe_lease_seconds": 3600.0}
    if "window_seconds" in config:
        config["window_seconds"] = 3600.0
    if config.get("max_timeout_seconds") is not None:
        config["max_timeout_seconds"] = 3 * REDIS_TIMEOUT
    cb = CircuitBreaker(name, store=store, is_failure=not_declined, **config)
    run = Run(cb, model_for(config, time_free=True), compare_time=False)
    try:
        run.check()
        for op in ops:
            if op[0] == "advance":
                pass_the_timeout(client, name, run.model)
            else:
                run.apply(op)
            run.check()
    finally:
        store.client.close()


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
    run_on_redis(redis_client, redis_url, config, ops)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    # Slow calls need a clock the test moves: the memory run covers them.
    config=with_policies([REDIS_TIMEOUT]).map(
        lambda c: {**c, "slow_call_seconds": None, "slow_call_rate_threshold": None}
    ),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("call"), TIME_FREE_OUTCOMES),
            st.tuples(st.just("call"), TIME_FREE_OUTCOMES),
            ALLOW,
            st.tuples(st.just("finish"), st.integers(0, 3), TIME_FREE_OUTCOMES),
            OPERATOR,
            st.just(("advance",)),
        ),
        max_size=30,
    ),
)
def test_redis_breaker_with_the_policies_agrees_with_the_model_on_time_free_sequences(
    redis_client: redis.Redis,
    redis_url: str,
    config: dict[str, Any],
    ops: list[tuple[Any, ...]],
) -> None:
    run_on_redis(redis_client, redis_url, config, ops)
