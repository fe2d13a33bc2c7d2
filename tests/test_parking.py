"""Parked charges against a real Redis: what each breaker state lets through, and when."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from breaker import CircuitState
from tests.waiting import wait_until
from workers.parking import FORGET_CHUNK, INDEX_KEY, RELEASE_BATCH, Parking, Releaser
from workers.runtime import forget

BREAKER = "payments.card"
NOW = 1_000_000.0


def message(n: int) -> dict[str, Any]:
    return {"task": "payments.charge", "args": [], "kwargs": {"order_id": f"ord_{n}"},
            "options": {"task_id": f"t{n}", "retries": 1}}


@pytest.fixture
def parking(redis_client: redis.Redis) -> Parking:
    return Parking(redis_client)


def park(parking: Parking, n: int, due: float, deadline: float = NOW + 900) -> None:
    parking.park(BREAKER, message(n), due, deadline)


def release(parking: Parking, state: CircuitState, probes: int = 2) -> list[int]:
    sent: list[dict[str, Any]] = []
    parking.release(BREAKER, state, probes, sent.append, now=NOW)
    return [int(m["options"]["task_id"][1:]) for m in sent]


def test_an_open_breaker_lets_through_only_charges_at_their_deadline(parking: Parking) -> None:
    park(parking, 1, due=NOW - 5)
    park(parking, 2, due=NOW - 5, deadline=NOW - 1)
    park(parking, 3, due=NOW + 5)

    assert release(parking, CircuitState.OPEN) == [2]
    assert parking.count(BREAKER) == 2


def test_a_half_open_breaker_lets_through_as_many_due_charges_as_it_has_probe_slots(
    parking: Parking,
) -> None:
    for n, due in enumerate([NOW - 3, NOW - 2, NOW - 1, NOW + 10]):
        park(parking, n, due=due)

    assert release(parking, CircuitState.HALF_OPEN, probes=2) == [0, 1]
    assert release(parking, CircuitState.HALF_OPEN, probes=2) == [2]  # 3 is not due
    assert parking.count(BREAKER) == 1


def test_a_closed_breaker_lets_every_charge_through_due_or_not_earliest_first(
    parking: Parking, redis_client: redis.Redis
) -> None:
    for n, due in enumerate([NOW + 30, NOW - 1, NOW + 10]):
        park(parking, n, due=due)

    assert release(parking, CircuitState.CLOSED) == [1, 2, 0]
    assert parking.count(BREAKER) == 0
    assert redis_client.smembers(INDEX_KEY) == set()


def test_a_charge_is_forgotten_only_once_it_was_sent(parking: Parking) -> None:
    park(parking, 1, due=NOW - 1)
    park(parking, 2, due=NOW - 1)

    def broker_refuses(_message: dict[str, Any]) -> None:
        raise ConnectionError("broker away")

    with pytest.raises(ConnectionError):
        parking.release(BREAKER, CircuitState.CLOSED, 2, broker_refuses, now=NOW)

    assert parking.count(BREAKER) == 2
    # The lock was freed: the next pass (this releaser or another) sends both.
    assert release(parking, CircuitState.CLOSED) == [1, 2]


def test_a_broker_failing_mid_batch_leaves_exactly_the_unsent_charges_parked(
    parking: Parking,
) -> None:
    # Sent charges are forgotten FORGET_CHUNK at a time; those sent before the failure, in
    # whole chunks and in the chunk under way, are forgotten all the same.
    count = FORGET_CHUNK * 2 + 10
    for n in range(count):
        park(parking, n, due=NOW - count + n)
    sent: list[int] = []
    fail_at = FORGET_CHUNK + 7

    def publish(m: dict[str, Any]) -> None:
        if len(sent) == fail_at:
            raise ConnectionError("broker away")
        sent.append(int(m["options"]["task_id"][1:]))

    with pytest.raises(ConnectionError):
        parking.release(BREAKER, CircuitState.CLOSED, 2, publish, now=NOW)

    assert sent == list(range(fail_at))
    assert parking.count(BREAKER) == count - fail_at
    assert release(parking, CircuitState.CLOSED) == list(range(fail_at, count))


def test_a_closed_breakers_backlog_beyond_one_batch_goes_out_without_waiting_the_interval(
    parking: Parking,
) -> None:
    count = RELEASE_BATCH * 2 + 3
    for n in range(count):
        park(parking, n, due=time.time() - count + n, deadline=time.time() + 900)
    sent: list[dict[str, Any]] = []
    # The first pass runs at once; an hour's interval is never waited out here, so only
    # passes run back to back send the batches after the first.
    releaser = Releaser(lambda: parking, lambda name: (CircuitState.CLOSED, 2), sent.append,
                        interval=3600)
    releaser.start()
    try:
        wait_until(lambda: len(sent) == count, 30, "the whole backlog released")
    finally:
        releaser.stop()

    assert [m["options"]["task_id"] for m in sent] == [f"t{n}" for n in range(count)]
    assert parking.count(BREAKER) == 0


def test_one_releaser_at_a_time_per_breaker(redis_client: redis.Redis) -> None:
    first, second = Parking(redis_client), Parking(redis_client)
    for n in range(3):
        first.park(BREAKER, message(n), NOW - 1, NOW + 900)
    seen_by_second: list[int] = []

    def publish(sent: dict[str, Any]) -> None:
        # While the first releaser sends, the second one gets nothing.
        seen_by_second.extend(release(second, CircuitState.CLOSED))

    first.release(BREAKER, CircuitState.CLOSED, 2, publish, now=NOW)

    assert seen_by_second == []
    assert first.count(BREAKER) == 0


def test_the_same_charge_parked_twice_is_one_member(parking: Parking) -> None:
    park(parking, 1, due=NOW - 1)
    park(parking, 1, due=NOW - 1)

    assert parking.count(BREAKER) == 1


def test_the_releaser_thread_sends_what_the_state_allows_and_survives_errors(
    parking: Parking,
) -> None:
    states = {BREAKER: CircuitState.OPEN}
    sent: list[dict[str, Any]] = []
    failures = iter([RuntimeError("broker away")])

    def publish(m: dict[str, Any]) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        sent.append(m)

    parking.park(BREAKER, message(1), time.time() - 1, time.time() + 900)
    releaser = Releaser(lambda: parking, lambda name: (states[name], 2), publish, interval=0.02)
    releaser.start()
    try:
        states[BREAKER] = CircuitState.CLOSED
        wait_until(lambda: sent, 5, "the parked charge sent once the broker answers")
    finally:
        releaser.stop()

    assert [m["options"]["task_id"] for m in sent] == ["t1"]
    assert parking.count(BREAKER) == 0


def test_a_workers_releaser_runs_while_the_worker_runs_and_stops_with_it(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(broker_transport_options={"polling_interval": 0.1})

    def releasers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "charge-releaser"]

    before = len(releasers())
    with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False):
        during = len(releasers())
    forget(app)

    assert during == before + 1
    assert len(releasers()) == before
