"""The breaker's behaviour (CONTRACT.md section 2), one suite run against both stores.

MemoryStore runs on a fake clock stepped by hand; RedisStore (staleness 0, so every
call asks the server) runs on the Redis server's clock, so its timeouts are short and
`advance` waits until the server's time has moved on (tests/breaker_harness.py).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from breaker import (
    CircuitBreaker,
    CircuitBreakerListener,
    CircuitBreakerOpenError,
    CircuitState,
    MemoryStore,
    RedisStore,
)
from tests.breaker_harness import (
    NAME,
    TIMEOUT,
    FakeClock,
    Harness,
    harness_for,
    wait_server_time,
)
from tests.dependencies import Declined, Interrupted, ProviderDown, not_declined

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN

# For the tests that read retry_after and must not see the timeout run out meanwhile.
LONG_TIMEOUT = 30.0


@pytest.fixture(params=["memory", "redis"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Yield a breaker factory on MemoryStore(fake clock) or on RedisStore(staleness 0)."""
    yield from harness_for(request)


def down() -> str:
    raise ProviderDown("503 from the provider")


def up() -> str:
    return "charged"


def declined() -> str:
    raise Declined("402 card declined")


def interrupted() -> str:
    raise Interrupted


def fail(cb: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ProviderDown):
            cb.call(down)


