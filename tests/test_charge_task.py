"""The payments.charge task in an embedded worker, on the private Redis and the sandbox."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery.result import AsyncResult

from breaker import CircuitState
from tests.embedded import (
    DEFERRED,
    ORDER,
    RESULT_WAIT,
    RETRYING,
    Worker,
    ledger_total,
    try_allow,
)
from tests.redis_server import free_port
from tests.waiting import wait_until
from workers import charging
from workers.charging import Progress
from workers.errors import ChargeExpired, ChargeFailed, ChargeRejected
from workers.runtime import runtime
from workers.sandbox import SandboxControl


def test_a_healthy_charge_succeeds_at_the_first_attempt_and_is_charged_once(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start()

    result = worker.charge().get(timeout=RESULT_WAIT)

    ledger = sandbox.ledger()
    assert result == {
        "order_id": ORDER,
        "status": "succeeded",
        "charge_id": ledger["charges"][0]["id"],
        "attempts": 1,
        "deferrals": 0,
    }
    assert ledger["charges_by_order"] == {ORDER: 1}
    assert ledger["requests"]["total"] == 1


def test_a_declined_card_is_a_declined_result_and_a_breaker_success(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start()

    result = worker.charge(payment_token="tok_chargeDeclined").get(timeout=RESULT_WAIT)

    assert result["status"] == "declined"
    assert result["charge_id"] is None
    assert (result["attempts"], result["deferrals"]) == (1, 0)
    assert sandbox.ledger()["charges"] == []
    snapshot = worker.breaker.snapshot()
    assert (snapshot["successes"], snapshot["failures"]) == (1, 0)


def test_a_refused_request_fails_with_charge_rejected_and_is_no_breaker_failure(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start()
    task = worker.charge(payment_token="tok_reject")

    with pytest.raises(ChargeRejected, match=ORDER):
        task.get(timeout=RESULT_WAIT)

    assert task.state == "FAILURE"
    assert ledger_total(sandbox) == 1  # not retried
    snapshot = worker.breaker.snapshot()
    assert (snapshot["successes"], snapshot["failures"]) == (1, 0)
    assert snapshot["state"] == CircuitState.CLOSED


def test_an_open_circuit_defers_the_charge_by_its_retry_after_without_calling_the_provider(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    timeout = 1.0
    worker = start(breaker_timeout=timeout, breaker_success_threshold=1)
    opened = time.monotonic()
    worker.breaker.force_open()

    task = worker.charge()
    [deferral] = worker.logs.wait_for(DEFERRED)
    seen = time.monotonic()
    parking = runtime(worker.app).parking
    # Parked in the breaker store, not held by the worker: nothing is left on the broker.
    assert parking.count("payments.card") == 1
    wait_until(lambda: task.state == "RETRY", RESULT_WAIT, "the task to be in RETRY")
    assert "deferral 1 (circuit payments.card open): not an attempt" in str(task.info)

    countdown = float(deferral["countdown"])
    jitter = max(0.05, 0.1 * timeout)
    # retry_after when the task asked: the timeout less at most the time since it opened.
    assert timeout - (seen - opened) - 0.01 <= countdown <= timeout + jitter + 0.001
    assert deferral["why"] == "circuit payments.card open"
    assert (deferral["attempts"], deferral["deferrals"]) == ("0", "1")
    assert ledger_total(sandbox) == 0
    snapshot = worker.breaker.snapshot()
    assert snapshot["calls"] == 0
    assert snapshot["rejected"] == 1

    # Due once its countdown ran out, and let through as the circuit's probe.
    result = task.get(timeout=RESULT_WAIT)
    assert time.monotonic() - seen >= countdown - 0.05
    assert (result["status"], result["attempts"], result["deferrals"]) == ("succeeded", 1, 1)
    assert sandbox.ledger()["charges_by_order"] == {ORDER: 1}
    assert parking.count("payments.card") == 0
    assert "Released 1 parked charge(s) of payments.card (half_open)" in worker.logs.text


def test_deferrals_do_not_use_up_the_attempts(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start(
        breaker_timeout=0.5,
        payment_max_attempts=1,
        breaker_half_open_max_calls=1,
        breaker_success_threshold=1,
    )
    breaker = worker.breaker
    breaker.force_open()
    # The test holds the only probe slot: the charge finds no slot and is deferred each time.
    probe = wait_until(lambda: try_allow(breaker), 5, "the probe slot once half-open")

    task = worker.charge()
    deferrals = worker.logs.wait_for(DEFERRED, count=3)
    assert ledger_total(sandbox) == 0
    probe.success()  # closes the circuit

    result = task.get(timeout=RESULT_WAIT)
    assert result["status"] == "succeeded"
    assert result["attempts"] == 1
    assert result["deferrals"] >= 3
    assert [d["deferrals"] for d in deferrals] == ["1", "2", "3"]
    for deferral in deferrals:
        assert deferral["why"] == "circuit payments.card half_open"
        assert float(deferral["countdown"]) <= 0.5 + 0.05 + 0.001
    assert sandbox.ledger()["charges_by_order"] == {ORDER: 1}


def test_provider_failures_are_retried_with_exponential_backoff_until_the_charge_succeeds(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start(
        breaker_failure_threshold=5, payment_retry_backoff=0.4, payment_retry_backoff_max=0.8
    )
    sandbox.set_faults("down", status=503)

    task = worker.charge()
    wait_until(lambda: ledger_total(sandbox) == 2, RESULT_WAIT, "two failed attempts")
    sandbox.set_faults("ok")
    result = task.get(timeout=RESULT_WAIT)

    assert (result["status"], result["attempts"], result["deferrals"]) == ("succeeded", 3, 0)
    ledger = sandbox.ledger()
    assert ledger["requests"]["by_status"] == {"200": 1, "503": 2}
    assert ledger["charges_by_order"] == {ORDER: 1}
    first, second = worker.logs.matches(RETRYING)
    # Equal jitter: attempt n waits between half and all of backoff * 2**(n-1).
    assert 0.2 <= float(first["countdown"]) <= 0.4
    assert 0.4 <= float(second["countdown"]) <= 0.8
    assert first["why"] == "HTTP 503"
    assert worker.breaker.snapshot()["failures"] == 2


def test_through_a_flaky_provider_every_charge_succeeds_once_with_its_attempts_counted(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start(breaker_failure_threshold=100, payment_max_attempts=30)
    sandbox.set_faults("flaky", rate=0.5, seed=3)
    orders = [f"ord_{n}" for n in range(12)]

    tasks = [worker.charge(order_id=order) for order in orders]
    results = [task.get(timeout=RESULT_WAIT) for task in tasks]

    ledger = sandbox.ledger()
    assert [r["status"] for r in results] == ["succeeded"] * len(orders)
    assert ledger["charges_by_order"] == dict.fromkeys(orders, 1)
    assert sum(r["attempts"] for r in results) == ledger["requests"]["total"]
    assert ledger["requests"]["by_status"]["503"] > 0  # some attempts did fail


def test_a_provider_that_stays_down_fails_the_charge_after_max_attempts_outcome_unknown(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start(breaker_failure_threshold=10, payment_max_attempts=3)
    sandbox.set_faults("down", status=503)

    task = worker.charge()
    with pytest.raises(ChargeFailed) as failed:
        task.get(timeout=RESULT_WAIT)

    message = str(failed.value)
    assert ORDER in message
    assert "failed 3 time(s)" in message
    assert "UNKNOWN" in message
    assert "Reconcile" in message
    assert ledger_total(sandbox) == 3
    assert worker.breaker.snapshot()["failures"] == 3


@pytest.mark.parametrize("failure", ["rate limited", "connection refused"])
def test_failures_that_never_reached_the_provider_say_nothing_was_charged(
    start: Callable[..., Worker], sandbox: SandboxControl, failure: str
) -> None:
    if failure == "rate limited":
        worker = start(breaker_failure_threshold=10, payment_max_attempts=2)
        sandbox.set_faults("down", status=429)
    else:
        worker = start(
            breaker_failure_threshold=10,
            payment_max_attempts=2,
            payment_provider_url=f"http://127.0.0.1:{free_port()}",
        )

    with pytest.raises(ChargeFailed) as failed:
        worker.charge().get(timeout=RESULT_WAIT)

    assert "failed 2 time(s)" in str(failed.value)
    assert "nothing was charged" in str(failed.value)
    assert "UNKNOWN" not in str(failed.value)
    assert sandbox.ledger()["charges"] == []


def test_a_charge_not_done_by_its_deadline_expires(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    # The deadline must exceed the visibility timeout: 4.3s with these settings.
    worker = start(
        payment_charge_deadline=4.5, payment_provider_timeout=0.5, payment_max_attempts=100
    )
    sandbox.set_faults("down", status=429)

    with pytest.raises(ChargeExpired) as expired:
        worker.charge().get(timeout=RESULT_WAIT)

    assert "not charged within 4.5s" in str(expired.value)
    # Every attempt was answered 429, so the journal holds none whose outcome is unknown.
    assert "no attempt of this order is unsettled: nothing was charged" in str(expired.value)
    assert "UNKNOWN" not in str(expired.value)
    assert ledger_total(sandbox) >= 1
    assert sandbox.ledger()["charges"] == []


# With breaker_timeout 1.5 and payment_provider_timeout 0.5 the visibility timeout is 4.3s.
DEADLINE_SETTINGS: dict[str, Any] = {
    "breaker_timeout": 1.5,
    "breaker_failure_threshold": 1,
    "payment_provider_timeout": 0.5,
    "payment_charge_deadline": 4.5,
    "payment_max_attempts": 100,
}


def late_charge(
    worker: Worker, seconds_left: float, deadline: float | None = None
) -> AsyncResult:
    """Enqueue a charge first received long ago, as a reschedule would carry it."""
    deadline = deadline or DEADLINE_SETTINGS["payment_charge_deadline"]
    first_received = time.time() - deadline + seconds_left
    return worker.charge(headers=Progress(first_received=first_received).headers())


def test_at_the_deadline_a_lost_answer_is_replayed_and_returns_the_stored_success(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start(**DEADLINE_SETTINGS)
    sandbox.set_faults("lost_response")  # charges, then answers 503

    # The lost answer opens the circuit for longer than the charge has left: the charge
    # is deferred to its deadline.
    task = late_charge(worker, seconds_left=1.2)
    [deferral] = worker.logs.wait_for(DEFERRED)
    assert float(deferral["countdown"]) <= 1.2
    sandbox.set_faults("ok")
    worker.breaker.reset()

    result = task.get(timeout=RESULT_WAIT)
    ledger = sandbox.ledger()
    assert result["status"] == "succeeded"
    assert result["charge_id"] == ledger["charges"][0]["id"]
    assert (result["attempts"], result["deferrals"]) == (2, 1)
    assert ledger["charges_by_order"] == {ORDER: 1}
    assert ledger["requests"]["by_status"] == {"200": 1, "503": 1}


@pytest.mark.parametrize("at_the_deadline", ["circuit still open", "answer lost again"])
def test_at_the_deadline_an_unconfirmed_charge_expires_saying_the_outcome_is_unknown(
    start: Callable[..., Worker], sandbox: SandboxControl, at_the_deadline: str
) -> None:
    still_open = at_the_deadline == "circuit still open"
    # Open for long after the deadline, or only until it; the deadline stays above the
    # visibility timeout (6.4 s with a 3.5 s breaker timeout).
    worker = start(**{**DEADLINE_SETTINGS, **(
        {"breaker_timeout": 3.5, "payment_charge_deadline": 6.5} if still_open else {}
    )})
    sandbox.set_faults("lost_response")

    task = late_charge(worker, seconds_left=1.2, deadline=6.5 if still_open else None)
    worker.logs.wait_for(DEFERRED)
    if not still_open:
        worker.breaker.reset()

    with pytest.raises(ChargeExpired) as expired:
        task.get(timeout=RESULT_WAIT)

    assert "UNKNOWN" in str(expired.value)
    assert f"Reconcile order {ORDER}" in str(expired.value)
    ledger = sandbox.ledger()
    assert ledger["charges_by_order"] == {ORDER: 1}
    expected_requests = 1 if still_open else 2
    assert ledger["requests"]["total"] == expected_requests


def test_every_attempt_carries_the_same_idempotency_key(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start(breaker_failure_threshold=10)
    sandbox.set_faults("lost_response")

    task = worker.charge()
    wait_until(lambda: ledger_total(sandbox) >= 2, RESULT_WAIT, "two lost answers")
    sandbox.set_faults("ok")
    result = task.get(timeout=RESULT_WAIT)

    ledger = sandbox.ledger()
    # A new key would have made a second charge; the same key replays the first one.
    assert ledger["charges_by_order"] == {ORDER: 1}
    assert result["charge_id"] == ledger["charges"][0]["id"]
    assert result["attempts"] == ledger["requests"]["total"] >= 3


def test_an_order_that_already_succeeded_is_never_charged_again(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start()
    first = worker.charge().get(timeout=RESULT_WAIT)

    again = worker.charge(
        payment_token="tok_mastercard", idempotency_key="another_key"
    ).get(timeout=RESULT_WAIT)

    assert again == first
    assert sandbox.ledger()["charges_by_order"] == {ORDER: 1}
    assert ledger_total(sandbox) == 1


def _jitter(queue: Any) -> None:
    queue.put(charging._RNG.random())


def test_pool_processes_forked_from_one_worker_draw_different_jitter() -> None:
    # One generator per process for every charge's jitter: forked pool processes must not
    # share its state, or their retries and deferrals would come back in step.
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_jitter, args=(queue,)) for _ in range(2)]
    for child in children:
        child.start()
    draws = [queue.get(timeout=20) for _ in children]
    for child in children:
        child.join(timeout=20)

    assert len({*draws, charging._RNG.random()}) == 3
