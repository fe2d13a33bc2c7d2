"""Money safety under faults, on an embedded worker, a real Redis and the sandbox provider.

The sandbox's ledger is the judge: every order charged at most once, every charge the
provider made named by a result (or by an error saying the outcome is unknown), nothing
left without an outcome. Each test reproduces one of the faults of issue 7 end to end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.embedded import CHARGE, DEFERRED, ORDER, RESULT_WAIT, RETRYING, Worker, ledger_total
from tests.redis_server import RedisServer, free_port
from tests.waiting import wait_until
from workers.charging import Progress
from workers.errors import ChargeExpired
from workers.orders import CONFLICT_ORDERS_KEY, CONFLICTS_KEY, OrderBook
from workers.runtime import runtime
from workers.sandbox import SandboxControl
from workers.validation import derive_idempotency_key

OTHER_TOKEN = "tok_mastercard"


def key_of(token: str) -> str:
    """Return the Idempotency-Key a charge of the test order with token derives."""
    return derive_idempotency_key(ORDER, CHARGE["amount"], CHARGE["currency"], token)


def orders(worker: Worker) -> OrderBook:
    return runtime(worker.app).orders


def test_a_lost_answer_then_a_second_task_with_another_token_charges_the_order_once(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    # The first task's retry waits 3 s: the customer's second click runs in between.
    worker = start(breaker_failure_threshold=10, payment_retry_backoff=6.0,
                   payment_retry_backoff_max=6.0)
    sandbox.set_faults("lost_response")  # charges, then answers 503
    first = worker.charge()
    worker.logs.wait_for(RETRYING)
    assert sandbox.ledger()["charges_by_order"] == {ORDER: 1}
    sandbox.set_faults("ok")

    second = worker.charge(payment_token=OTHER_TOKEN)
    second_result = second.get(timeout=RESULT_WAIT)
    first_result = first.get(timeout=RESULT_WAIT)

    ledger = sandbox.ledger()
    assert ledger["charges_by_order"] == {ORDER: 1}
    [made] = ledger["charges"]
    assert first_result["charge_id"] == second_result["charge_id"] == made["id"]
    journal = orders(worker).journal(ORDER)
    # The second task replayed the first one's key and never charged under its own.
    assert journal["attempts"][key_of("tok_visa")]["status"] == "succeeded"
    assert key_of(OTHER_TOKEN) not in journal["attempts"]
    assert "pending" not in journal
    assert "an earlier attempt (task " in worker.logs.text


def test_an_unknown_attempt_that_was_declined_lets_the_next_task_charge_under_its_own_key(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start(breaker_failure_threshold=10, payment_retry_backoff=6.0,
                   payment_retry_backoff_max=6.0)
    sandbox.set_faults("lost_response")
    first = worker.charge(payment_token="tok_chargeDeclined")
    worker.logs.wait_for(RETRYING)
    sandbox.set_faults("ok")

    second_result = worker.charge(payment_token=OTHER_TOKEN).get(timeout=RESULT_WAIT)
    first_result = first.get(timeout=RESULT_WAIT)

    ledger = sandbox.ledger()
    assert second_result["status"] == "succeeded"
    assert ledger["charges_by_order"] == {ORDER: 1}
    assert second_result["charge_id"] == ledger["charges"][0]["id"]
    # The first task comes back to an order that succeeded meanwhile: the first result.
    assert first_result == second_result
    attempts = orders(worker).journal(ORDER)["attempts"]
    assert attempts[key_of("tok_chargeDeclined")]["status"] == "declined"
    assert attempts[key_of(OTHER_TOKEN)]["status"] == "succeeded"


def test_a_trickling_answer_ends_at_the_call_deadline_and_the_order_is_charged_once(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start(payment_provider_timeout=1.0, breaker_failure_threshold=10,
                   payment_retry_backoff=0.5, payment_retry_backoff_max=0.5)
    # Every answer takes about a minute at one byte per 0.2 s.
    sandbox.set_faults("trickle", delay=0.2)
    sent = time.monotonic()
    first = worker.charge()
    [retry] = worker.logs.wait_for(RETRYING, within=10)
    ended_after = time.monotonic() - sent
    second = worker.charge(payment_token=OTHER_TOKEN)
    sandbox.set_faults("ok")

    results = [first.get(timeout=RESULT_WAIT), second.get(timeout=RESULT_WAIT)]

    assert retry["why"] == "no answer in time (ReadTimeout)"
    # The call gave up at its own deadline, not after the minute the answer needed.
    assert ended_after < 10
    ledger = sandbox.ledger()
    assert ledger["charges_by_order"] == {ORDER: 1}
    assert {r["charge_id"] for r in results} == {ledger["charges"][0]["id"]}
    assert key_of(OTHER_TOKEN) not in orders(worker).journal(ORDER)["attempts"]


def test_a_second_charge_for_one_order_is_an_incident_in_the_log_the_book_and_the_result(
    start: Callable[..., Worker],
    sandbox: SandboxControl,
    redis_client: redis.Redis,
) -> None:
    worker = start(breaker_failure_threshold=10, payment_retry_backoff=6.0,
                   payment_retry_backoff_max=6.0)
    sandbox.set_faults("lost_response")
    first = worker.charge()
    worker.logs.wait_for(RETRYING)
    # The journal is lost, as a failover that drops the last writes would lose it: nothing
    # now tells the second task that an attempt is outstanding.
    redis_client.delete(OrderBook.keys(ORDER)[0])
    sandbox.set_faults("ok")
    second_result = worker.charge(payment_token=OTHER_TOKEN).get(timeout=RESULT_WAIT)

    first_result = first.get(timeout=RESULT_WAIT)

    ledger = sandbox.ledger()
    assert ledger["charges_by_order"] == {ORDER: 2}  # the provider did charge twice
    first_charge, second_charge = (c["id"] for c in ledger["charges"])
    assert second_result["charge_id"] == second_charge
    # The first task asked with its own key, and reports what it found loudly.
    assert first_result["charge_id"] == second_charge
    [duplicate] = first_result["duplicate_charges"]
    assert duplicate["charge_id"] == first_charge
    assert duplicate["first_charge_id"] == second_charge
    [incident] = [line for line in worker.logs.lines if "SECOND CHARGE" in line]
    assert incident.startswith("ERROR workers.charges: ")
    assert first_charge in incident
    assert second_charge in incident
    assert orders(worker).journal(ORDER)["conflicts"] == [duplicate]
    assert int(redis_client.get(CONFLICTS_KEY) or 0) == 1
    assert redis_client.zrange(CONFLICT_ORDERS_KEY, 0, -1) == [ORDER.encode()]
    # Any later task for the order shows it too.
    again = worker.charge(payment_token="tok_amex").get(timeout=RESULT_WAIT)
    assert again["duplicate_charges"] == [duplicate]
    assert ledger_total(sandbox) == 3


def late_charge(worker: Worker, deadline: float, seconds_left: float) -> Any:
    """Enqueue a charge first received long ago, as a reschedule would carry it."""
    progress = Progress(first_received=time.time() - deadline + seconds_left)
    return worker.charge(headers=progress.headers())


def test_past_the_deadline_a_held_order_ends_the_charge_without_waiting(
    start: Callable[..., Worker], sandbox: SandboxControl, redis_client: redis.Redis
) -> None:
    worker = start()
    # Another message holds the order (a worker busy charging it) for a long while.
    redis_client.set(OrderBook.keys(ORDER)[1], "other-task:0 7", px=60_000)

    task = late_charge(worker, deadline=30.0, seconds_left=-1.0)
    with pytest.raises(ChargeExpired) as expired:
        task.get(timeout=RESULT_WAIT)

    assert "another message held the order" in str(expired.value)
    assert worker.logs.matches(DEFERRED) == []
    assert ledger_total(sandbox) == 0


def test_near_the_deadline_an_unreachable_order_book_ends_the_charge_after_one_wait(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    # The breakers fall back to this process; the order book has nowhere to go.
    worker = start(breaker_redis_url=f"redis://127.0.0.1:{free_port()}/0")

    task = late_charge(worker, deadline=30.0, seconds_left=2.0)
    with pytest.raises(ChargeExpired) as expired:
        task.get(timeout=RESULT_WAIT)

    assert "the order book could not be read" in str(expired.value)
    # Without the journal nobody can say that nothing was charged.
    assert "UNKNOWN" in str(expired.value)
    [deferral] = worker.logs.matches(DEFERRED)  # woke at the deadline, then ended
    assert deferral["why"].startswith("order book unavailable (ConnectionError")
    assert float(deferral["countdown"]) <= 2.01
    assert ledger_total(sandbox) == 0


@pytest.fixture
def store(spare_redis_server: RedisServer) -> Iterator[redis.Redis]:
    """Return an admin client of a breaker store and order book of the test's own."""
    client = redis.Redis.from_url(spare_redis_server.url)
    yield client
    client.config_set("maxmemory", 0)
    client.close()