def succeed(cb: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        assert cb.call(up) == "charged"


def open_circuit(harness: Harness, **settings: Any) -> CircuitBreaker:
    cb = harness.make(**settings)
    fail(cb, cb.config.failure_threshold)
    assert cb.state is OPEN
    return cb


def half_open_circuit(harness: Harness, **settings: Any) -> CircuitBreaker:
    cb = open_circuit(harness, **settings)
    harness.advance(cb.config.timeout_seconds)
    assert cb.state is HALF_OPEN
    return cb


def rejection(cb: CircuitBreaker) -> CircuitBreakerOpenError:
    with pytest.raises(CircuitBreakerOpenError) as caught:
        cb.call(up)
    return caught.value


# --- CLOSED -------------------------------------------------------------------------


def test_new_breaker_is_closed_with_no_counts_and_no_retry_after(harness: Harness) -> None:
    cb = harness.make()

    assert cb.state is CLOSED
    assert cb.retry_after == 0.0
    assert (cb.failure_count, cb.success_count) == (0, 0)


@pytest.mark.parametrize("threshold", [1, 3, 5])
def test_circuit_opens_after_exactly_failure_threshold_consecutive_failures(
    harness: Harness, threshold: int
) -> None:
    cb = harness.make(failure_threshold=threshold, timeout_seconds=LONG_TIMEOUT)

    fail(cb, threshold - 1)
    assert cb.state is CLOSED
    assert cb.failure_count == threshold - 1

    fail(cb)
    assert cb.state is OPEN
    assert cb.failure_count == 0


def test_success_resets_the_consecutive_failure_count(harness: Harness) -> None:
    cb = harness.make(failure_threshold=3, timeout_seconds=LONG_TIMEOUT)

    fail(cb, 2)
    succeed(cb)
    assert cb.failure_count == 0
    fail(cb, 2)
    assert cb.state is CLOSED
    assert cb.failure_count == 2

    fail(cb)
    assert cb.state is OPEN


def test_guarded_call_returns_the_result_and_passes_arguments(harness: Harness) -> None:
    cb = harness.make()

    def add(a: int, *, b: int) -> int:
        return a + b

    assert cb.call(add, 40, b=2) == 42


# --- OPEN ---------------------------------------------------------------------------


def test_open_circuit_rejects_without_calling_the_function(harness: Harness) -> None:
    cb = open_circuit(harness, timeout_seconds=LONG_TIMEOUT)
    reached: list[int] = []

    with pytest.raises(CircuitBreakerOpenError) as caught:
        cb.call(lambda: reached.append(1))

    assert reached == []
    error = caught.value
    assert error.name == NAME
    assert error.state is OPEN
    assert 0 < error.retry_after <= LONG_TIMEOUT


def test_retry_after_equals_the_timeout_right_after_opening_then_decreases(
    harness: Harness,
) -> None:
    cb = open_circuit(harness, timeout_seconds=LONG_TIMEOUT)

    first = cb.retry_after
    if harness.kind == "memory":
        assert first == LONG_TIMEOUT
    else:
        # Server milliseconds: whatever ran between the opening and this read.
        assert LONG_TIMEOUT - 1.0 < first <= LONG_TIMEOUT
    harness.advance(0.05)
    second = cb.retry_after
    assert 0 < second <= first - 0.05 + 1e-9
    assert 0 < rejection(cb).retry_after <= second


def test_rejection_retry_after_never_exceeds_the_timeout(harness: Harness) -> None:
    cb = harness.make(failure_threshold=1, timeout_seconds=LONG_TIMEOUT)

    for _ in range(20):
        fail(cb)
        assert 0 < rejection(cb).retry_after <= LONG_TIMEOUT
        cb.reset()


def test_state_reports_half_open_as_soon_as_the_timeout_passed_without_a_call(
    harness: Harness,
) -> None:
    cb = open_circuit(harness)

    harness.advance(TIMEOUT)

    assert cb.state is HALF_OPEN
    assert cb.retry_after == 0.0
    assert cb.snapshot()["state"] == "half_open"


# --- HALF_OPEN ----------------------------------------------------------------------


@pytest.mark.parametrize("max_calls", [1, 2, 3])
def test_half_open_admits_max_calls_probes_and_rejects_the_next(
    harness: Harness, max_calls: int
) -> None:
    cb = half_open_circuit(harness, half_open_max_calls=max_calls)

    permits = [cb.allow() for _ in range(max_calls)]
    assert all(permit.is_probe for permit in permits)

    error = rejection(cb)
    assert error.state is HALF_OPEN
    assert 0 < error.retry_after <= min(1.0, TIMEOUT)
    assert cb.state is HALF_OPEN
    assert 0 < cb.retry_after <= min(1.0, TIMEOUT)


def test_success_threshold_probe_successes_close_the_circuit(harness: Harness) -> None:
    cb = half_open_circuit(harness, success_threshold=3)

    succeed(cb, 2)
    assert cb.state is HALF_OPEN
    assert cb.success_count == 2

    succeed(cb)
    assert cb.state is CLOSED
    assert (cb.failure_count, cb.success_count) == (0, 0)
    assert cb.retry_after == 0.0


def test_probe_failure_reopens_the_circuit_and_restarts_the_timeout(harness: Harness) -> None:
    cb = half_open_circuit(harness)
    succeed(cb)

    fail(cb)

    # The first timeout ran out long ago: OPEN now means the timeout started again.
    assert cb.state is OPEN
    assert cb.success_count == 0
    assert 0 < cb.retry_after <= TIMEOUT
    if harness.kind == "memory":
        assert cb.retry_after == pytest.approx(TIMEOUT)
    harness.advance(TIMEOUT)
    assert cb.state is HALF_OPEN


def test_any_failing_probe_reopens_even_while_another_probe_is_in_flight(
    harness: Harness,
) -> None:
    cb = half_open_circuit(harness)
    first, second = cb.allow(), cb.allow()

    second.failure(ProviderDown())
    assert cb.state is OPEN

    first.success()
    assert cb.state is OPEN


# --- What counts as a failure -------------------------------------------------------


def test_excluded_exception_is_reraised_and_counts_as_success(harness: Harness) -> None:
    cb = harness.make(is_failure=not_declined)
    fail(cb, 2)

    with pytest.raises(Declined):
        cb.call(declined)

    assert cb.failure_count == 0
    assert cb.snapshot()["failures"] == 2
    assert cb.snapshot()["calls"] == 3


def test_excluded_exceptions_count_as_probe_successes(harness: Harness) -> None:
    cb = half_open_circuit(harness, is_failure=not_declined)

    for _ in range(2):
        with pytest.raises(Declined):
            cb.call(declined)

    assert cb.state is CLOSED


def test_open_error_from_a_nested_breaker_is_not_recorded(harness: Harness) -> None:
    outer = harness.make("payments.outer", failure_threshold=1)
    inner = harness.make("payments.inner", timeout_seconds=LONG_TIMEOUT)
    inner.force_open()

    for _ in range(3):
        with pytest.raises(CircuitBreakerOpenError) as caught:
            outer.call(inner.call, up)
        assert caught.value.name == "payments.inner"

    assert outer.state is CLOSED
    snap = outer.snapshot()
    assert (snap["calls"], snap["failures"], snap["rejected"]) == (0, 0, 0)


def test_open_error_from_a_nested_breaker_frees_the_probe_slot(harness: Harness) -> None:
    outer = half_open_circuit(harness, half_open_max_calls=1)
    inner = harness.make("payments.inner", timeout_seconds=LONG_TIMEOUT)
    inner.force_open()
    calls_before = outer.snapshot()["calls"]

    with pytest.raises(CircuitBreakerOpenError):
        outer.call(inner.call, up)

    assert outer.allow().is_probe
    assert outer.snapshot()["calls"] == calls_before


def test_base_exception_frees_the_probe_slot_without_counting(harness: Harness) -> None:
    cb = half_open_circuit(harness, half_open_max_calls=1)
    calls_before = cb.snapshot()["calls"]

    with pytest.raises(Interrupted):
        cb.call(interrupted)

    assert cb.state is HALF_OPEN
    assert cb.success_count == 0
    assert cb.snapshot()["calls"] == calls_before
    assert cb.allow().is_probe


def test_base_exception_in_closed_state_is_not_a_failure(harness: Harness) -> None:
    cb = harness.make(failure_threshold=1)

    with pytest.raises(Interrupted):
        cb.call(interrupted)

    assert cb.state is CLOSED
    assert cb.snapshot()["failures"] == 0


# --- Decorator and two-step form ----------------------------------------------------


def test_decorator_guards_every_call_of_the_function(harness: Harness) -> None:
    cb = harness.make(failure_threshold=2, timeout_seconds=LONG_TIMEOUT)
    reached: list[int] = []

    @cb
    def charge(amount: int, *, fail: bool = False) -> int:
        """Charge an amount."""
        reached.append(amount)
        if fail:
            raise ProviderDown
        return amount

    assert charge.__name__ == "charge"
    assert charge.__doc__ == "Charge an amount."
    assert charge(5) == 5
    for amount in (6, 7):
        with pytest.raises(ProviderDown):
            charge(amount, fail=True)
    with pytest.raises(CircuitBreakerOpenError):
        charge(8)

    assert reached == [5, 6, 7]


def test_permit_success_and_failure_are_recorded(harness: Harness) -> None:
    cb = harness.make(failure_threshold=2, timeout_seconds=LONG_TIMEOUT)

    permit = cb.allow()
    assert not permit.is_probe
    permit.failure(ProviderDown())
    assert cb.failure_count == 1
    cb.allow().success()
    assert cb.failure_count == 0
    cb.allow().failure()
    cb.allow().failure()

    assert cb.state is OPEN
    with pytest.raises(CircuitBreakerOpenError):
        cb.allow()


def test_permit_done_judges_the_error_with_is_failure(harness: Harness) -> None:
    cb = harness.make(failure_threshold=2, is_failure=not_declined)

    cb.allow().done(ProviderDown())
    assert cb.failure_count == 1
    cb.allow().done(Declined())
    assert cb.failure_count == 0
    cb.allow().done(ProviderDown())
    cb.allow().done()
    assert cb.failure_count == 0
    cb.allow().done(Interrupted())

    snap = cb.snapshot()
    assert (snap["calls"], snap["failures"]) == (4, 2)


def test_permit_release_frees_the_probe_slot_and_counts_nothing(harness: Harness) -> None:
    cb = half_open_circuit(harness, half_open_max_calls=1)
    calls_before = cb.snapshot()["calls"]
    permit = cb.allow()
    with pytest.raises(CircuitBreakerOpenError):
        cb.allow()

    permit.release()

    assert cb.allow().is_probe
    assert cb.snapshot()["calls"] == calls_before


def test_permit_block_reports_its_end_unless_the_block_reported(harness: Harness) -> None:
    cb = harness.make(failure_threshold=3, is_failure=not_declined)

    with cb.permit() as permit:
        assert not permit.is_probe
    with pytest.raises(ProviderDown), cb.permit():
        raise ProviderDown
    with pytest.raises(Declined), cb.permit():
        raise Declined
    with cb.permit() as permit:
        permit.failure(ProviderDown())
    with pytest.raises(Interrupted), cb.permit():
        raise Interrupted

    assert cb.failure_count == 1
    snap = cb.snapshot()
    assert (snap["calls"], snap["failures"]) == (4, 2)


@pytest.mark.parametrize("second_use", ["success", "failure", "done", "release"])
@pytest.mark.parametrize("first_use", ["success", "failure", "done", "release"])
def test_permit_used_twice_raises_runtime_error(
    harness: Harness, first_use: str, second_use: str
) -> None:
    cb = harness.make()
    permit = cb.allow()
    getattr(permit, first_use)()
    before = cb.snapshot()

    with pytest.raises(RuntimeError, match="already used"):
        getattr(permit, second_use)()

    after = cb.snapshot()
    assert (after["calls"], after["failures"]) == (before["calls"], before["failures"])


def test_stale_permit_from_before_opening_does_not_change_the_new_state(
    harness: Harness,
) -> None:
    cb = harness.make()
    stale_success, stale_failure = cb.allow(), cb.allow()
    fail(cb, 3)
    harness.advance(TIMEOUT)
    assert cb.allow().is_probe

    stale_success.success()
    assert cb.success_count == 0
    stale_failure.failure(ProviderDown())
    assert cb.state is HALF_OPEN

    snap = cb.snapshot()
    assert (snap["calls"], snap["failures"]) == (5, 4)


def test_stale_failures_from_before_a_reset_do_not_reopen(harness: Harness) -> None:
    cb = harness.make(failure_threshold=1)
    stale = cb.allow()
    cb.reset()

    stale.failure(ProviderDown())

    assert cb.state is CLOSED
    assert cb.failure_count == 0


def test_stale_probe_result_from_an_earlier_half_open_period_is_ignored(
    harness: Harness,
) -> None:
    cb = half_open_circuit(harness, success_threshold=1)
    stale_probe = cb.allow()
    fail(cb)
    harness.advance(TIMEOUT)
    assert cb.state is HALF_OPEN

    stale_probe.success()

    assert cb.state is HALF_OPEN
    succeed(cb)
    assert cb.state is CLOSED


def test_permit_keeps_the_generation_it_was_admitted_in_when_a_listener_moves_the_circuit(
    harness: Harness,
) -> None:
    class CloseOnHalfOpen(CircuitBreakerListener):
        def state_change(
            self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState, cause: str
        ) -> None:
            if new is HALF_OPEN:
                breaker.reset()

    cb = open_circuit(harness, failure_threshold=1, listeners=[CloseOnHalfOpen()])
    harness.advance(TIMEOUT)

    # This admission makes the circuit half-open; the listener resets it before it returns.
    probe = cb.allow()
    assert probe.is_probe
    assert cb.state is CLOSED
    probe.failure(ProviderDown())

    assert cb.state is CLOSED
    assert cb.failure_count == 0


# --- Operators ----------------------------------------------------------------------


def test_reset_closes_and_clears_counts_but_keeps_totals(harness: Harness) -> None:
    cb = open_circuit(harness, timeout_seconds=LONG_TIMEOUT)
    rejection(cb)

    cb.reset()

    assert cb.state is CLOSED
    assert (cb.failure_count, cb.success_count, cb.retry_after) == (0, 0, 0.0)
    snap = cb.snapshot()
    assert (snap["calls"], snap["failures"], snap["rejected"]) == (3, 3, 1)
    assert snap["transitions"] == {"closed->open": 1, "open->closed": 1}
    succeed(cb)


def test_reset_in_closed_state_clears_the_failure_count(harness: Harness) -> None:
    cb = harness.make()
    fail(cb, 2)

    cb.reset()

    assert cb.failure_count == 0
    fail(cb, 2)
    assert cb.state is CLOSED


def test_reset_in_half_open_state_clears_the_success_count(harness: Harness) -> None:
    cb = half_open_circuit(harness, success_threshold=3)
    succeed(cb)

    cb.reset()

    assert cb.state is CLOSED
    assert cb.success_count == 0
    assert cb.snapshot()["transitions"]["half_open->closed"] == 1


def test_force_open_rejects_calls_for_one_timeout(harness: Harness) -> None:
    cb = harness.make()
    fail(cb, 2)

    cb.force_open()

    assert cb.state is OPEN
    assert cb.failure_count == 0
    assert 0 < cb.retry_after <= TIMEOUT
    assert rejection(cb).state is OPEN
    assert cb.snapshot()["failures"] == 2
    harness.advance(TIMEOUT)
    assert cb.state is HALF_OPEN


def test_force_open_on_an_open_circuit_restarts_its_timeout(harness: Harness) -> None:
    cb = open_circuit(harness, timeout_seconds=LONG_TIMEOUT)
    harness.advance(0.05)
    before = cb.retry_after

    cb.force_open()

    assert before < cb.retry_after <= LONG_TIMEOUT
    assert cb.snapshot()["transitions"] == {"closed->open": 1}


# --- snapshot() ---------------------------------------------------------------------

CONTRACT_FIELDS = {
    "name", "state", "failure_count", "success_count", "retry_after", "opened_at", "calls",
    "failures", "rejected", "transitions", "seconds_in_state",
}


def test_snapshot_of_a_new_breaker_has_every_contract_field(harness: Harness) -> None:
    snap = harness.make().snapshot()

    assert set(snap) >= CONTRACT_FIELDS
    assert json.loads(json.dumps(snap)) == snap
    assert snap["name"] == NAME
    assert snap["state"] == "closed"
    assert snap["opened_at"] is None
    assert (snap["calls"], snap["failures"], snap["rejected"]) == (0, 0, 0)
    assert snap["transitions"] == {}
    assert set(snap["seconds_in_state"]) == {"closed", "open", "half_open"}
    assert snap["store"] == harness.kind


def test_snapshot_counts_a_full_open_and_recovery_cycle(harness: Harness) -> None:
    cb = harness.make()
    succeed(cb)
    fail(cb, 3)
    rejection(cb)
    rejection(cb)
    harness.advance(TIMEOUT)
    succeed(cb, 2)

    snap = cb.snapshot()

    assert json.loads(json.dumps(snap)) == snap
    assert snap["state"] == "closed"
    assert (snap["failure_count"], snap["success_count"], snap["retry_after"]) == (0, 0, 0)
    assert (snap["calls"], snap["failures"], snap["rejected"]) == (6, 3, 2)
    assert snap["transitions"] == {
        "closed->open": 1, "half_open->closed": 1, "open->half_open": 1,
    }
    assert isinstance(snap["opened_at"], float)
    assert abs(snap["opened_at"] - time.time()) < 60
    seconds = snap["seconds_in_state"]
    # OPEN ends when the timeout runs out, however late the next call notices it.
    assert seconds["open"] == TIMEOUT
    assert seconds["closed"] >= 0
    assert seconds["half_open"] >= 0


def test_snapshot_of_an_open_circuit_reports_retry_after_and_opened_at(
    harness: Harness,
) -> None:
    cb = open_circuit(harness, timeout_seconds=LONG_TIMEOUT)

    snap = cb.snapshot()

    assert snap["state"] == "open"
    assert 0 < snap["retry_after"] <= LONG_TIMEOUT
    assert snap["opened_at"] is not None
    assert snap["transitions"] == {"closed->open": 1}


def test_snapshot_counts_a_timeout_that_ran_out_unnoticed(harness: Harness) -> None:
    cb = open_circuit(harness)
    harness.advance(TIMEOUT)

    snap = cb.snapshot()

    assert snap["state"] == "half_open"
    assert snap["transitions"] == {"closed->open": 1, "open->half_open": 1}
    assert snap["seconds_in_state"]["open"] == TIMEOUT


def test_memory_and_redis_stores_give_the_same_snapshot_for_the_same_calls(
    redis_url: str,
) -> None:
    clock = FakeClock()
    memory = Harness("memory", MemoryStore(clock=clock), clock.advance)
    redis_store = RedisStore.from_url(redis_url, staleness_seconds=0)
    shared = Harness("redis", redis_store, functools.partial(wait_server_time, redis_store.client))

    snapshots = []
    for harness in (memory, shared):
        cb = harness.make(is_failure=not_declined)
        fail(cb, 2)
        with pytest.raises(Declined):
            cb.call(declined)
        fail(cb, 3)
        rejection(cb)
        harness.advance(TIMEOUT)
        succeed(cb)
        fail(cb)
        rejection(cb)
        harness.advance(TIMEOUT)
        succeed(cb, 2)
        fail(cb)
        cb.force_open()
        rejection(cb)
        cb.reset()
        snapshots.append(cb.snapshot())
    redis_store.client.close()

    time_fields = {"retry_after", "opened_at", "seconds_in_state", "store"}
    in_memory, in_redis = ({k: v for k, v in s.items() if k not in time_fields}
                           for s in snapshots)
    assert in_memory == in_redis
    assert in_memory["transitions"] == {
        "closed->open": 2, "half_open->closed": 1, "half_open->open": 1,
        "open->closed": 1, "open->half_open": 2,
    }
    assert (in_memory["calls"], in_memory["failures"], in_memory["rejected"]) == (11, 7, 3)
    # Two timeouts ran out; the forced opening lasted no time on the fake clock.
    assert snapshots[0]["seconds_in_state"]["open"] == 2 * TIMEOUT
    assert snapshots[1]["seconds_in_state"]["open"] >= 2 * TIMEOUT


# --- Logs and listeners -------------------------------------------------------------


def transition_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "breaker" and r.levelno == logging.INFO]


