"""Faults that only real `celery worker` processes meet: a broker at maxmemory, a worker that
dies mid-charge and comes back after the charge's deadline. The sandbox's ledger judges."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from breaker import CircuitBreaker, RedisStore
from tests.redis_server import RedisServer
from tests.waiting import wait_until
from tests.worker_process import WorkerProcess, charge_kwargs, web_client
from workers.config import read_settings
from workers.orders import OrderBook
from workers.parking import Parking
from workers.sandbox import SandboxControl, SandboxServer

pytestmark = pytest.mark.slow

PREFORK = ["--pool", "prefork", "--concurrency", "2"]


def worker_env(
    broker_url: str, store_url: str, provider_url: str, **settings: str
) -> dict[str, str]:
    """Return a worker environment: broker, results and breakers where the test says."""
    return {
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": store_url,
        "BREAKER_REDIS_URL": store_url,
        "PAYMENT_PROVIDER_URL": provider_url,
        "PAYMENT_RETRY_BACKOFF": "0.05",
        "PAYMENT_RETRY_BACKOFF_MAX": "0.2",
        "PAYMENT_MAX_ATTEMPTS": "10",
        "PAYMENT_CHARGE_DEADLINE": "60",
        **settings,
    }


def visibility_timeout(env: dict[str, str]) -> float:
    return read_settings({"broker_url": env["CELERY_BROKER_URL"]}, env).visibility_timeout


def refuse_writes(broker: redis.Redis) -> None:
    """Put the broker at maxmemory with noeviction: every write that adds data is refused."""
    broker.config_set("maxmemory-policy", "noeviction")
    broker.config_set("maxmemory", 1)


def accept_writes(broker: redis.Redis) -> None:
    broker.config_set("maxmemory", 0)


@pytest.fixture
def broker(spare_redis_server: RedisServer) -> Iterator[redis.Redis]:
    """Return a client of a broker Redis of the test's own, apart from the breaker store."""
    client = redis.Redis.from_url(spare_redis_server.url)
    yield client
    client.close()


@pytest.fixture
def web(spare_redis_server: RedisServer, redis_url: str) -> Iterator[Celery]:
    """Return the web tier's client: broker on the test's broker, results on the store."""
    app = web_client(spare_redis_server.url, redis_url)
    yield app
    app.close()