def test_a_store_at_maxmemory_during_the_call_still_stores_the_charge_and_returns_it(
    start: Callable[..., Worker], sandbox: SandboxControl, store: redis.Redis,
    spare_redis_server: RedisServer,
) -> None:
    worker = start(breaker_redis_url=spare_redis_server.url)
    sandbox.set_faults("slow", delay=0.5)
    task = worker.charge()
    wait_until(lambda: store.hget(OrderBook.keys(ORDER)[0], "pending"), 10,
               "the attempt to be journaled")
    store.config_set("maxmemory-policy", "noeviction")
    store.config_set("maxmemory", 1)

    result = task.get(timeout=RESULT_WAIT)

    assert result["status"] == "succeeded"
    assert result["charge_id"] == sandbox.ledger()["charges"][0]["id"]
    # The order book took the outcome over maxmemory.
    assert OrderBook(store, 3600, 7).result(ORDER) == result
    assert store.exists(OrderBook.keys(ORDER)[1]) == 0  # the lock freed
    # The breaker's batched success waited for the store, and is counted once it answers.
    store.config_set("maxmemory", 0)
    runtime(worker.app).store.flush()
    assert worker.breaker.snapshot()["successes"] == 1


def test_a_store_refusing_the_worker_after_the_call_returns_the_charge_and_the_next_task_finds_it(
    start: Callable[..., Worker], sandbox: SandboxControl, store: redis.Redis,
    spare_redis_server: RedisServer,
) -> None:
    store.acl_setuser("worker", enabled=True, passwords=["+w0rker-pw"], keys=["*"],
                      channels=["*"], commands=["+@all"])
    url = f"redis://worker:w0rker-pw@127.0.0.1:{spare_redis_server.port}/0"
    worker = start(breaker_redis_url=url)
    sandbox.set_faults("slow", delay=0.5)
    task = worker.charge()
    wait_until(lambda: store.hget(OrderBook.keys(ORDER)[0], "pending"), 10,
               "the attempt to be journaled")
    # An operator's ACL change takes the worker's rights away while the provider charges.
    store.acl_setuser("worker", enabled=True, passwords=["+w0rker-pw"], keys=["*"],
                      commands=["-@all", "+ping", "+auth", "+hello"], reset=True)

    result = task.get(timeout=RESULT_WAIT)
    store.acl_setuser("worker", enabled=True, passwords=["+w0rker-pw"], keys=["*"],
                      channels=["*"], commands=["+@all"], reset=True)
    again = worker.charge(payment_token=OTHER_TOKEN).get(timeout=RESULT_WAIT)

    assert result["status"] == "succeeded"
    [made] = sandbox.ledger()["charges"]
    assert result["charge_id"] == made["id"]
    assert "the order book did not take the outcome succeeded" in worker.logs.text
    # The next task for the order replays the attempt the journal still holds unsettled.
    assert again["charge_id"] == made["id"]
    assert sandbox.ledger()["charges_by_order"] == {ORDER: 1}


def test_a_providers_retry_after_sets_how_long_the_circuit_stays_open(
    start: Callable[..., Worker], sandbox: SandboxControl
) -> None:
    worker = start(breaker_failure_threshold=1, breaker_timeout=0.5)
    sandbox.set_faults("down", status=503, retry_after=4)

    worker.charge()
    wait_until(lambda: worker.breaker.snapshot()["state"] == "open", 10, "the circuit to open")
    snapshot = worker.breaker.snapshot()

    assert snapshot["open_duration"] == 4.0
    assert snapshot["open_cause"] == "retry_after"
    assert 3.0 < snapshot["retry_after"] <= 4.0
