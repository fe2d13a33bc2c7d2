"""The policies beyond ADR-003, one suite run against both stores (tests/breaker_harness.py).

Open-duration backoff, a dependency's own wait (Retry-After), the failure-rate window and
slow calls. With their defaults left alone the breaker is ADR-003's
(tests/test_state_machine.py); each test here turns one policy on.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
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
    FakeClock,
    Harness,
    harness_for,
    wait_server_time,
)
from tests.dependencies import ProviderDown

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN

LONG = 30.0
# A call this long is slow; calls that do nothing take far less, even through Redis.
SLOW = 0.2
SLOWER = 0.25


@pytest.fixture(params=["memory", "redis"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Yield a breaker factory on MemoryStore(fake clock) or on RedisStore(staleness 0)."""
    yield from harness_for(request)


class RateLimited(Exception):
    """A 429 whose Retry-After the provider client put on the exception."""

    def __init__(self, retry_after: Any) -> None:
        super().__init__("429 Too Many Requests")
        self.retry_after = retry_after


def down() -> str:
    raise ProviderDown("503 from the provider")


def fail(cb: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ProviderDown):
            cb.call(down)


def succeed(cb: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        assert cb.call(lambda: "charged") == "charged"


def slow_call(harness: Harness, cb: CircuitBreaker, failed: bool = False) -> None:
    """Make one call that takes longer than SLOW on the breaker's clock."""
    permit = cb.allow()
    harness.advance(SLOWER)
    if failed:
        permit.failure(ProviderDown())
    else:
        permit.success()


def assert_open_for(harness: Harness, cb: CircuitBreaker, seconds: float) -> None:
    """Check the circuit is OPEN and stays so for seconds (less what ran since it opened)."""
    assert cb.state is OPEN
    assert cb.snapshot()["open_duration"] == pytest.approx(seconds)
    if harness.kind == "memory":
        assert cb.retry_after == pytest.approx(seconds)
    else:
        # Server milliseconds: whatever ran between the opening and this read.
        assert seconds - 0.1 < cb.retry_after <= seconds


def wait_out(harness: Harness, cb: CircuitBreaker) -> None:
    """Let the current opening run out."""
    harness.advance(cb.snapshot()["open_duration"])
    assert cb.state is HALF_OPEN


# --- Open-duration backoff ------------------------------------------------------------


def test_each_failed_probe_multiplies_the_open_duration_up_to_the_cap(harness: Harness) -> None:
    cb = harness.make(
        failure_threshold=1, timeout_seconds=0.1, open_backoff=2.0, max_timeout_seconds=0.3
    )
    fail(cb)
    assert_open_for(harness, cb, 0.1)

    for expected in (0.2, 0.3, 0.3):
        wait_out(harness, cb)
        fail(cb)
        assert_open_for(harness, cb, expected)

    snap = cb.snapshot()
    assert snap["reopens"] == 3
    assert snap["open_cause"] == "probe_failed"
    assert snap["openings"] == {"failures": 1, "probe_failed": 3}


def test_a_close_resets_the_open_duration_to_the_timeout(harness: Harness) -> None:
    cb = harness.make(
        failure_threshold=1, success_threshold=1, timeout_seconds=0.1, open_backoff=3.0,
        max_timeout_seconds=1.0,
    )
    fail(cb)
    wait_out(harness, cb)
    fail(cb)
    assert_open_for(harness, cb, 0.3)
    wait_out(harness, cb)

    succeed(cb)

    assert cb.state is CLOSED
    snap = cb.snapshot()
    assert (snap["open_duration"], snap["reopens"]) == (0.1, 0)
    fail(cb)
    assert_open_for(harness, cb, 0.1)


def test_an_operator_reset_also_resets_the_open_duration(harness: Harness) -> None:
    cb = harness.make(failure_threshold=1, timeout_seconds=0.1, open_backoff=4.0)
    fail(cb)
    wait_out(harness, cb)
    fail(cb)
    assert_open_for(harness, cb, 0.4)

    cb.reset()
    fail(cb)

    assert_open_for(harness, cb, 0.1)


def test_without_backoff_every_reopening_lasts_the_timeout(harness: Harness) -> None:
    cb = harness.make(failure_threshold=1, timeout_seconds=0.1)
    fail(cb)

    for _ in range(3):
        wait_out(harness, cb)
        fail(cb)
        assert_open_for(harness, cb, 0.1)

    assert cb.snapshot()["reopens"] == 3


def test_backoff_without_a_cap_stops_at_ten_timeouts(harness: Harness) -> None:
    cb = harness.make(failure_threshold=1, timeout_seconds=0.05, open_backoff=100.0)
    fail(cb)
    wait_out(harness, cb)

    fail(cb)

    assert_open_for(harness, cb, 0.5)


def test_forcing_a_half_open_circuit_open_does_not_count_as_a_failed_probe(
    harness: Harness,
) -> None:
    cb = harness.make(failure_threshold=1, timeout_seconds=0.1, open_backoff=2.0)
    fail(cb)
    wait_out(harness, cb)

    cb.force_open()

    assert_open_for(harness, cb, 0.1)
    snap = cb.snapshot()
    assert (snap["reopens"], snap["open_cause"]) == (0, "forced")


# --- The dependency's own wait (Retry-After) -----------------------------------------


def test_failure_with_retry_after_keeps_the_circuit_open_that_long(harness: Harness) -> None:
    cb = harness.make(failure_threshold=2, timeout_seconds=0.1, max_timeout_seconds=60.0)
    fail(cb)

    cb.allow().failure(ProviderDown(), retry_after=20)

    assert_open_for(harness, cb, 20.0)
    with pytest.raises(CircuitBreakerOpenError) as refused:
        cb.call(down)
    assert 19.0 < refused.value.retry_after <= 20.0
    snap = cb.snapshot()
    assert snap["open_cause"] == "retry_after"
    assert snap["openings"] == {"retry_after": 1}


def test_exception_with_a_retry_after_attribute_carries_the_dependencys_wait(
    harness: Harness,
) -> None:
    cb = harness.make(failure_threshold=1, timeout_seconds=2.0)

    with pytest.raises(RateLimited):
        cb.call(functools.partial(_raise, RateLimited(12.5)))

    assert_open_for(harness, cb, 12.5)


def _raise(exc: BaseException) -> None:
    raise exc


def test_retry_after_is_capped_by_max_timeout_and_by_default_at_ten_timeouts(
    harness: Harness,
) -> None:
    capped = harness.make("payments.capped", failure_threshold=1, max_timeout_seconds=5.0)
    default = harness.make("payments.default", failure_threshold=1, timeout_seconds=1.5)

    capped.allow().failure(ProviderDown(), retry_after=3600)
    default.allow().done(RateLimited(3600))

    assert_open_for(harness, capped, 5.0)
    assert_open_for(harness, default, 15.0)


def test_retry_after_shorter_than_the_open_duration_does_not_shorten_it(
    harness: Harness,
) -> None:
    cb = harness.make(failure_threshold=1, timeout_seconds=LONG)

    cb.allow().failure(ProviderDown(), retry_after=1)

    assert_open_for(harness, cb, LONG)


def test_retry_after_of_a_failure_that_does_not_open_is_not_remembered(
    harness: Harness,
) -> None:
    cb = harness.make(failure_threshold=2, timeout_seconds=LONG)

    cb.allow().failure(ProviderDown(), retry_after=300)
    assert cb.state is CLOSED
    assert cb.failure_count == 1
    fail(cb)

    assert_open_for(harness, cb, LONG)
    assert cb.snapshot()["open_cause"] == "failures"


def test_failed_probe_with_retry_after_reopens_for_the_longer_of_backoff_and_wait(
    harness: Harness,
) -> None:
    cb = harness.make(
        failure_threshold=1, timeout_seconds=0.1, open_backoff=2.0, max_timeout_seconds=60.0
    )
    fail(cb)
    wait_out(harness, cb)

    cb.allow().failure(ProviderDown(), retry_after=5)

    assert_open_for(harness, cb, 5.0)
    assert cb.snapshot()["reopens"] == 1


def test_after_a_retry_after_opening_the_backoff_goes_on_from_the_policys_duration(
    harness: Harness,
) -> None:
    cb = harness.make(
        failure_threshold=1, timeout_seconds=0.1, open_backoff=2.0, max_timeout_seconds=60.0
    )
    cb.allow().failure(ProviderDown(), retry_after=0.3)
    assert_open_for(harness, cb, 0.3)
    wait_out(harness, cb)

    fail(cb)

    assert_open_for(harness, cb, 0.2)


def test_stale_failure_with_retry_after_does_not_reopen_a_reset_circuit(
    harness: Harness,
) -> None:
    cb = harness.make(failure_threshold=1)
    stale = cb.allow()
    cb.reset()

    stale.failure(ProviderDown(), retry_after=60)

    assert cb.state is CLOSED
    assert cb.snapshot()["failures"] == 1


@pytest.mark.parametrize("wait", [-1, float("nan"), float("inf"), "10", True])
def test_explicit_retry_after_that_is_not_a_number_of_seconds_raises_and_keeps_the_permit(
    harness: Harness, wait: Any
) -> None:
    cb = harness.make(failure_threshold=1)
    permit = cb.allow()

    with pytest.raises(ValueError, match=r"\bretry_after\b"):
        permit.failure(ProviderDown(), retry_after=wait)

    assert not permit.used
    permit.failure(ProviderDown())
    assert cb.state is OPEN


@pytest.mark.parametrize("wait", [-1, 0, float("nan"), "120", None, True])
def test_exception_retry_after_that_is_not_a_positive_number_is_ignored(
    harness: Harness, wait: Any
) -> None:
    cb = harness.make(failure_threshold=1, timeout_seconds=LONG)

    cb.allow().done(RateLimited(wait))

    assert_open_for(harness, cb, LONG)
    assert cb.snapshot()["open_cause"] == "failures"


# --- Failure-rate window ---------------------------------------------------------------

# Consecutive failures alone would need 100 in a row.
RATE: dict[str, Any] = {
    "failure_threshold": 100, "failure_rate_threshold": 0.5, "minimum_calls": 4,
    "window_seconds": LONG, "timeout_seconds": LONG,
}


def test_failure_rate_opens_a_circuit_that_no_run_of_consecutive_failures_would(
    harness: Harness,
) -> None:
    cb = harness.make(**RATE)

    succeed(cb)
    fail(cb)
    succeed(cb)
    assert cb.state is CLOSED
    fail(cb)

    assert cb.state is OPEN
    snap = cb.snapshot()
    assert snap["open_cause"] == "failure_rate"
    assert snap["openings"] == {"failure_rate": 1}


def test_failure_rate_waits_for_minimum_calls(harness: Harness) -> None:
    cb = harness.make(**RATE)

    fail(cb, 3)

    assert cb.state is CLOSED
    assert cb.snapshot()["window"] == {
        "seconds": LONG, "calls": 3, "failures": 3, "slow_calls": 0,
        "failure_rate": 1.0, "slow_call_rate": 0.0,
    }
    fail(cb)
    assert cb.state is OPEN


def test_failure_rate_below_the_threshold_keeps_the_circuit_closed(harness: Harness) -> None:
    cb = harness.make(**RATE)

    for _ in range(3):
        succeed(cb, 2)
        fail(cb)

    assert cb.state is CLOSED
    window = cb.snapshot()["window"]
    assert (window["calls"], window["failures"], window["failure_rate"]) == (9, 3, 0.3333)


def test_rate_at_exactly_the_threshold_opens(harness: Harness) -> None:
    cb = harness.make(**{**RATE, "failure_rate_threshold": 0.3, "minimum_calls": 10})

    succeed(cb, 7)
    fail(cb, 2)
    assert cb.state is CLOSED
    fail(cb)

    assert cb.state is OPEN


def test_outcomes_older_than_the_window_no_longer_count(harness: Harness) -> None:
    cb = harness.make(**{**RATE, "window_seconds": 0.5})
    fail(cb, 3)

    # The window is ten buckets of 0.05 s: one bucket more and those failures are out.
    harness.advance(0.55)
    fail(cb)

    assert cb.state is CLOSED
    assert cb.snapshot()["window"]["calls"] == 1


def test_a_transition_empties_the_window(harness: Harness) -> None:
    cb = harness.make(**RATE)
    fail(cb, 3)

    cb.reset()

    assert cb.snapshot()["window"]["calls"] == 0
    fail(cb, 3)
    assert cb.state is CLOSED
    cb.force_open()
    assert cb.snapshot()["window"]["calls"] == 0


def test_consecutive_failures_still_open_the_circuit_beside_a_rate_rule(
    harness: Harness,
) -> None:
    cb = harness.make(failure_threshold=3, failure_rate_threshold=0.9, minimum_calls=50)

    fail(cb, 3)

    assert cb.state is OPEN
    assert cb.snapshot()["open_cause"] == "failures"


def test_opening_on_the_rate_honours_the_failures_retry_after(harness: Harness) -> None:
    cb = harness.make(**{**RATE, "timeout_seconds": 0.1, "max_timeout_seconds": 60.0})
    fail(cb, 3)

    cb.allow().failure(ProviderDown(), retry_after=10)

    assert_open_for(harness, cb, 10.0)
    assert cb.snapshot()["open_cause"] == "retry_after"


def test_window_is_null_in_the_snapshot_without_a_rate_rule(harness: Harness) -> None:
    assert harness.make().snapshot()["window"] is None


# --- Slow calls ------------------------------------------------------------------------

SLOW_RULE: dict[str, Any] = {
    "failure_threshold": 100, "slow_call_seconds": SLOW, "slow_call_rate_threshold": 0.5,
    "minimum_calls": 2, "window_seconds": LONG, "timeout_seconds": LONG,
}


def test_slow_calls_open_the_circuit_on_their_share(harness: Harness) -> None:
    cb = harness.make(**SLOW_RULE)

    succeed(cb)
    slow_call(harness, cb)

    assert cb.state is OPEN
    snap = cb.snapshot()
    assert snap["open_cause"] == "slow_calls"
    assert (snap["slow_calls"], snap["calls"], snap["failures"]) == (1, 2, 0)


def test_a_call_is_timed_from_admission_to_report_on_the_breakers_clock(
    harness: Harness,
) -> None:
    cb = harness.make(**{**SLOW_RULE, "minimum_calls": 100})

    permit = cb.allow()
    harness.advance(SLOW / 2)
    permit.success()
    assert cb.snapshot()["slow_calls"] == 0
    slow_call(harness, cb, failed=True)

    def slow_and_down() -> str:
        harness.advance(SLOWER)
        return down()

    with pytest.raises(ProviderDown):
        cb.call(slow_and_down)

    snap = cb.snapshot()
    assert (snap["slow_calls"], snap["failures"]) == (2, 2)
    assert snap["window"]["slow_call_rate"] == pytest.approx(2 / 3, abs=1e-4)


def test_slow_call_rate_left_out_opens_only_when_every_call_is_slow(harness: Harness) -> None:
    cb = harness.make(failure_threshold=100, slow_call_seconds=SLOW, minimum_calls=2)

    succeed(cb)
    slow_call(harness, cb)
    assert cb.state is CLOSED
    cb.reset()
    slow_call(harness, cb)
    slow_call(harness, cb)

    assert cb.state is OPEN
    assert cb.snapshot()["config"]["slow_call_rate_threshold"] == 1.0


def test_a_slow_probe_reopens_the_circuit(harness: Harness) -> None:
    cb = harness.make(failure_threshold=1, timeout_seconds=0.1, slow_call_seconds=SLOW)
    fail(cb)
    wait_out(harness, cb)

    slow_call(harness, cb)

    assert cb.state is OPEN
    snap = cb.snapshot()
    assert snap["open_cause"] == "slow_calls"
    assert snap["transitions"]["half_open->open"] == 1


def test_a_slow_success_still_clears_the_consecutive_failure_count(harness: Harness) -> None:
    cb = harness.make(failure_threshold=2, slow_call_seconds=SLOW, minimum_calls=100)
    fail(cb)

    slow_call(harness, cb)

    assert cb.failure_count == 0
    assert cb.snapshot()["slow_calls"] == 1


# --- Logs, listeners and the two stores agreeing -----------------------------------------


def test_each_opening_is_logged_with_its_cause_and_any_longer_duration(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="breaker")
    rate = harness.make("payments.rate", **RATE)
    waited = harness.make("payments.waited", failure_threshold=1, max_timeout_seconds=60)
    backoff = harness.make(
        "payments.backoff", failure_threshold=1, timeout_seconds=0.1, open_backoff=2.0
    )

    fail(rate, 4)
    waited.allow().failure(ProviderDown(), retry_after=20)
    fail(backoff)
    wait_out(harness, backoff)
    fail(backoff)

    lines = [r.getMessage() for r in caplog.records
             if r.name == "breaker" and r.levelno == logging.INFO]
    assert lines == [
        "Circuit breaker payments.rate opened: failures reached 50% of 4 calls in 30 s",
        "Circuit breaker payments.waited opened as long as the dependency asked "
        "(Retry-After), for 20 s",
        "Circuit breaker payments.backoff opened after 1 failures",
        "Circuit breaker payments.backoff entering half-open state",
        "Circuit breaker payments.backoff opened again after a failed probe, for 0.2 s",
    ]


def test_memory_and_redis_stores_give_the_same_snapshot_with_every_policy_on(
    redis_url: str,
) -> None:
    clock = FakeClock()
    memory = Harness("memory", MemoryStore(clock=clock), clock.advance)
    redis_store = RedisStore.from_url(redis_url, staleness_seconds=0)
    shared = Harness("redis", redis_store, functools.partial(wait_server_time, redis_store.client))
    settings: dict[str, Any] = {
        "failure_threshold": 5, "timeout_seconds": 0.1, "open_backoff": 2.0,
        "max_timeout_seconds": 1.0, "failure_rate_threshold": 0.5, "minimum_calls": 4,
        "window_seconds": LONG, "slow_call_seconds": SLOW, "slow_call_rate_threshold": 0.5,
    }

    snapshots = []
    for harness in (memory, shared):
        cb = harness.make(**settings)
        succeed(cb, 2)
        fail(cb, 2)
        wait_out(harness, cb)
        fail(cb)
        wait_out(harness, cb)
        succeed(cb)
        cb.allow().failure(ProviderDown(), retry_after=0.7)
        wait_out(harness, cb)
        succeed(cb, 2)
        succeed(cb, 2)
        slow_call(harness, cb)
        slow_call(harness, cb)
        snapshots.append(cb.snapshot())
    redis_store.client.close()

    time_fields = {"retry_after", "opened_at", "seconds_in_state", "store"}
    in_memory, in_redis = ({k: v for k, v in s.items() if k not in time_fields}
                           for s in snapshots)
    assert json.loads(json.dumps(in_redis)) == in_redis
    assert in_memory == in_redis
    assert in_memory["openings"] == {
        "failure_rate": 1, "probe_failed": 1, "retry_after": 1, "slow_calls": 1,
    }
    assert in_memory["transitions"]["half_open->closed"] == 1
    assert (in_memory["state"], in_memory["open_cause"], in_memory["reopens"]) == (
        "open", "slow_calls", 0,
    )


def test_listeners_hear_the_cause_of_each_opening(harness: Harness) -> None:
    causes: list[tuple[str, str, str]] = []

    class Causes(CircuitBreakerListener):
        def state_change(
            self, breaker: Any, old: CircuitState, new: CircuitState, cause: str
        ) -> None:
            causes.append((old.value, new.value, cause))

    cb = harness.make(listeners=[Causes()], **RATE)

    fail(cb, 4)
    cb.reset()
    fail(cb, 3)
    cb.allow().failure(ProviderDown(), retry_after=1)

    assert causes == [
        ("closed", "open", "failure_rate"),
        ("open", "closed", "reset"),
        ("closed", "open", "retry_after"),
    ]
    assert cb.snapshot()["open_duration"] == LONG
