"""The gate: charges of an open breaker are parked as they arrive, before the pool.

Embedded workers (threads pool) on the private Redis and the sandbox; which charges ran in
the pool is told by Celery's task_prerun signal, sent only for a task that runs.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.app.task import Context
from celery.backends.redis import RedisBackend
from celery.result import AsyncResult
from celery.signals import task_prerun

from tests.embedded import CHARGE, DEFERRED, RESULT_WAIT, Worker
from tests.redis_server import RedisServer
from tests.waiting import wait_until
from workers.errors import ChargeRescheduled, InvalidCharge
from workers.gate import RetryStates
from workers.parking import Parking
from workers.results import OneTripRedisBackend
from workers.runtime import runtime
from workers.sandbox import SandboxControl

BREAKER = "payments.card"
RELEASED_HALF_OPEN = re.compile(r"Released \d+ parked charge\(s\) of payments\.card \(half_open\)")
OUTAGE = {"breaker_timeout": 30.0, "breaker_success_threshold": 1, "payment_charge_deadline": 120.0}


@pytest.fixture
def ran() -> Iterator[set[str]]:
    """Yield the ids of the tasks that ran in a pool, as they start."""
    ids: set[str] = set()
    lock = threading.Lock()

    def started(task_id: str, **_: Any) -> None:
        with lock:
            ids.add(task_id)

    task_prerun.connect(started, weak=False)
    yield ids
    task_prerun.disconnect(started)


def gate_open(worker: Worker) -> None:
    """Open the card breaker and wait until the worker's releaser has seen it refuse."""
    worker.breaker.force_open()
    first = worker.charge(order_id="ord_first")
    wait_until(
        lambda: BREAKER in runtime(worker.app).refusing, RESULT_WAIT,
        "the releaser to see the card breaker refuse",
    )
    wait_until(lambda: first.state == "RETRY", RESULT_WAIT, "the first charge deferred")


def test_charges_of_an_open_breaker_are_parked_without_running_and_charged_once_after(
    start: Callable[..., Worker], sandbox: SandboxControl, ran: set[str],
) -> None:
    worker = start(**OUTAGE)
    gate_open(worker)
    parking = runtime(worker.app).parking

    tasks = [worker.charge(order_id=f"ord_gate_{n}") for n in range(20)]
    wait_until(lambda: parking.count(BREAKER) == 21, RESULT_WAIT, "21 charges parked")

    assert not ran & {t.id for t in tasks}, "a charge of an open breaker ran in the pool"
    # Stored a batch at a time, on the worker's event loop, soon after the parks.
    wait_until(lambda: all(t.state == "RETRY" for t in tasks), RESULT_WAIT, "RETRY stored")
    for task in tasks:
        assert "deferral 1 (circuit payments.card open): not an attempt" in str(task.info)
    deferrals = worker.logs.wait_for(DEFERRED, count=21)
    assert {d["deferrals"] for d in deferrals} == {"1"}
    # The refusals count on the breaker as the pool's do (batched: within a second).
    wait_until(lambda: worker.breaker.snapshot()["rejected"] == 21, RESULT_WAIT,
               "21 refusals counted")
    assert worker.breaker.snapshot()["calls"] == 0

    worker.breaker.reset()
    results = [task.get(timeout=RESULT_WAIT) for task in tasks]

    assert {(r["status"], r["attempts"], r["deferrals"]) for r in results} == {
        ("succeeded", 1, 1)
    }
    charged = sandbox.ledger()["charges_by_order"]
    assert all(charged[f"ord_gate_{n}"] == 1 for n in range(20))
    assert parking.count(BREAKER) == 0