def test_each_transition_is_logged_exactly_once_with_the_contract_text(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="breaker")
    cb = harness.make()

    fail(cb, 3)
    for _ in range(3):
        rejection(cb)
        assert cb.state is OPEN
    harness.advance(TIMEOUT)
    for _ in range(3):
        assert cb.state is HALF_OPEN
        cb.snapshot()
    succeed(cb)
    succeed(cb)
    succeed(cb)

    assert transition_lines(caplog) == [
        f"Circuit breaker {NAME} opened after 3 failures",
        f"Circuit breaker {NAME} entering half-open state",
        f"Circuit breaker {NAME} closed after successful recovery",
    ]


def test_failed_probe_and_operator_actions_log_one_line_each(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="breaker")
    cb = half_open_circuit(harness)
    fail(cb)
    cb.reset()
    cb.reset()
    cb.force_open()

    lines = transition_lines(caplog)

    # closed->open, open->half_open, half_open->open, open->closed, closed->open
    transitions = sum(cb.snapshot()["transitions"].values())
    assert transitions == 5
    assert len(lines) == transitions
    assert all(line.startswith(f"Circuit breaker {NAME} ") for line in lines)


@dataclass
class RecordingListener(CircuitBreakerListener):
    changes: list[tuple[str, str, str]] = field(default_factory=list)
    successes: int = 0
    failures: list[BaseException | None] = field(default_factory=list)
    rejections: list[CircuitBreakerOpenError] = field(default_factory=list)

    def state_change(
        self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState, cause: str
    ) -> None:
        self.changes.append((old.value, new.value, cause))

    def success(self, breaker: CircuitBreaker) -> None:
        self.successes += 1

    def failure(self, breaker: CircuitBreaker, exc: BaseException | None) -> None:
        self.failures.append(exc)

    def rejected(self, breaker: CircuitBreaker, error: CircuitBreakerOpenError) -> None:
        self.rejections.append(error)