def results(tasks: list[AsyncResult], within: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + within
    return [t.get(timeout=max(0.1, deadline - time.monotonic()), interval=0.1) for t in tasks]


@pytest.mark.parametrize("then", ["the worker lives", "the worker is killed"])
def test_reschedules_refused_by_a_full_broker_are_not_lost(
    then: str,
    tmp_path: Path,
    redis_url: str,
    spare_redis_server: RedisServer,
    broker: redis.Redis,
    web: Celery,
    sandbox_server: SandboxServer,
    sandbox: SandboxControl,
) -> None:
    # The provider fails and the breaker stays closed: every charge is retried with a
    # backoff countdown, a new message to publish each time.
    env = worker_env(
        spare_redis_server.url, redis_url, sandbox_server.url,
        BREAKER_FAILURE_THRESHOLD="1000", PAYMENT_PROVIDER_TIMEOUT="1",
        PAYMENT_RETRY_BACKOFF="1", PAYMENT_RETRY_BACKOFF_MAX="1", PAYMENT_MAX_ATTEMPTS="50",
    )
    orders = [f"ord_{uuid.uuid4().hex[:8]}_{i}" for i in range(6)]
    sandbox.set_faults("down", status=503)
    try:
        with WorkerProcess(env, tmp_path / "first.log", PREFORK, name="first") as first:
            tasks = [web.send_task("payments.charge", kwargs=charge_kwargs(o)) for o in orders]
            wait_until(
                lambda: first.log().count(" failed: HTTP 503; retrying") >= len(orders), 15,
                "every charge retried once",
            )
            refuse_writes(broker)
            wait_until(
                lambda: "its reschedule could not be published" in first.log(), 20,
                "a reschedule refused by the full broker",
            )
            if then == "the worker is killed":
                first.kill()
            accept_writes(broker)
            sandbox.set_faults("ok")
            if then == "the worker lives":
                done = results(tasks, visibility_timeout(env) + 20)
        if then == "the worker is killed":
            with WorkerProcess(env, tmp_path / "second.log", PREFORK, name="second"):
                done = results(tasks, visibility_timeout(env) + 20)
    finally:
        accept_writes(broker)

    assert [r["status"] for r in done] == ["succeeded"] * len(orders)
    ledger = sandbox.ledger()
    assert ledger["charges_by_order"] == dict.fromkeys(orders, 1)
    assert "goes back to the broker to be delivered again" in first.log()


def test_parked_charges_wait_out_a_full_broker(
    tmp_path: Path,
    redis_url: str,
    spare_redis_server: RedisServer,
    broker: redis.Redis,
    web: Celery,
    sandbox_server: SandboxServer,
    sandbox: SandboxControl,
) -> None:
    env = worker_env(
        spare_redis_server.url, redis_url, sandbox_server.url,
        BREAKER_TIMEOUT="30", PAYMENT_PROVIDER_TIMEOUT="1", PAYMENT_RELEASE_INTERVAL="0.2",
    )
    store = RedisStore.from_url(redis_url)
    circuit = CircuitBreaker("payments.card", timeout_seconds=30.0, store=store)
    parking = Parking(store.client)
    orders = [f"ord_{uuid.uuid4().hex[:8]}_{i}" for i in range(6)]
    try:
        with WorkerProcess(env, tmp_path / "worker.log", PREFORK) as worker:
            circuit.force_open()
            tasks = [web.send_task("payments.charge", kwargs=charge_kwargs(o)) for o in orders]
            wait_until(lambda: parking.count("payments.card") == len(orders), 15,
                       "every charge parked")
            refuse_writes(broker)
            circuit.reset()  # they may go, but the broker takes no message
            wait_until(
                lambda: "Parked charges cannot be released now" in worker.log(), 15,
                "the releaser to find the broker full",
            )
            still = parking.count("payments.card")
            accept_writes(broker)
            done = results(tasks, 30)
            log = worker.log()
    finally:
        accept_writes(broker)
        store.client.close()

    assert still == len(orders)  # nothing taken out of the park that was not sent
    assert "Parked charges are released again" in log
    assert [r["status"] for r in done] == ["succeeded"] * len(orders)
    assert sandbox.ledger()["charges_by_order"] == dict.fromkeys(orders, 1)


def test_a_message_delivered_while_the_broker_is_full_is_kept_and_charged(
    tmp_path: Path,
    redis_url: str,
    spare_redis_server: RedisServer,
    broker: redis.Redis,
    web: Celery,
    sandbox_server: SandboxServer,
    sandbox: SandboxControl,
) -> None:
    env = worker_env(spare_redis_server.url, redis_url, sandbox_server.url)
    orders = [f"ord_{uuid.uuid4().hex[:8]}_{i}" for i in range(4)]
    try:
        with WorkerProcess(env, tmp_path / "worker.log", PREFORK) as worker:
            # Paused in its BRPOP: the broker hands it a message the moment one is queued,
            # and it records the delivery only when it runs again, with the broker full.
            os.kill(worker.pid, signal.SIGSTOP)
            try:
                tasks = [web.send_task("payments.charge", kwargs=charge_kwargs(o)) for o in orders]
                refuse_writes(broker)
            finally:
                os.kill(worker.pid, signal.SIGCONT)
            done = results(tasks, 30)
            alive = worker.process is not None and worker.process.poll() is None
            log = worker.log()
    finally:
        accept_writes(broker)

    # kombu's own transport loses that message and dies ("Unrecoverable error").
    assert "recorded as unacked anyway" in log
    assert "Unrecoverable error" not in log
    assert alive
    assert [r["status"] for r in done] == ["succeeded"] * len(orders)
    assert sandbox.ledger()["charges_by_order"] == dict.fromkeys(orders, 1)


def test_a_charge_killed_at_the_provider_and_back_after_its_deadline_returns_that_charge(
    tmp_path: Path,
    redis_url: str,
    sandbox_server: SandboxServer,
    sandbox: SandboxControl,
) -> None:
    deadline = 10.0
    env = worker_env(
        redis_url, redis_url, sandbox_server.url,
        BREAKER_TIMEOUT="0.5", PAYMENT_PROVIDER_TIMEOUT="2", PAYMENT_CHARGE_DEADLINE=str(deadline),
    )
    assert visibility_timeout(env) < deadline
    order = f"ord_{uuid.uuid4().hex[:8]}_late"
    book = OrderBook(redis.Redis.from_url(redis_url), result_ttl=3600, lock_ttl=7)
    web = web_client(redis_url, redis_url)
    sandbox.set_faults("slow", delay=1.5)
    try:
        with WorkerProcess(env, tmp_path / "first.log", PREFORK, name="first") as first:
            task = web.send_task("payments.charge", kwargs=charge_kwargs(order))
            wait_until(
                lambda: book.journal(order).get("pending"), 15, "the attempt to be journaled"
            )
            # Journaled before it is sent: killed only once the request reached the provider.
            wait_until(lambda: sandbox.ledger()["requests"]["in_flight"], 15,
                       "the attempt to reach the provider")
            first.kill()  # the provider finishes the charge; its answer has nobody to go to
        received = book.journal(order)["received"][task.id]
        wait_until(lambda: sandbox.ledger()["charges_by_order"].get(order), 10, "the charge")
        # Nobody runs the charge until after its deadline.
        wait_until(lambda: time.time() > received + deadline, deadline + 5, "the deadline")
        sandbox.set_faults("ok")
        with WorkerProcess(env, tmp_path / "second.log", PREFORK, name="second") as second:
            result = task.get(timeout=visibility_timeout(env) + 20, interval=0.1)
            second_log = second.log()
    finally:
        web.close()

    ledger = sandbox.ledger()
    assert ledger["charges_by_order"] == {order: 1}
    assert result["status"] == "succeeded"
    assert result["charge_id"] == ledger["charges"][0]["id"]
    # It came back as a first message without progress headers: the journal, not the
    # redelivery, started its deadline.
    assert f"Charge {order} past its deadline" in second_log


def test_a_worker_stopped_warm_leaves_every_success_counted_in_the_store(
    tmp_path: Path, redis_url: str, sandbox_server: SandboxServer, sandbox: SandboxControl
) -> None:
    env = worker_env(redis_url, redis_url, sandbox_server.url)
    web = web_client(redis_url, redis_url)
    orders = [f"ord_{uuid.uuid4().hex[:8]}_{i}" for i in range(5)]
    try:
        with WorkerProcess(env, tmp_path / "worker.log", PREFORK):
            results(
                [web.send_task("payments.charge", kwargs=charge_kwargs(o)) for o in orders], 30
            )
        # The worker is gone: what its processes batched was sent on the way out.
        store = RedisStore.from_url(redis_url)
        successes = CircuitBreaker("payments.card", store=store).snapshot()["successes"]
        store.client.close()
    finally:
        web.close()

    assert successes == len(orders)