def test_what_the_gate_cannot_vouch_for_goes_on_to_the_pool(
    start: Callable[..., Worker], ran: set[str],
) -> None:
    worker = start(**OUTAGE)
    gate_open(worker)
    parking = runtime(worker.app).parking

    invalid = worker.charge(order_id="ord_bad", amount=-5)
    with pytest.raises(InvalidCharge, match="amount"):
        invalid.get(timeout=RESULT_WAIT)
    # A charge of another breaker, closed, is charged at once.
    other = worker.charge(order_id="ord_wallet", payment_method="wallet")
    assert other.get(timeout=RESULT_WAIT)["status"] == "succeeded"
    # A charge past its deadline is settled by the pool, never parked.
    late = worker.charge(order_id="ord_late", headers={"pb_first_received": 1.0})
    with pytest.raises(Exception, match="ord_late"):
        late.get(timeout=RESULT_WAIT)

    assert {invalid.id, other.id, late.id} <= ran
    assert parking.count(BREAKER) == 1  # only the first charge


def test_a_store_that_refuses_parks_makes_the_gate_stand_aside_and_loses_nothing(
    start: Callable[..., Worker], spare_redis_server: RedisServer, ran: set[str],
    sandbox: SandboxControl,
) -> None:
    # The breaker store on a server of its own, the broker not: only parking is refused.
    # Its countdown reschedules wait in the worker: a short timeout ends them soon.
    worker = start(
        **{**OUTAGE, "breaker_timeout": 3.0}, breaker_redis_url=spare_redis_server.url
    )
    gate_open(worker)
    store = redis.Redis.from_url(spare_redis_server.url)
    # Parking runs ZADD in a script: denied, every park fails; the releaser's reads do not.
    # enabled=True: redis-py's default is False, which would switch the default user off and
    # fail every connection opened after it.
    store.acl_setuser("default", enabled=True, commands=["-zadd"], reset=False)
    try:
        tasks = [worker.charge(order_id=f"ord_acl_{n}") for n in range(3)]
        wait_until(lambda: {t.id for t in tasks} <= ran, RESULT_WAIT,
                   "the charges to go on to the pool")
        wait_until(lambda: all(t.state == "RETRY" for t in tasks), RESULT_WAIT,
                   "the pool to reschedule them with their countdown")
    finally:
        store.acl_setuser("default", enabled=True, commands=["+zadd"], reset=False)
        store.close()
    # A new connection is still let in, as the worker's reconnects must be.
    with redis.Redis.from_url(spare_redis_server.url) as fresh:
        assert fresh.zadd("acl-check", {"m": 1}) == 1

    gate = [line for line in worker.logs.lines if "charge gate cannot park" in line]
    assert len(gate) == 1, gate  # once per pause, not once per charge
    assert "charges go on to the pool for 5s" in gate[0]
    worker.breaker.reset()
    results = [AsyncResult(t.id, app=worker.app).get(timeout=60) for t in tasks]
    assert {r["status"] for r in results} == {"succeeded"}
    charged = sandbox.ledger()["charges_by_order"]
    assert all(charged[f"ord_acl_{n}"] == 1 for n in range(3))


def test_a_state_stored_in_one_script_is_celerys_own_and_never_overwrites_a_success(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app()
    backend = app.tasks["payments.charge"].backend
    assert isinstance(backend, OneTripRedisBackend)
    celerys_backend = RedisBackend(app=app, url=app.conf.result_backend)
    reason = ChargeRescheduled("order ord_1 deferral 1 (circuit payments.card open)")
    ours, celerys, done = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())

    backend.mark_as_retry(ours, reason, request=Context(id=ours, task="payments.charge"))
    celerys_backend.mark_as_retry(
        celerys, reason, request=Context(id=celerys, task="payments.charge")
    )
    backend.mark_as_done(done, {"order_id": "ord_1"})
    backend.mark_as_retry(done, reason, request=Context(id=done, task="payments.charge"))

    def meta(task_id: str) -> dict[str, Any]:
        stored = dict(backend.get_task_meta(task_id))
        stored.pop("task_id")
        stored.pop("date_done", None)
        error = stored.pop("result")
        return {**stored, "result": (type(error), error.args)}

    assert meta(ours) == meta(celerys)
    # The gate's batches: one round trip for many, each state Celery's own.
    batched = str(uuid.uuid4())
    backend.store_retries([
        (batched, reason, Context(id=batched, task="payments.charge")),
        (done, reason, Context(id=done, task="payments.charge")),
    ])
    assert meta(batched) == meta(celerys)
    assert AsyncResult(ours, app=app).state == "RETRY"
    assert "deferral 1" in str(AsyncResult(ours, app=app).info)
    assert AsyncResult(done, app=app).state == "SUCCESS"  # a late RETRY did not replace it
    key = backend.get_key_for_task(ours)
    assert 0 < backend.client.ttl(key) <= int(backend.expires)