def test_listeners_hear_outcomes_rejections_and_transitions(harness: Harness) -> None:
    listener = RecordingListener()
    cb = harness.make(listeners=[listener], is_failure=not_declined)

    succeed(cb)
    with pytest.raises(Declined):
        cb.call(declined)
    fail(cb, 3)
    rejection(cb)
    harness.advance(TIMEOUT)
    succeed(cb, 2)
    cb.force_open()
    cb.reset()

    assert listener.successes == 4
    assert len(listener.failures) == 3
    assert all(isinstance(exc, ProviderDown) for exc in listener.failures)
    assert [error.state for error in listener.rejections] == [OPEN]
    assert listener.changes == [
        ("closed", "open", "failures"),
        ("open", "half_open", "timeout"),
        ("half_open", "closed", "recovered"),
        ("closed", "open", "forced"),
        ("open", "closed", "reset"),
    ]


def test_listener_may_use_the_breaker_without_deadlock(harness: Harness) -> None:
    seen: list[str] = []

    class Inspector(CircuitBreakerListener):
        def state_change(
            self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState, cause: str
        ) -> None:
            seen.append(breaker.snapshot()["state"])

    cb = harness.make(listeners=[Inspector()])
    fail(cb, 3)

    assert seen == ["open"]


# --- Probe leases -------------------------------------------------------------------


def test_probe_lease_expiry_frees_the_slot_of_a_probe_that_never_reports(
    harness: Harness,
) -> None:
    cb = half_open_circuit(harness, half_open_max_calls=1, probe_lease_seconds=0.1)
    lost = cb.allow()
    with pytest.raises(CircuitBreakerOpenError):
        cb.allow()

    harness.advance(0.1)

    replacement = cb.allow()
    assert replacement.is_probe
    replacement.success()
    lost.success()
    assert cb.state is CLOSED