def test_a_started_state_stored_by_its_thread_never_lands_after_the_next_state(
    make_app: Callable[..., Celery],
) -> None:
    backend = make_app().tasks["payments.charge"].backend
    reason = ChargeRescheduled("order ord_1 deferral 1 (circuit payments.card open)")
    ids = [str(uuid.uuid4()) for _ in range(50)]
    for task_id in ids:
        request = Context(id=task_id, task="payments.charge")
        # As Celery's trace does: STARTED, then at once the state the run ended in.
        backend.store_result(task_id, {"pid": 1, "hostname": "w"}, "STARTED", request=request)
        backend.mark_as_retry(task_id, reason, request=request)
    assert {backend.get_task_meta(task_id)["status"] for task_id in ids} == {"RETRY"}
    started = str(uuid.uuid4())
    backend.store_result(started, {"pid": 1}, "STARTED",
                         request=Context(id=started, task="payments.charge"))
    wait_until(lambda: backend.get_task_meta(started)["status"] == "STARTED", RESULT_WAIT,
               "STARTED stored by its thread")


def test_a_batch_of_retry_states_the_backend_refuses_is_said_once_and_then_stored_again(
    make_app: Callable[..., Celery], spare_redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workers.charges")
    app = make_app(result_backend=spare_redis_server.url)
    task = app.tasks["payments.charge"]
    states = RetryStates(task, hub=None)  # no event loop: each state is stored at once
    reason = ChargeRescheduled("order ord_1 deferral 1 (circuit payments.card open)")
    admin = redis.Redis.from_url(spare_redis_server.url)
    ids = [str(uuid.uuid4()) for _ in range(3)]

    admin.acl_setuser("default", enabled=True, commands=["-eval"], reset=False)
    try:
        for task_id in ids[:2]:
            states.add(Context(id=task_id, task="payments.charge"), reason)
    finally:
        admin.acl_setuser("default", enabled=True, commands=["+eval"], reset=False)
    states.add(Context(id=ids[2], task="payments.charge"), reason)

    said = [r.getMessage() for r in caplog.records if r.name == "workers.charges"]
    assert said == [
        "RETRY states of 1 parked charge(s) not stored (NoPermissionError); they are parked "
        "all the same",
        "RETRY states of parked charges are stored again",
    ]
    assert [AsyncResult(i, app=app).state for i in ids] == ["PENDING", "PENDING", "RETRY"]
    admin.close()


def test_a_charge_sent_with_an_eta_is_parked_until_then_not_before(
    start: Callable[..., Worker], redis_client: redis.Redis, ran: set[str],
) -> None:
    worker = start(**OUTAGE)
    gate_open(worker)
    parking = runtime(worker.app).parking
    sent = time.time()

    later = worker.app.send_task(
        "payments.charge", kwargs={**CHARGE, "order_id": "ord_eta"}, countdown=60
    )
    wait_until(lambda: parking.count(BREAKER) == 2, RESULT_WAIT, "the charge parked")

    assert later.id not in ran
    due_key = Parking.keys(BREAKER)[0]
    [(member, due)] = [
        (m, score) for m, score in redis_client.zrange(due_key, 0, -1, withscores=True)
        if later.id.encode() in m
    ]
    # Its eta, not the breaker's countdown alone (about 30 s here), decides when it is due.
    assert sent + 60 - 1 <= due <= sent + 60 + 5
    assert json.loads(member)["options"]["task_id"] == later.id


def test_a_charge_parked_twice_as_after_a_lost_ack_is_charged_once(
    start: Callable[..., Worker], sandbox: SandboxControl, ran: set[str],
) -> None:
    # A worker killed between a park and its ack: the message comes back and is parked
    # again (here: sent again under the same task id), so two copies wait for the breaker.
    worker = start(**OUTAGE)
    gate_open(worker)
    parking = runtime(worker.app).parking
    first = worker.charge(order_id="ord_twice")
    wait_until(lambda: parking.count(BREAKER) == 2, RESULT_WAIT, "the charge parked")
    again = worker.app.send_task(
        "payments.charge", kwargs={**CHARGE, "order_id": "ord_twice"}, task_id=first.id
    )
    wait_until(lambda: parking.count(BREAKER) == 3, RESULT_WAIT, "its second copy parked")
    assert first.id not in ran

    worker.breaker.reset()
    result = again.get(timeout=RESULT_WAIT)
    # Both copies end. Released together, the second may find the order succeeded, or run
    # beside the first and replay its journaled attempt under the same Idempotency-Key.
    worker.logs.wait_for(re.compile(r"Charge ord_twice (already )?succeeded"), count=2)

    assert result["status"] == "succeeded"
    ledger = sandbox.ledger()
    assert ledger["charges_by_order"]["ord_twice"] == 1
    assert result["charge_id"] == next(
        c["id"] for c in ledger["charges"] if c["order_id"] == "ord_twice"
    )
    assert parking.count(BREAKER) == 0


def test_charges_of_a_half_open_breaker_whose_probe_slots_are_taken_are_parked_by_the_gate(
    start: Callable[..., Worker], sandbox: SandboxControl, ran: set[str],
) -> None:
    # The probe slots taken below stay taken for the whole test (their lease).
    worker = start(breaker_timeout=0.5, breaker_success_threshold=1, breaker_probe_lease=60.0,
                   payment_charge_deadline=120.0)
    gate_open(worker)
    parking = runtime(worker.app).parking
    breaker = worker.breaker
    wait_until(lambda: breaker.state.value == "half_open", RESULT_WAIT, "the breaker half open")
    # Every probe slot taken, as by probes under way in other workers.
    probes = [breaker.allow() for _ in range(breaker.config.half_open_max_calls)]
    assert all(p.is_probe for p in probes)
    rejected = breaker.snapshot()["rejected"]

    # A releaser pass that saw HALF_OPEN: it sends the first charge as a probe (which the
    # gate parks again, the slots being taken). Until then the gate had its OPEN view.
    worker.logs.wait_for(RELEASED_HALF_OPEN)
    tasks = [worker.charge(order_id=f"ord_half_{n}") for n in range(5)]
    wait_until(lambda: all(t.state == "RETRY" for t in tasks), RESULT_WAIT, "5 charges deferred")

    assert BREAKER in runtime(worker.app).refusing
    assert not ran & {t.id for t in tasks}, "a charge of a half-open breaker ran in the pool"
    assert parking.count(BREAKER) >= 5
    wait_until(lambda: breaker.snapshot()["rejected"] >= rejected + 5, RESULT_WAIT,
               "the refusals counted")

    for probe in probes:
        probe.success()  # the provider answered: CLOSED, and the parked charges go out
    results = [task.get(timeout=RESULT_WAIT) for task in tasks]
    assert {r["status"] for r in results} == {"succeeded"}
    charged = sandbox.ledger()["charges_by_order"]
    assert all(charged[f"ord_half_{n}"] == 1 for n in range(5))
